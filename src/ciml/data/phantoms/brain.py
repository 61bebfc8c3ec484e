"""Brain tumour phantom in BraTS2020 layout, on the real MNI ICBM152 2009a anatomy shipped by nilearn.

Why a phantom on real anatomy: shapes in boxes are too easy and teach nothing about the BraTS
decomposition; real brains with synthetic tumours keep the hard parts (sulci, ventricles, partial
volume, tumours next to CSF) while the ground truth stays exact.

Per case (float32, vectorised; about 0.3 s at 2 mm and 2 s at 1 mm on one core, plus ~2 s once per
process to load the atlas):

1. anatomy: nilearn's grey/white-matter probability maps and brain mask (CSF = mask - GM - WM),
   resampled onto BraTS's 240x240x155 1 mm grid (or 120x120x78 at 2 mm, 80x80x52 at 3 mm) through a random
   rotation, scaling and smooth deformation, plus the tumour's mass effect;
2. tumour: a noise-perturbed ellipsoidal core with an enhancing rim of random, locally vanishing
   thickness around necrosis (sometimes with a haemorrhage), and edema that diffuses from the core
   mostly along white matter (diffusivity WM 1, GM 0.15, CSF 0);
3. contrasts: tissue fractions times per-tissue signal (table :data:`CONTRAST`, jittered per case),
   smooth texture, a polynomial bias field per contrast, Rician noise and a per-case scale, stored as
   int16 like scanner data; background is exactly 0, as after BraTS's skull stripping.

Labels are BraTS's: 0 background, 1 necrosis / non-enhancing core, 2 edema, 4 enhancing tumour.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.phantoms import (
    PhantomCase,
    case_rng,
    check_output_root,
    random_rotation,
    resize_linear,
    smooth_noise,
    soft_inside,
    to_int16,
    write_nifti,
)
from ciml.errors import CimlError
from ciml.files import refuse_existing

BRATS_SHAPE_1MM = (240, 240, 155)
MODALITIES = ("flair", "t1", "t1ce", "t2")
LABELS = {"necrosis": 1, "edema": 2, "enhancing": 4}

# Mean signal of each tissue in each contrast (columns as MODALITIES), relative to white matter in T1.
# Ours, from the radiological reading the BraTS decomposition relies on: edema bright in FLAIR/T2;
# CSF dark in FLAIR, bright in T2; enhancing rim bright only in T1CE; white matter the brightest
# normal tissue in T1/T1CE; necrosis dark in T1/T1CE. A haemorrhage is bright in T1 *and* T1CE, so only
# T1 tells it (label 1) from enhancement (label 4).
CONTRAST = {
    "csf": (0.15, 0.30, 0.30, 1.00),
    "gm": (0.55, 0.65, 0.68, 0.55),
    "wm": (0.40, 0.90, 0.90, 0.35),
    "edema": (0.85, 0.55, 0.58, 0.80),
    "necrosis": (0.50, 0.35, 0.38, 0.85),
    "enhancing": (0.62, 0.60, 1.75, 0.60),
    "hemorrhage": (0.60, 1.05, 1.10, 0.45),
}
_NORMAL = ("csf", "gm", "wm")
_TUMOUR = ("edema", "necrosis", "enhancing", "hemorrhage")


@dataclass(frozen=True)
class BrainPhantomConfig:
    """Ranges the per-case draws come from (mm unless stated). Defaults aim at a task baselines do not solve.

    Attributes:
        core_radius: log-uniform range of the tumour core's mean radius.
        rim_thickness: range of the enhancing rim's mean thickness (at least 1.25 voxels is enforced).
        edema_ratio: log-uniform range of edema volume / core volume.
        hemorrhage_probability: chance that part of the necrosis is a T1-bright haemorrhage.
        noise: range of the Rician noise std, relative to the mean brain signal of each contrast.
        bias: std of the bias field's linear coefficients (log scale); higher orders get less.
        deformation: amplitude of the smooth random deformation.
        scale: range of the scaling of the anatomy.
        rotation_degrees: maximum rotation about each axis.
    """

    core_radius: tuple[float, float] = (8.0, 27.0)
    rim_thickness: tuple[float, float] = (1.5, 5.0)
    edema_ratio: tuple[float, float] = (0.8, 5.0)
    hemorrhage_probability: float = 0.35
    noise: tuple[float, float] = (0.03, 0.09)
    bias: float = 0.12
    deformation: float = 3.0
    scale: tuple[float, float] = (0.9, 1.02)
    rotation_degrees: float = 8.0


# --------------------------------------------------------------------------------------------------
# Grid and atlas
# --------------------------------------------------------------------------------------------------


def brats_affine(spacing_mm: float = 1.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """BraTS's voxel-to-world affine and grid shape at ``spacing_mm`` (1 mm: 240x240x155).

    BraTS files carry ``diag(-1, -1, 1)`` with origin (0, 239, 0) (LPS voxel order, as ITK writes it).
    Coarser grids keep the same physical extent: the outer voxel edges stay where BraTS's are.
    """
    s = float(spacing_mm)
    nx, ny, nz = (int(np.ceil(n / s)) for n in BRATS_SHAPE_1MM)
    affine = np.diag([-s, -s, s, 1.0])
    affine[:3, 3] = [0.5 - s / 2, 239.5 - s / 2, -0.5 + s / 2]
    return affine, (nx, ny, nz)


@dataclass(frozen=True)
class _Atlas:
    """Tissue fraction maps on the MNI grid, block-averaged to the output voxel size."""

    maps: dict[str, np.ndarray]  # csf, gm, wm
    affine: np.ndarray
    center_mm: np.ndarray  # centre of the brain's bounding box (world mm)
    corners_mm: np.ndarray  # 8 corners of that box
    tumour_sites_mm: np.ndarray  # deep white-matter points where a tumour may start


@functools.lru_cache(maxsize=3)
def _atlas(spacing_mm: float) -> _Atlas:
    """nilearn's shipped ICBM152 2009a maps (no download: the files are inside the package).

    At k mm (k = 2, 3) the maps are averaged over k^3 blocks first: a k mm voxel holds exactly that
    mixture of tissue (partial volume), and sampling the smaller maps is k^3 times cheaper.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template

    mask_img = load_mni152_brain_mask()
    mask = np.asarray(mask_img.dataobj, dtype=np.float32)
    gm = np.asarray(load_mni152_gm_template().dataobj, dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template().dataobj, dtype=np.float32)
    brain = np.maximum(mask, np.minimum(gm + wm, 1.0))
    maps = {"csf": np.clip(brain - gm - wm, 0.0, 1.0), "gm": gm, "wm": wm}
    fine_affine = np.asarray(mask_img.affine, dtype=float)
    factor = int(round(spacing_mm))
    maps = {k: _block_mean(v, factor) for k, v in maps.items()}
    inside = np.argwhere(mask > 0)
    lo, hi = inside.min(axis=0), inside.max(axis=0)
    corners_vox = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    # Tumour sites: deep white matter, found on a 2 mm grid (precise enough, 8x cheaper).
    depth = 2.0 * ndimage.distance_transform_edt(_block_mean(mask, 2) >= 0.5)
    sites = np.argwhere((_block_mean(wm, 2) > 0.6) & (depth >= 12.0))
    return _Atlas(
        maps={k: np.ascontiguousarray(v, dtype=np.float32) for k, v in maps.items()},
        affine=fine_affine @ _block_affine(factor),
        center_mm=_apply(fine_affine, (lo + hi) / 2.0),
        corners_mm=_apply(fine_affine, corners_vox),
        tumour_sites_mm=_apply(fine_affine @ _block_affine(2), sites),
    )


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor^3 blocks (edges padded by repetition): downsampling that keeps partial volume."""
    if factor == 1:
        return array
    a = np.pad(array, [(0, (-n) % factor) for n in array.shape], mode="edge")
    n0, n1, n2 = (n // factor for n in a.shape)
    return a.reshape(n0, factor, n1, factor, n2, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_affine(factor: int) -> np.ndarray:
    """Voxel map from a block-averaged grid to the original: block i is centred on f*i + (f-1)/2."""
    affine = np.diag([factor, factor, factor, 1.0])
    affine[:3, 3] = (factor - 1) / 2.0
    return affine


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Affine applied to points in the last axis (..., 3)."""
    return np.asarray(points, dtype=float) @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------------------------------
# Anatomy: random pose, deformation and mass effect
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    """Maps atlas mm to output mm: p = matrix @ (a - atlas_center) + grid_center + shift."""

    matrix: np.ndarray
    atlas_center: np.ndarray
    grid_center: np.ndarray
    shift: np.ndarray

    def forward(self, atlas_mm: np.ndarray) -> np.ndarray:
        return (atlas_mm - self.atlas_center) @ self.matrix.T + self.grid_center + self.shift

    def inverse(self, out_mm: np.ndarray) -> np.ndarray:
        return (out_mm - self.grid_center - self.shift) @ np.linalg.inv(self.matrix).T + self.atlas_center


def _draw_pose(rng: np.random.Generator, atlas: _Atlas, affine: np.ndarray, shape, cfg) -> _Pose:
    scales = rng.uniform(*cfg.scale) * np.exp(rng.normal(0.0, 0.03, size=3))
    matrix = random_rotation(rng, cfg.rotation_degrees) @ np.diag(scales)
    grid_center = _apply(affine, (np.asarray(shape) - 1) / 2.0)
    return _Pose(matrix, atlas.center_mm, grid_center, rng.normal(0.0, 3.0, size=3))


def _bbox(pose: _Pose, atlas: _Atlas, affine: np.ndarray, shape, margin_mm: float) -> tuple[slice, ...]:
    """Output voxels the posed brain can reach (plus a margin for deformation and mass effect)."""
    corners = _apply(np.linalg.inv(affine), pose.forward(atlas.corners_mm))
    margin = margin_mm / np.abs(np.diag(affine)[:3])
    lo = np.maximum(np.floor(corners.min(axis=0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(corners.max(axis=0) + margin) + 1, shape).astype(int)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def _sample_anatomy(rng, atlas: _Atlas, pose: _Pose, affine, box, tumour_mm, core_radius, cfg):
    """GM, WM and CSF fractions on the output box, through pose, deformation and mass effect.

    The whole map (output mm -> atlas voxel) is smooth, so it is computed on a lattice every ~6 mm
    and interpolated linearly; only the final tissue lookup runs per voxel.
    """
    spacing = np.abs(np.diag(affine)[:3])
    fine = tuple(s.stop - s.start for s in box)
    coarse = tuple(max(2, int(np.ceil(n * sp / 6.0)) + 1) for n, sp in zip(fine, spacing, strict=True))
    axes = [np.linspace(s.start, s.stop - 1, c) for s, c in zip(box, coarse, strict=True)]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    points = _apply(affine, idx)
    # Mass effect: sample closer to the tumour centre, so tissue appears pushed outwards.
    offset = points - tumour_mm
    push = rng.uniform(0.3, 0.7) * np.exp(-np.sum(offset**2, axis=-1) / (2 * (1.3 * core_radius) ** 2))
    points = tumour_mm + offset * (1.0 - push)[..., None]
    # Smooth random deformation, correlation ~30 mm.
    lattice_mm = float(np.mean([n * sp / c for n, sp, c in zip(fine, spacing, coarse, strict=True)]))
    for axis in range(3):
        points[..., axis] += cfg.deformation * smooth_noise(rng, coarse, 30.0 / lattice_mm)
    atlas_vox = _apply(np.linalg.inv(atlas.affine), pose.inverse(points)).astype(np.float32)
    # Look tissue up only near the brain: the lattice sees brain within one cell of every such voxel.
    lattice_brain = sum(
        ndimage.map_coordinates(m, np.moveaxis(atlas_vox, -1, 0), order=1, output=np.float32)
        for m in atlas.maps.values()
    )
    near = resize_linear(ndimage.maximum_filter(lattice_brain, size=3), fine) > 0
    coords = np.stack([resize_linear(atlas_vox[..., a], fine)[near] for a in range(3)])
    tissue = {}
    for name, m in atlas.maps.items():
        tissue[name] = np.zeros(fine, dtype=np.float32)
        tissue[name][near] = ndimage.map_coordinates(m, coords, order=1, mode="constant", output=np.float32)
    return tissue


# --------------------------------------------------------------------------------------------------
# Tumour
# --------------------------------------------------------------------------------------------------


@dataclass
class _Tumour:
    """Tumour fractions and labels on a crop of the output box."""

    crop: tuple[slice, ...]
    fractions: dict[str, np.ndarray]  # edema, necrosis, enhancing, hemorrhage (volume fractions)
    labels: np.ndarray  # uint8, BraTS values


def _tumour_crop(center_vox: np.ndarray, half_vox: float, shape) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(center_vox - half_vox), 0).astype(int)
    hi = np.minimum(np.ceil(center_vox + half_vox) + 1, shape).astype(int)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def _core_distance(rng, local_mm: np.ndarray, radius: float, spacing: float) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a lumpy ellipsoid of mean radius ``radius``."""
    radii = radius * np.exp(rng.normal(0.0, 0.15, size=3))
    radii *= radius / np.exp(np.mean(np.log(radii)))
    rotated = local_mm @ random_rotation(rng, 90.0)
    q = np.sqrt(np.sum((rotated / radii) ** 2, axis=-1))
    lumps = smooth_noise(rng, q.shape, max(2.0, 0.5 * radius / spacing))
    return ((q - 1.0) * radius + rng.uniform(0.12, 0.3) * radius * lumps).astype(np.float32)


def _diffuse(source: np.ndarray, diffusivity: np.ndarray, steps: int) -> np.ndarray:
    """Explicit diffusion from a fixed source; a face conducts at the lower diffusivity of its voxels.

    With the lower value, nothing crosses into CSF (diffusivity 0): edema stops at ventricles and sulci.
    """
    u = source.copy()
    faces = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        faces.append((tuple(lo), tuple(hi), np.minimum(diffusivity[tuple(lo)], diffusivity[tuple(hi)]) / 6.0))
    for _ in range(steps):
        delta = np.zeros_like(u)
        for lo, hi, conductance in faces:
            flux = conductance * (u[hi] - u[lo])
            delta[lo] += flux
            delta[hi] -= flux
        u += delta
        np.maximum(u, source, out=u)
    return u


def _edema_field(tissue: dict[str, np.ndarray], core: np.ndarray, spacing: float) -> np.ndarray:
    """How strongly edema reaches each voxel: diffusion from the core on a ~3 mm grid, upsampled."""
    factor = max(1, round(3.0 / spacing))
    diffusivity = _block_mean(tissue["wm"] + 0.15 * tissue["gm"], factor)
    source = _block_mean(core, factor)
    steps = int(np.ceil(3.0 * (30.0 / (2.0 * factor * spacing)) ** 2))
    u = _diffuse(source, diffusivity.astype(np.float32), steps)
    up = ndimage.zoom(u, factor, order=1, mode="nearest", grid_mode=True)
    return up[tuple(slice(0, n) for n in core.shape)]


def _grow_tumour(
    rng, tissue: dict[str, np.ndarray], center_vox, spacing: float, radius: float, cfg
) -> _Tumour:
    """Core, rim, necrosis, haemorrhage and edema around ``center_vox`` (box voxel coordinates)."""
    half = (1.3 * radius + 35.0) / spacing
    crop = _tumour_crop(np.asarray(center_vox), half, tissue["gm"].shape)
    local = {k: v[crop] for k, v in tissue.items()}
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in crop], indexing="ij")
    local_mm = (np.stack(grids, axis=-1) - np.asarray(center_vox, dtype=np.float32)) * spacing
    width = 0.3 * spacing

    distance = _core_distance(rng, local_mm, radius, spacing)
    core = soft_inside(distance, width)
    rim = max(rng.uniform(*cfg.rim_thickness), 1.25 * spacing)
    rim = min(rim, 0.6 * radius)
    thickness = rim * np.clip(
        1.0 + 0.8 * smooth_noise(rng, core.shape, max(2.0, radius / spacing)), 0.0, None
    )
    necrosis = soft_inside(distance + thickness, width)
    hemorrhage = np.zeros_like(core)
    if rng.random() < cfg.hemorrhage_probability:
        offset = rng.normal(0.0, 0.25 * radius, size=3).astype(np.float32)
        blob = np.sqrt(np.sum((local_mm - offset) ** 2, axis=-1)) - rng.uniform(0.3, 0.5) * radius
        hemorrhage = necrosis * soft_inside(blob, width)

    reach = _edema_field(local, core, spacing)
    reach *= np.exp(0.35 * smooth_noise(rng, core.shape, 8.0 / spacing))
    parenchyma = local["gm"] + local["wm"]
    candidates = reach[(parenchyma >= 0.5) & (core < 0.5)]
    wanted = np.exp(rng.uniform(*np.log(cfg.edema_ratio))) * float(np.sum(core >= 0.5))
    threshold = 0.05
    if candidates.size:
        q = 1.0 - min(wanted / candidates.size, 1.0)
        threshold = max(float(np.quantile(candidates, q)), 0.05)
    edema_extent = soft_inside((threshold - reach) / threshold, 0.12)

    brain = local["csf"] + parenchyma
    fractions = {
        "edema": edema_extent * (1.0 - core) * parenchyma,
        "necrosis": (necrosis - hemorrhage) * brain,
        "enhancing": (core - necrosis) * brain,
        "hemorrhage": hemorrhage * brain,
    }
    for name in ("gm", "wm"):
        local[name] *= (1.0 - core) * (1.0 - edema_extent)
    local["csf"] *= 1.0 - core

    labels = np.zeros(core.shape, dtype=np.uint8)
    solid = brain >= 0.5
    labels[solid & (fractions["edema"] >= 0.5 * brain)] = LABELS["edema"]
    in_core = solid & (core >= 0.5)
    labels[in_core] = np.where(
        necrosis[in_core] >= 0.5 * core[in_core], LABELS["necrosis"], LABELS["enhancing"]
    )
    return _Tumour(crop, {k: v.astype(np.float32) for k, v in fractions.items()}, labels)


# --------------------------------------------------------------------------------------------------
# Contrasts
# --------------------------------------------------------------------------------------------------


def _bias_field(rng, box, shape, strength: float) -> np.ndarray:
    """exp(cubic polynomial of position): a smooth multiplicative field, one per contrast.

    Evaluated on a lattice every ~8 voxels and interpolated: the field is far smoother than that.
    """
    bases = []
    for s, n in zip(box, shape, strict=True):
        u = np.linspace(s.start, s.stop - 1, max(2, (s.stop - s.start) // 8 + 2)) / max(n - 1, 1) * 2.0 - 1.0
        bases.append(np.stack([u**d for d in range(4)]))
    degree = np.add.outer(np.add.outer(np.arange(4), np.arange(4)), np.arange(4))
    coef = rng.normal(0.0, 1.0, size=degree.shape) * strength / np.maximum(degree, 1) ** 0.8
    coef[(degree > 3) | (degree == 0)] = 0.0
    log_bias = np.einsum("ia,jb,kc,ijk->abc", *bases, coef)
    bias = resize_linear(np.exp(log_bias - log_bias.mean()), tuple(s.stop - s.start for s in box))
    return bias


def _synthesise(rng, tissue, tumour: _Tumour, box, shape, cfg) -> dict[str, np.ndarray]:
    """The four contrasts on the box: mixtures of tissue signals, texture, bias, Rician noise, scale."""
    table = {
        k: np.asarray(v) * np.exp(rng.normal(0.0, 0.06 if k in _NORMAL else 0.1, size=4))
        for k, v in CONTRAST.items()
    }
    brain = tissue["csf"] + tissue["gm"] + tissue["wm"]
    brain[tumour.crop] += sum(tumour.fractions.values())
    inside = brain >= 0.1
    texture = 1.0 + 0.04 * smooth_noise(rng, brain.shape, 3.0)
    tumour_texture = 1.0 + 0.12 * smooth_noise(rng, tumour.labels.shape, 3.0)
    images = {}
    for m, name in enumerate(MODALITIES):
        signal = sum(tissue[k] * np.float32(table[k][m]) for k in _NORMAL) * texture
        signal[tumour.crop] += (
            sum(tumour.fractions[k] * np.float32(table[k][m]) for k in _TUMOUR) * tumour_texture
        )
        signal *= _bias_field(rng, box, shape, cfg.bias)
        sigma = rng.uniform(*cfg.noise) * float(signal[inside].mean())
        values = signal[inside]
        real = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(values.shape, dtype=np.float32)
        noisy = np.zeros_like(signal)
        noisy[inside] = np.sqrt(real**2 + imag**2)
        images[name] = noisy * np.float32(np.exp(rng.uniform(np.log(300.0), np.log(1500.0))))
    return images


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def brats_phantom_case(
    seed: int, index: int = 1, spacing_mm: float = 1.0, config: BrainPhantomConfig | None = None
) -> PhantomCase:
    """One phantom case in memory: images flair/t1/t1ce/t2 (int16), label (uint8, 0/1/2/4), tissue.

    ``tissue`` holds the normal-tissue fractions csf/gm/wm left after the tumour replaced some. The case
    depends only on (seed, index, spacing_mm, config). The tumour is redrawn (deterministically) in the
    rare case one of the labels 1, 2, 4 came out empty.
    """
    _check_spacing(spacing_mm)
    cfg = config or BrainPhantomConfig()
    rng = case_rng(seed, 2020, index)
    affine, shape = brats_affine(spacing_mm)
    atlas = _atlas(float(spacing_mm))
    for _ in range(20):
        case = _try_case(rng, atlas, affine, shape, float(spacing_mm), cfg)
        if case is not None:
            return case
    raise RuntimeError(
        f"brain phantom seed={seed} index={index}: no tumour with all three labels in 20 draws"
    )


#: Voxel sizes the BraTS phantom is drawn at: whole multiples of the 1 mm atlas, so a voxel's tissue
#: mixture is an exact block average of it.
SPACINGS_MM = (1.0, 2.0, 3.0)


def _check_spacing(spacing_mm: float) -> None:
    if spacing_mm not in SPACINGS_MM:
        grids = ", ".join(f"{s:g} mm ({'x'.join(map(str, brats_affine(s)[1]))})" for s in SPACINGS_MM)
        raise CimlError(f"spacing_mm={spacing_mm!r}: the BraTS phantom supports {grids}")


def _try_case(
    rng, atlas: _Atlas, affine, shape, spacing: float, cfg: BrainPhantomConfig
) -> PhantomCase | None:
    pose = _draw_pose(rng, atlas, affine, shape, cfg)
    radius = float(np.exp(rng.uniform(*np.log(cfg.core_radius))))
    site = atlas.tumour_sites_mm[rng.integers(len(atlas.tumour_sites_mm))] + rng.normal(0.0, 2.0, size=3)
    tumour_mm = pose.forward(site)
    box = _bbox(pose, atlas, affine, shape, margin_mm=3 * cfg.deformation + 0.7 * radius + 4.0)
    tissue = _sample_anatomy(rng, atlas, pose, affine, box, tumour_mm, radius, cfg)
    center_vox = _apply(np.linalg.inv(affine), tumour_mm) - np.array([s.start for s in box])
    tumour = _grow_tumour(rng, tissue, center_vox, spacing, radius, cfg)
    if any(not np.any(tumour.labels == v) for v in LABELS.values()):
        return None
    images = _synthesise(rng, tissue, tumour, box, shape, cfg)
    label = np.zeros(shape, dtype=np.uint8)
    label[box][tumour.crop] = tumour.labels
    return PhantomCase(
        images={name: to_int16(_paste(images[name], box, shape)) for name in MODALITIES},
        affines={**{name: affine for name in MODALITIES}, "label": affine},
        label=label,
        tissue={name: _paste(tissue[name], box, shape) for name in _NORMAL},
    )


def _paste(values: np.ndarray, box: tuple[slice, ...], shape) -> np.ndarray:
    full = np.zeros(shape, dtype=np.float32)
    full[box] = values
    return full


def brats_case_id(index: int, prefix: str = "BraTS20_Training") -> str:
    return f"{prefix}_{index:03d}"


def make_brats_phantom(
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    spacing_mm: float = 1.0,
    *,
    first_index: int = 1,
    overwrite: bool = False,
    config: BrainPhantomConfig | None = None,
    progress: bool = False,
) -> list[Case]:
    """Write ``n_cases`` phantom cases in BraTS2020 training layout under ``out_dir``.

    Layout: ``out_dir/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz``.
    Refuses (before writing anything) if a case folder exists and is not empty, unless ``overwrite``.
    Every file is written atomically.

    Returns:
        The written cases (images keyed flair/t1/t1ce/t2 as in the ``brats2020`` task spec).
    """
    if n_cases < 1:
        raise CimlError(f"n_cases={n_cases}: need at least one case")
    _check_spacing(spacing_mm)
    out = check_output_root(out_dir)
    ids = [brats_case_id(first_index + i) for i in range(n_cases)]
    refuse_existing([out / case_id for case_id in ids], overwrite)
    cases = []
    for offset, case_id in enumerate(tqdm(ids, desc="brats phantom", unit="case", disable=not progress)):
        case = brats_phantom_case(seed, first_index + offset, spacing_mm, config)
        folder = out / case_id
        images = {
            m: write_nifti(case.images[m], case.affines[m], folder / f"{case_id}_{m}.nii.gz")
            for m in MODALITIES
        }
        label = write_nifti(case.label, case.affines["label"], folder / f"{case_id}_seg.nii.gz")
        cases.append(Case(case_id, images, label=label))
    return cases
