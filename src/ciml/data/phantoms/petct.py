"""PET/CT phantoms in autoPET and HECKTOR 2022 layouts: CT in HU, PET in SUV, lesions with labels.

Why: the PET/CT tasks need what real data has and shapes in boxes lack: CT on the Hounsfield scale
(air -1000, lung about -850, fat -100, soft tissue 40, bone 250-900), PET in SUV with physiological
uptake that looks like disease (brain, heart, kidneys, bladder, bowel, tonsils), hot lesions blurred by
the scanner's resolution, lesions only partly visible in CT, and (HECKTOR) PET and CT on different grids.

A phantom is a *scene*: an ordered list of :class:`Shape` (ellipsoids and elliptic cylinders, optionally
hollow, lumpy, banded or cut) in patient millimetres, painted in order onto any grid. Lumps and uptake
heterogeneity are functions of position in millimetres, so the same scene painted onto the CT grid and
onto the coarser PET grid gives the same lesions.

Layouts:

* autoPET: ``PETCT_<hash>/<study>/{SUV,CTres,SEG}.nii.gz``; SUV and CTres share one grid (CTres is the
  CT resampled to PET); SEG is 0/1. Some patients have two studies (a follow-up).
* HECKTOR 2022: ``imagesTr/<CENTRE>-<NNN>__CT.nii.gz``, ``imagesTr/<CENTRE>-<NNN>__PT.nii.gz``,
  ``labelsTr/<CENTRE>-<NNN>.nii.gz``; PET on a 4 mm grid, CT and label on a finer one (default 2x2x3 mm),
  overlapping but not identical in extent. Labels 1 GTVp, 2 GTVn.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.phantoms import (
    PhantomCase,
    axis_rotation,
    case_rng,
    check_output_root,
    random_rotation,
    smooth_noise,
    soft_inside,
    to_int16,
    write_nifti,
)
from ciml.errors import CimlError
from ciml.files import refuse_existing

# Tissue -> (HU, HU texture std, SUV range). HU: textbook CT values; SUV: typical FDG ranges (ours).
TISSUES: dict[str, tuple[float, float, tuple[float, float]]] = {
    "air": (-1000.0, 0.0, (0.0, 0.0)),
    "lung": (-850.0, 35.0, (0.3, 0.6)),
    "fat": (-100.0, 12.0, (0.2, 0.4)),
    "muscle": (45.0, 8.0, (0.5, 1.0)),
    "blood": (40.0, 5.0, (1.3, 2.0)),
    "myocardium": (45.0, 5.0, (1.5, 10.0)),
    "liver": (60.0, 6.0, (1.8, 2.8)),
    "spleen": (50.0, 6.0, (1.5, 2.4)),
    "kidney": (35.0, 6.0, (2.5, 4.5)),
    "urine": (8.0, 3.0, (4.0, 25.0)),
    "bowel": (30.0, 15.0, (1.2, 4.0)),
    "disc": (85.0, 10.0, (0.5, 0.9)),
    "marrow": (250.0, 40.0, (1.0, 2.0)),
    "bone": (850.0, 80.0, (0.4, 0.8)),
    "brain": (35.0, 4.0, (6.0, 10.0)),
    "gland": (-10.0, 12.0, (1.5, 3.0)),
    "lymphoid": (50.0, 6.0, (2.0, 5.0)),
    "thyroid": (80.0, 8.0, (1.0, 3.0)),
    "node": (40.0, 6.0, (0.8, 2.2)),  # benign lymph node: a confounder for GTVn
    "lesion": (45.0, 8.0, (3.0, 20.0)),  # HU and SUV of each lesion are drawn per lesion
}
TISSUE_NAMES = tuple(TISSUES)
_AIR_VALUE = {"hu": -1000.0, "suv": 0.0}


# --------------------------------------------------------------------------------------------------
# Grids and shapes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS voxel order (as DICOM converters write NIfTI), centred on ``center`` (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    center: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        diagonal = np.array([-self.spacing[0], -self.spacing[1], self.spacing[2]])
        affine = np.diag([*diagonal, 1.0])
        affine[:3, 3] = np.asarray(self.center) - diagonal * (np.asarray(self.shape) - 1) / 2.0
        return affine

    def axes_mm(self, crop: tuple[slice, ...]) -> list[np.ndarray]:
        """World coordinates of the crop's voxels, one broadcastable array per axis."""
        affine = self.affine
        axes = []
        for axis, s in enumerate(crop):
            values = affine[axis, axis] * np.arange(s.start, s.stop, dtype=np.float32) + affine[axis, 3]
            axes.append(values.reshape([-1 if a == axis else 1 for a in range(3)]).astype(np.float32))
        return axes

    def crop(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, ...] | None:
        """Voxels whose centres lie in the world box [lo, hi]; None if there are none."""
        affine = self.affine
        a, t = np.diag(affine)[:3], affine[:3, 3]
        ends = np.stack([(lo_mm - t) / a, (hi_mm - t) / a])
        first = np.maximum(np.ceil(ends.min(axis=0)), 0).astype(int)
        last = np.minimum(np.floor(ends.max(axis=0)), np.asarray(self.shape) - 1).astype(int)
        if np.any(last < first):
            return None
        return tuple(slice(f, e + 1) for f, e in zip(first, last, strict=True))


@dataclass(frozen=True)
class Shape:
    """One structure of a scene, painted over what is already there.

    Attributes:
        tissue: key of :data:`TISSUES`; gives HU and the tissue mask it paints.
        center, radii: mm. For a cylinder, ``radii[2]`` is the half-length along its (local) z axis.
        kind: ``"ellipsoid"`` or ``"cylinder"`` (elliptic, along local z).
        rotation: 3x3 matrix whose columns are the local axes in patient coordinates (None: aligned).
        hu, suv: override the tissue's values (each lesion has its own).
        label: label value painted where the shape covers at least half a voxel.
        shell: > 0 keeps only an outer wall this thick (mm): cortical bone, myocardium.
        lumps: amplitude (mm) of a smooth perturbation of the surface.
        heterogeneity: relative variation of uptake inside (PET only).
        seed: seeds lumps and heterogeneity (functions of position, so every grid sees the same shape).
        cut: (local axis, value): keep the part where that local coordinate is >= value (mm).
        bands: (period, width) mm along local z: keep periodic slabs (ribs, vertebral discs).
    """

    tissue: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    kind: str = "ellipsoid"
    rotation: np.ndarray | None = None
    hu: float | None = None
    suv: float | None = None
    label: int = 0
    shell: float = 0.0
    lumps: float = 0.0
    heterogeneity: float = 0.0
    seed: int = 0
    cut: tuple[int, float] | None = None
    bands: tuple[float, float] | None = None

    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        rotation = np.eye(3) if self.rotation is None else self.rotation
        radii = np.asarray(self.radii)
        if self.kind == "ellipsoid":
            half = np.sqrt(((rotation * radii) ** 2).sum(axis=1))
        else:
            half = np.abs(rotation * radii).sum(axis=1)
        half = half + 3.0 * self.lumps + 2.0
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def local(self, axes_mm: Sequence[np.ndarray]) -> list[np.ndarray]:
        offsets = [axes_mm[a] - np.float32(self.center[a]) for a in range(3)]
        if self.rotation is None:
            return offsets
        r = self.rotation.astype(np.float32)
        return [sum(offsets[j] * r[j, k] for j in range(3)) for k in range(3)]

    def occupancy(self, local: Sequence[np.ndarray], width: float) -> np.ndarray:
        """Fraction of each voxel inside the shape (soft edges approximate partial volume)."""
        if self.kind == "ellipsoid":
            distance = _ellipse_distance(local, self.radii)
        else:
            distance = np.maximum(
                _ellipse_distance(local[:2], self.radii[:2]), np.abs(local[2]) - self.radii[2]
            )
        if self.lumps:
            distance = distance + self.lumps * _fourier_noise(
                local, 0.6 * float(np.mean(self.radii)), self.seed
            )
        occ = soft_inside(distance, width)
        if self.shell:
            occ = np.clip(occ - soft_inside(distance + self.shell, width), 0.0, 1.0)
        if self.cut is not None:
            axis, value = self.cut
            occ = occ * soft_inside(np.float32(value) - local[axis], width)
        if self.bands is not None:
            period, band = self.bands
            phase = np.mod(local[2], period) - period / 2.0
            occ = occ * soft_inside(np.abs(phase) - band / 2.0, width)
        return occ

    def value(
        self, quantity: str, local: Sequence[np.ndarray], suv_of: dict[str, float]
    ) -> np.ndarray | float:
        if quantity == "hu":
            return TISSUES[self.tissue][0] if self.hu is None else self.hu
        suv = suv_of[self.tissue] if self.suv is None else self.suv
        if self.heterogeneity:
            noise = _fourier_noise(local, 0.4 * float(np.mean(self.radii)), self.seed + 1)
            return suv * np.clip(1.0 + self.heterogeneity * noise, 0.2, None)
        return suv


def _ellipse_distance(local: Sequence[np.ndarray], radii: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse/ellipsoid: exact for spheres."""
    q2 = sum((x / np.float32(r)) ** 2 for x, r in zip(local, radii, strict=True))
    g2 = sum((x / np.float32(r) ** 2) ** 2 for x, r in zip(local, radii, strict=True))
    q = np.sqrt(q2)
    g = np.sqrt(g2)
    scale = np.divide(q, g, out=np.full(np.broadcast(q, g).shape, min(radii), np.float32), where=g > 1e-9)
    return (q - 1.0) * scale


def _fourier_noise(
    local: Sequence[np.ndarray], correlation_mm: float, seed: int, modes: int = 8
) -> np.ndarray:
    """A smooth, unit-variance random field defined in millimetres (a sum of random plane waves)."""
    rng = np.random.default_rng(seed)
    waves = rng.normal(0.0, 1.0 / max(correlation_mm, 1.0), size=(modes, 3)).astype(np.float32)
    phases = rng.uniform(0.0, 2 * np.pi, size=modes)
    total = sum(
        np.cos(sum(local[a] * waves[m, a] for a in range(3)) + np.float32(phases[m])) for m in range(modes)
    )
    return total * np.float32(np.sqrt(2.0 / modes))


def render(scene: Sequence[Shape], grid: Grid, quantity: str, suv_of: dict[str, float] | None = None):
    """Paint ``scene`` onto ``grid``: (values in HU or SUV, label map, tissue index map).

    Values mix by occupancy, so boundary voxels carry partial volume; label and tissue take a shape
    where it covers at least half a voxel.
    """
    suv_of = suv_of or {}
    values = np.full(grid.shape, _AIR_VALUE[quantity], dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    width = 0.3 * float(np.mean(grid.spacing))
    for shape in scene:
        crop = grid.crop(*shape.bounds_mm())
        if crop is None:
            continue
        local = shape.local(grid.axes_mm(crop))
        occ = np.broadcast_to(shape.occupancy(local, width), values[crop].shape)
        target = values[crop]
        target += occ * (shape.value(quantity, local, suv_of) - target)
        hard = occ >= 0.5
        label[crop][hard] = shape.label
        tissue[crop][hard] = TISSUE_NAMES.index(shape.tissue)
    return values, label, tissue


# --------------------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------------------


def _ct_image(rng, hu: np.ndarray, tissue: np.ndarray, spacing, blur_vox: float) -> np.ndarray:
    """Tissue texture, the reconstruction's blur and quantum noise on painted HU; int16 like scanners."""
    texture_sd = np.array([TISSUES[name][1] for name in TISSUE_NAMES], dtype=np.float32)
    hu = hu + texture_sd[tissue] * smooth_noise(rng, hu.shape, 2.0)
    hu = ndimage.gaussian_filter(hu, blur_vox / np.asarray(spacing) * min(spacing))
    hu += rng.uniform(8.0, 20.0) * rng.standard_normal(hu.shape, dtype=np.float32)
    return to_int16(np.clip(hu, -1024.0, 3071.0))


def _pet_image(rng, suv: np.ndarray, spacing, fwhm_mm: float) -> np.ndarray:
    """Scanner resolution (Gaussian PSF) and count noise (variance ~ activity, spatially correlated)."""
    sigma = fwhm_mm / 2.3548 / np.asarray(spacing)
    blurred = ndimage.gaussian_filter(suv, sigma)
    noise = ndimage.gaussian_filter(rng.standard_normal(suv.shape, dtype=np.float32), 0.7)
    noise /= max(float(noise.std()), 1e-6)
    level = rng.uniform(0.12, 0.25)
    return np.clip(blurred + level * np.sqrt(np.maximum(blurred, 0.02)) * noise, 0.0, None).astype(np.float32)


def _tissue_masks(tissue: np.ndarray) -> dict[str, np.ndarray]:
    return {name: tissue == i for i, name in enumerate(TISSUE_NAMES) if np.any(tissue == i)}


def _jitter(rng, center, radii, position_sd: float = 5.0, size_sd: float = 0.08):
    """An organ's centre and radii with patient-to-patient variation."""
    center = tuple(float(c) for c in np.asarray(center) + rng.normal(0.0, position_sd, size=3))
    radii = tuple(float(r) for r in np.asarray(radii) * np.exp(rng.normal(0.0, size_sd, size=3)))
    return center, radii


def _solid_bone(center, radii, kind="ellipsoid", wall: float = 4.0, **kw) -> list[Shape]:
    """Marrow inside a cortical wall: the HU profile of real bones."""
    return [
        Shape("marrow", center, radii, kind=kind, **kw),
        Shape("bone", center, radii, kind=kind, shell=wall, **kw),
    ]


def _inside(rng, organ: Shape, depth: float = 0.65) -> tuple[float, float, float]:
    """A random point well inside an organ (within ``depth`` of its radii)."""
    direction = rng.normal(size=3)
    point = direction / np.linalg.norm(direction) * rng.random() ** (1 / 3) * depth * np.asarray(organ.radii)
    rotation = np.eye(3) if organ.rotation is None else organ.rotation
    return tuple(float(v) for v in np.asarray(organ.center) + rotation @ point)


def _lesion(rng, center, radius: float, label: int, hu: float, suv: float, necrosis: bool) -> list[Shape]:
    """A lumpy, heterogeneous hot lesion; large ones may have a cold necrotic centre (same label)."""
    radii = tuple(float(r) for r in radius * np.exp(rng.normal(0.0, 0.15, size=3)))
    seed = int(rng.integers(2**31))
    rotation = random_rotation(rng, 90.0)
    common = {"rotation": rotation, "label": label, "seed": seed}
    shapes = [
        Shape("lesion", center, radii, hu=hu, suv=suv, lumps=0.15 * radius, heterogeneity=0.25, **common)
    ]
    if necrosis:
        inner = tuple(0.45 * r for r in radii)
        shapes.append(Shape("lesion", center, inner, hu=hu - 20.0, suv=0.3 * suv, **common))
    return shapes


def _draw_lesion(rng, center, radius_range, label: int, hu_range) -> list[Shape]:
    radius = float(np.exp(rng.uniform(*np.log(radius_range))))
    suv = float(np.exp(rng.uniform(np.log(3.0), np.log(20.0))))
    necrosis = radius > 14.0 and rng.random() < 0.4
    return _lesion(rng, center, radius, label, float(rng.uniform(*hu_range)), suv, necrosis)


def _suv_table(rng) -> dict[str, float]:
    return {name: float(rng.uniform(*spec[2])) for name, spec in TISSUES.items()}


# --------------------------------------------------------------------------------------------------
# autoPET: whole-body FDG PET/CT
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Torso:
    """One patient's anatomy (fixed across their studies) and named organs for placing lesions."""

    scene: list[Shape]
    organs: dict[str, Shape]
    width: float
    depth: float


def _torso(rng) -> _Torso:
    """Trunk from the upper thighs to the upper chest; z = 0 at the pubic symphysis, mm, RAS."""
    w, d = rng.uniform(0.85, 1.2), rng.uniform(0.85, 1.25)
    a, b = 165.0 * w, 110.0 * d
    fat = rng.uniform(6.0, 35.0)
    organs = {
        "liver": Shape("liver", *_jitter(rng, (65 * w, 0.05 * b, 335), (95 * w, 0.75 * b, 70))),
        "spleen": Shape("spleen", *_jitter(rng, (-85 * w, -0.35 * b, 330), (35, 28, 55))),
        "lung_r": Shape("lung", *_jitter(rng, (85 * w, -0.05 * b, 455), (0.42 * a, 0.78 * b, 125))),
        "lung_l": Shape("lung", *_jitter(rng, (-85 * w, -0.05 * b, 455), (0.38 * a, 0.75 * b, 120))),
        "bladder": Shape("urine", *_jitter(rng, (0, 0.4 * b, 45), (45, 35, 35), size_sd=0.2)),
    }
    spine_y = -0.72 * b
    heart_center, heart_radii = _jitter(rng, (-30, 0.3 * b, 385), (55, 48, 55))
    heart_rotation = random_rotation(rng, 20.0)
    scene = [
        Shape("fat", (0, 0, 235), (a, b, 300), kind="cylinder"),
        Shape("muscle", (0, 0, 235), (a - fat, b - fat, 300), kind="cylinder"),
        Shape("fat", (0, 5, 240), (0.62 * (a - fat), 0.55 * (b - fat), 90)),
    ]
    for _ in range(int(rng.integers(5, 10))):  # bowel loops: uptake that is not disease
        center = (rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.1, 0.5) * b, rng.uniform(80, 250))
        seed = int(rng.integers(2**31))
        scene.append(
            Shape(
                "bowel", center, tuple(rng.uniform(15, 30, size=3)), lumps=4.0, heterogeneity=0.3, seed=seed
            )
        )
    scene.append(organs["bladder"])
    for side in (1, -1):
        kidney_center = (side * 70 * w, -0.5 * b, 255)
        scene.append(
            Shape("kidney", *_jitter(rng, kidney_center, (28, 22, 55)), rotation=random_rotation(rng, 15.0))
        )
        scene.append(Shape("urine", (side * 58 * w, -0.45 * b, 250), (9, 9, 15)))
    scene += [organs["liver"], organs["spleen"]]
    scene.append(Shape("blood", (-15, -0.4 * b, 320), (11, 11, 180), kind="cylinder"))  # aorta
    scene.append(Shape("blood", (20, -0.35 * b, 320), (12, 10, 180), kind="cylinder"))  # vena cava
    scene += [organs["lung_r"], organs["lung_l"]]
    scene.append(Shape("blood", heart_center, heart_radii, rotation=heart_rotation))
    scene.append(Shape("myocardium", heart_center, heart_radii, rotation=heart_rotation, shell=10.0))
    scene.append(Shape("air", (0, 0.1 * b, 460), (9, 9, 45), kind="cylinder"))  # trachea
    for side in (1, -1):  # pelvis and hips
        iliac = random_rotation(rng, 5.0) @ axis_rotation(2, side * 25.0)
        scene += _solid_bone((side * 90 * w, -35, 130), (45, 22, 55), wall=6.0, rotation=iliac)
        scene += _solid_bone((side * 85 * w, 0, 30), (22, 22, 22))
        scene += _solid_bone((side * 90 * w, 5, -40), (14, 14, 50), kind="cylinder")
        scene += _solid_bone((side * 30, 0.35 * b, 5), (35, 12, 12))
    scene += _solid_bone((0, spine_y - 10, 120), (35, 18, 50))  # sacrum
    scene += _solid_bone((0, spine_y, 335), (19, 17, 200), kind="cylinder")
    scene.append(Shape("disc", (0, spine_y, 335), (19, 17, 200), kind="cylinder", bands=(30.0, 6.0)))
    scene.append(Shape("muscle", (0, spine_y - 24, 335), (8, 8, 200), kind="cylinder"))  # spinal cord
    scene += _solid_bone((0, b - fat - 12, 400), (16, 7, 75), wall=2.0)  # sternum
    ribs = (a - fat - 6, b - fat - 6, 110)
    scene.append(Shape("bone", (0, 0, 400), ribs, kind="cylinder", shell=7.0, bands=(26.0, 10.0)))
    organs["spine"] = Shape("marrow", (0, spine_y, 300), (12, 10, 160))
    return _Torso(scene, organs, w, d)


def _autopet_lesion_site(rng, torso: _Torso) -> tuple[tuple[float, float, float], tuple[float, float], tuple]:
    """(centre, radius range, HU range) for one lesion: nodes, lung, liver, bone or spleen.

    CT visibility differs by site, as in real studies: lung nodules stand out, liver metastases are
    faintly hypodense, nodes look like any soft tissue, bone lesions are lytic.
    """
    w, b = torso.width, 110.0 * torso.depth
    side = rng.choice([-1.0, 1.0])
    site = rng.choice(
        ["mediastinal", "axillary", "paraaortic", "inguinal", "lung", "liver", "bone", "spleen"]
    )
    if site == "mediastinal":
        return (rng.uniform(-25, 15), rng.uniform(0.0, 0.3) * b, rng.uniform(400, 445)), (5, 22), (35, 55)
    if site == "axillary":
        return (
            (side * rng.uniform(110, 130) * w, rng.uniform(-0.1, 0.2) * b, rng.uniform(400, 440)),
            (5, 18),
            (35, 55),
        )
    if site == "paraaortic":
        return (rng.uniform(-45, 20), rng.uniform(-0.45, -0.2) * b, rng.uniform(200, 300)), (5, 22), (35, 55)
    if site == "inguinal":
        return (
            (side * rng.uniform(60, 90) * w, rng.uniform(0.2, 0.45) * b, rng.uniform(-10, 50)),
            (5, 16),
            (35, 55),
        )
    if site == "lung":
        organ = torso.organs["lung_r" if side > 0 else "lung_l"]
        return _inside(rng, organ, 0.6), (4, 16), (20, 45)
    if site == "liver":
        return _inside(rng, torso.organs["liver"]), (5, 22), (25, 45)
    if site == "bone":
        return _inside(rng, torso.organs["spine"], 0.8), (5, 12), (60, 150)
    return _inside(rng, torso.organs["spleen"]), (5, 14), (30, 45)


def _autopet_lesions(rng, torso: _Torso) -> list[tuple]:
    """A patient's disease: 1-8 lesion sites (centre, radius range, HU range)."""
    return [_autopet_lesion_site(rng, torso) for _ in range(1 + min(int(rng.poisson(2.0)), 7))]


def _follow_up(rng, sites: list[tuple], torso: _Torso) -> list[tuple]:
    """A later study: lesions grow or shrink, some vanish, new ones may appear."""
    kept = [s for s in sites if rng.random() > 0.2]
    if rng.random() < 0.3 or not kept:
        kept.append(_autopet_lesion_site(rng, torso))
    return kept


@dataclass(frozen=True)
class _Study:
    patient: str
    study: str
    patient_index: int
    study_index: int

    @property
    def case_id(self) -> str:
        """``PATIENT_STUDY``, the id :func:`ciml.data.layouts.read_autopet` gives the same folder."""
        return f"{self.patient}_{self.study}"


def _autopet_plan(seed: int, n_cases: int, second_study_probability: float) -> list[_Study]:
    """Patients and study folders for ``n_cases`` studies; the first k studies never depend on n_cases."""
    plan: list[_Study] = []
    patient_index = 0
    while len(plan) < n_cases:
        rng = case_rng(seed, 511, patient_index, 0)
        patient = "PETCT_" + "".join(rng.choice(list("0123456789abcdef"), size=10))
        n_studies = 2 if rng.random() < second_study_probability else 1
        date = datetime.date(2001, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 6000)))
        for study_index in range(n_studies):
            number = int(rng.integers(10000, 99999))
            plan.append(
                _Study(
                    patient,
                    f"{date:%m-%d-%Y}-NA-PET-CT Ganzkoerper  primaer mit KM-{number}",
                    patient_index,
                    study_index,
                )
            )
            date += datetime.timedelta(days=int(rng.integers(60, 400)))
        patient_index += 1
    return plan[:n_cases]


def autopet_phantom_case(
    seed: int,
    patient_index: int = 0,
    study_index: int = 0,
    *,
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    negative: bool = False,
) -> PhantomCase:
    """One autoPET study in memory: images ``pet`` (SUV, float32) and ``ct`` (CTres, HU, int16) on one grid.

    The anatomy depends on (seed, patient_index); lesions, uptake, positioning and noise also on
    study_index (a follow-up sees the same patient with changed disease). ``negative`` gives a control
    study without lesions (label all 0).
    """
    anatomy = _torso(case_rng(seed, 511, patient_index, 1))
    disease_rng = case_rng(seed, 511, patient_index, 2)
    sites = _autopet_lesions(disease_rng, anatomy)
    rng = case_rng(seed, 511, patient_index, 3, study_index)
    for _ in range(study_index):
        sites = _follow_up(disease_rng, sites, anatomy)
    center = (float(rng.normal(0, 8)), float(rng.normal(-10, 5)), 210.0 + float(rng.normal(0, 10)))
    grid = Grid(tuple(shape), tuple(spacing), center)
    for _ in range(20):
        lesions = (
            [] if negative else [s for site in sites for s in _draw_lesion(rng, site[0], site[1], 1, site[2])]
        )
        scene = anatomy.scene + lesions
        suv_true, label, tissue = render(scene, grid, "suv", _suv_table(rng))
        if negative or np.any(label == 1):
            break
        sites = _autopet_lesions(disease_rng, anatomy)  # all lesions fell outside the field of view
    else:
        raise RuntimeError(
            f"autoPET phantom seed={seed} patient={patient_index}: no lesion in the field of view"
        )
    hu, _, _ = render(scene, grid, "hu")
    images = {
        "pet": _pet_image(rng, suv_true, spacing, fwhm_mm=rng.uniform(5.0, 8.0)),
        "ct": _ct_image(rng, hu, tissue, spacing, blur_vox=0.8),
    }
    affine = grid.affine
    return PhantomCase(images, {"pet": affine, "ct": affine, "label": affine}, label, _tissue_masks(tissue))


def make_autopet_phantom(
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    second_study_probability: float = 0.25,
    negative_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Case]:
    """Write ``n_cases`` studies in autoPET layout: ``PETCT_<hash>/<study>/{SUV,CTres,SEG}.nii.gz``.

    About ``second_study_probability`` of patients get a follow-up study; ``negative_fraction`` of
    studies are lesion-free controls (autoPET has about half; default none). Refuses, before writing
    anything, if a study folder exists and is not empty, unless ``overwrite``.

    Returns:
        The written studies as cases (images ``pet``/``ct`` as in the ``autopet`` task spec; group =
        patient, so splits can keep a patient's studies together).
    """
    _check_count(n_cases)
    out = check_output_root(out_dir)
    plan = _autopet_plan(seed, n_cases, second_study_probability)
    refuse_existing([out / s.patient / s.study for s in plan], overwrite)
    cases = []
    for study in tqdm(plan, desc="autopet phantom", unit="study", disable=not progress):
        negative = case_rng(seed, 511, study.patient_index, 4, study.study_index).random() < negative_fraction
        case = autopet_phantom_case(
            seed, study.patient_index, study.study_index, shape=shape, spacing=spacing, negative=negative
        )
        folder = out / study.patient / study.study
        images = {
            "pet": write_nifti(case.images["pet"], case.affines["pet"], folder / "SUV.nii.gz"),
            "ct": write_nifti(case.images["ct"], case.affines["ct"], folder / "CTres.nii.gz"),
        }
        label = write_nifti(case.label, case.affines["label"], folder / "SEG.nii.gz")
        cases.append(
            Case(study.case_id, images, label=label, group=study.patient, extra={"study": study.study})
        )
    return cases


# --------------------------------------------------------------------------------------------------
# HECKTOR 2022: head and neck FDG PET/CT
# --------------------------------------------------------------------------------------------------

HECKTOR_CENTERS = ("CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA")
# Relative weights of the centres in HECKTOR 2022's training set (524 cases).
_CENTER_WEIGHTS = np.array([56, 72, 72, 53, 55, 18, 198], dtype=float) / 524.0
GTVP, GTVN = 1, 2

# Where primaries and nodes occur (patient mm, z = 0 at the sternal notch; x > 0 is the patient's right).
_PRIMARY_SITES = {
    "tonsil": (16.0, 8.0, 160.0),
    "base_of_tongue": (0.0, 20.0, 150.0),
    "larynx": (8.0, 28.0, 110.0),
    "hypopharynx": (15.0, 15.0, 125.0),
    "oral_tongue": (12.0, 40.0, 170.0),
    "nasopharynx": (0.0, -5.0, 185.0),
}
_NODE_LEVELS = {
    "II": (40.0, 0.0, 150.0),
    "III": (38.0, 10.0, 110.0),
    "IV": (35.0, 12.0, 75.0),
    "V": (45.0, -25.0, 110.0),
}


def _head_neck(rng) -> list[Shape]:
    """Head, neck and shoulders with the structures that confound GTVs: tonsils, glands, brain."""
    w, d = rng.uniform(0.9, 1.15), rng.uniform(0.9, 1.15)
    fat = rng.uniform(4.0, 15.0)
    scene = [
        Shape("fat", (0, -10, -100), (185 * w, 105 * d, 100), kind="cylinder"),
        Shape("muscle", (0, -10, -100), (185 * w - fat, 105 * d - fat, 100), kind="cylinder"),
        Shape("fat", (0, 0, 60), (62 * w, 68 * d, 75), kind="cylinder"),
        Shape("muscle", (0, 0, 60), (62 * w - fat, 68 * d - fat, 75), kind="cylinder"),
        Shape("fat", (0, 5, 175), (78, 98, 105)),
        Shape("muscle", (0, 5, 175), (74, 94, 101)),
    ]
    scene += [Shape("lung", *_jitter(rng, (side * 65 * w, -15, -40), (48, 50, 70))) for side in (1, -1)]
    scene.append(Shape("bone", (0, 5, 178), (71, 91, 98), shell=7.0, cut=(2, -5.0)))  # skull vault
    scene.append(Shape("brain", (0, 5, 178), (64, 84, 91), cut=(2, 0.0)))
    for side in (1, -1):
        clavicle = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=float) @ axis_rotation(0, side * 10.0)
        scene += _solid_bone(
            (side * 65 * w, 20, -5), (8, 8, 60), kind="cylinder", rotation=clavicle, wall=2.5
        )
        scene.append(Shape("thyroid", *_jitter(rng, (side * 18, 25, 65), (10, 9, 20), 2.0)))
        scene.append(Shape("gland", *_jitter(rng, (side * 52, -5, 175), (14, 20, 25), 3.0)))  # parotid
        scene.append(
            Shape("gland", *_jitter(rng, (side * 35, 25, 140), (12, 12, 10), 3.0), hu=40.0)
        )  # submandibular
        scene.append(Shape("air", (side * 28, 45, 205), (14, 18, 18)))  # maxillary sinus
        scene.append(Shape("blood", (side * 30, 5, 80), (5, 5, 110), kind="cylinder"))  # carotid / jugular
    scene.append(Shape("muscle", *_jitter(rng, (0, 35, 165), (25, 30, 18), 3.0)))  # tongue
    mandible = Shape("bone", (0, 20, 160), (50, 55, 15), kind="cylinder", shell=6.0, cut=(1, 5.0))
    scene.append(mandible)
    scene.append(Shape("air", (0, 25, 30), (9, 8, 60), kind="cylinder"))  # trachea
    scene.append(Shape("air", (0, 28, 110), (13, 11, 20)))  # larynx
    scene.append(Shape("air", (0, 12, 150), (14, 9, 30)))  # pharynx
    scene += [Shape("lymphoid", *_jitter(rng, (side * 16, 8, 160), (8, 8, 12), 2.0)) for side in (1, -1)]
    scene += _solid_bone((0, -35, 80), (14, 13, 150), kind="cylinder")  # cervical spine
    scene.append(Shape("disc", (0, -35, 80), (14, 13, 150), kind="cylinder", bands=(20.0, 5.0)))
    scene.append(Shape("muscle", (0, -52, 80), (7, 7, 150), kind="cylinder"))  # spinal cord
    for _ in range(int(rng.integers(1, 5))):  # benign nodes: small, mildly avid
        level = _NODE_LEVELS[rng.choice(list(_NODE_LEVELS))]
        center = (rng.choice([-1, 1]) * level[0], *level[1:])
        scene.append(Shape("node", *_jitter(rng, center, (4, 4, 5), 8.0, 0.2)))
    return scene


def _hecktor_tumours(rng, nodes: bool) -> list[Shape]:
    """GTVp at one oropharynx/larynx/oral site and, if ``nodes``, 1-3 GTVn mostly on the same side."""
    name = rng.choice(list(_PRIMARY_SITES))
    x, y, z = _PRIMARY_SITES[name]
    side = rng.choice([-1.0, 1.0])
    center = tuple(np.array([side * x, y, z]) + rng.normal(0.0, 3.0, size=3))
    # Primaries enhance a little (HU above muscle) and fill the airway: CT sees them.
    shapes = _draw_lesion(rng, center, (8.0, 22.0), GTVP, (55.0, 75.0))
    for _ in range(int(rng.integers(1, 4)) if nodes else 0):
        lx, ly, lz = _NODE_LEVELS[rng.choice(list(_NODE_LEVELS))]
        node_side = side if rng.random() < 0.8 else -side
        node_center = tuple(np.array([node_side * lx, ly, lz]) + rng.normal(0.0, 4.0, size=3))
        shapes += _draw_lesion(rng, node_center, (5.0, 14.0), GTVN, (30.0, 50.0))
    return shapes


def hecktor_phantom_case(
    seed: int,
    index: int = 1,
    *,
    ct_shape: tuple[int, int, int] = (128, 128, 96),
    ct_spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    pet_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    nodes: bool = True,
) -> PhantomCase:
    """One HECKTOR case in memory: ``ct`` (HU, int16) and label on the CT grid, ``pet`` (SUV) on its own.

    The PET grid is coarser, about 30 mm larger in every direction and shifted by a few mm, so the two
    overlap physically without sharing voxels, as in HECKTOR's data. ``nodes=False`` gives a case
    without GTVn.
    """
    rng = case_rng(seed, 2022, index)
    ct_center = (float(rng.normal(0, 5)), float(rng.normal(0, 5)), 80.0 + float(rng.normal(0, 8)))
    ct_grid = Grid(tuple(ct_shape), tuple(ct_spacing), ct_center)
    extent = np.asarray(ct_shape) * np.asarray(ct_spacing) + 30.0
    pet_shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent, pet_spacing, strict=True))
    pet_center = tuple(float(c) for c in np.asarray(ct_center) + rng.uniform(-8.0, 8.0, size=3))
    pet_grid = Grid(pet_shape, tuple(pet_spacing), pet_center)
    anatomy = _head_neck(rng)
    suv_of = _suv_table(rng)
    for _ in range(20):
        scene = anatomy + _hecktor_tumours(rng, nodes)
        hu, label, tissue = render(scene, ct_grid, "hu")
        if np.any(label == GTVP) and (np.any(label == GTVN) or not nodes):
            break
    else:
        raise RuntimeError(f"HECKTOR phantom seed={seed} index={index}: no GTVp/GTVn in the field of view")
    suv_true, _, _ = render(scene, pet_grid, "suv", suv_of)
    images = {
        "ct": _ct_image(rng, hu, tissue, ct_spacing, blur_vox=0.5),
        "pet": _pet_image(rng, suv_true, pet_spacing, fwhm_mm=rng.uniform(5.0, 8.0)),
    }
    affines = {"ct": ct_grid.affine, "pet": pet_grid.affine, "label": ct_grid.affine}
    return PhantomCase(images, affines, label, _tissue_masks(tissue))


def _hecktor_ids(seed: int, n_cases: int, centers: Sequence[str]) -> list[tuple[int, str]]:
    """(case index, ``CENTRE-NNN``) for each case; numbering runs per centre, like HECKTOR's."""
    weights = np.array(
        [_CENTER_WEIGHTS[HECKTOR_CENTERS.index(c)] if c in HECKTOR_CENTERS else 1.0 for c in centers]
    )
    counts: dict[str, int] = {}
    ids = []
    for index in range(1, n_cases + 1):
        center = str(case_rng(seed, 2022, index, 0).choice(list(centers), p=weights / weights.sum()))
        counts[center] = counts.get(center, 0) + 1
        ids.append((index, f"{center}-{counts[center]:03d}"))
    return ids


def make_hecktor_phantom(
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    *,
    ct_shape: tuple[int, int, int] = (128, 128, 96),
    ct_spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    pet_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    centers: Sequence[str] = HECKTOR_CENTERS,
    node_negative_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Case]:
    """Write ``n_cases`` cases in HECKTOR 2022 layout under ``out_dir``.

    Files: ``imagesTr/<ID>__CT.nii.gz``, ``imagesTr/<ID>__PT.nii.gz``, ``labelsTr/<ID>.nii.gz`` with IDs
    such as ``CHUM-001`` (centres drawn with HECKTOR's proportions). ``node_negative_fraction`` of cases
    have no GTVn (label 2), as some real ones. Refuses, before writing anything, if a target file exists,
    unless ``overwrite``.
    """
    _check_count(n_cases)
    if not centers:
        raise CimlError("centers: give at least one centre name")
    out = check_output_root(out_dir)
    ids = _hecktor_ids(seed, n_cases, centers)
    paths = {
        case_id: (
            out / "imagesTr" / f"{case_id}__CT.nii.gz",
            out / "imagesTr" / f"{case_id}__PT.nii.gz",
            out / "labelsTr" / f"{case_id}.nii.gz",
        )
        for _, case_id in ids
    }
    refuse_existing([p for triple in paths.values() for p in triple], overwrite)
    cases = []
    for index, case_id in tqdm(ids, desc="hecktor phantom", unit="case", disable=not progress):
        nodes = case_rng(seed, 2022, index, 1).random() >= node_negative_fraction
        case = hecktor_phantom_case(
            seed, index, ct_shape=ct_shape, ct_spacing=ct_spacing, pet_spacing=pet_spacing, nodes=nodes
        )
        ct_path, pet_path, label_path = paths[case_id]
        images = {
            "ct": write_nifti(case.images["ct"], case.affines["ct"], ct_path),
            "pet": write_nifti(case.images["pet"], case.affines["pet"], pet_path),
        }
        label = write_nifti(case.label, case.affines["label"], label_path)
        cases.append(Case(case_id, images, label=label, group=case_id))
    return cases


def _check_count(n_cases: int) -> None:
    if n_cases < 1:
        raise CimlError(f"n_cases={n_cases}: need at least one case")
