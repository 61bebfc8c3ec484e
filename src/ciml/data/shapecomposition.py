"""ShapeComposition: the synthetic verification task (DESIGN section 9) and its metrics.

Each sample holds random, non-overlapping shapes (ellipses, rectangles, triangles in 2D; ellipsoids,
boxes, tetrahedra in 3D). A shape is *redundant* (shown by every modality) or *specific* (shown by
exactly one). Modality ``k`` shows its shapes with a random signed intensity on a smooth, textured,
noisy background, so that no modality can be segmented by thresholding and no network is perfect.

Label convention (the presets ``shapecomposition``, ``shapecomposition3``, ``shapecomposition4``):
label 1 = redundant shape, label ``2 + k`` = shape shown only by modality ``k``. Regions: ``composite``
(every shape, owned by the first modality, which cannot see them all) and ``visible_<name>`` for every
other modality (the shapes that modality shows, labels 1 and ``2 + k``).

Because shapes never overlap, the label map, the per-modality visibility masks and what each image
shows agree voxel for voxel; the metrics (:func:`composite_dice`, :func:`message_selectivity`) rely
on that.

Example:
    >>> from ciml.tasks.spec import load_task
    >>> spec = load_task("shapecomposition")
    >>> sample = generate_sample(spec, np.random.default_rng(0), size=(64, 64))
    >>> sample.image.shape, sample.label.shape, sample.visibility.shape
    ((2, 64, 64), (64, 64), (2, 64, 64))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from ciml.errors import CimlError
from ciml.tasks.spec import TaskSpec, TaskSpecError

# --- generator defaults (chosen once for difficulty, never tuned towards a method) -------------------
SHAPE_COUNT_RANGE = (3, 7)  # shapes per sample, both ends included (fewer if they do not fit)
REDUNDANT_PROBABILITY = 0.4  # chance that a shape is shown by every modality; else by one, uniformly
# Largest half-axis of a shape as a fraction of the smallest image side: 3D has room for larger ones.
SHAPE_RADIUS_FRACTION_2D = (0.07, 0.16)
SHAPE_RADIUS_FRACTION_3D = (0.12, 0.24)
MIN_RADIUS_VOXELS = 2.0  # below this a shape is a handful of voxels, whatever the image size
SHAPE_ASPECT_RANGE = (0.5, 1.0)  # the other half-axes are this fraction of the largest one
SIMPLEX_SCALE = 1.4  # triangles/tetrahedra are thin; enlarge them towards the others' area/volume
SIMPLEX_VERTEX_JITTER = 0.3  # random offset of each vertex of the regular simplex (unit circumradius)
MIN_SHAPE_VOXELS = 8  # a shape smaller than this after rasterisation is redrawn
OVERLAP_MARGIN_VOXELS = 2  # shapes keep a Euclidean distance > this from each other
PLACEMENT_ATTEMPTS = 20  # tries per shape before giving up on it (the sample then has fewer shapes)
INTENSITY_MAGNITUDE_RANGE = (0.5, 1.5)  # |shape intensity|; its sign is random per shape and modality
# Background: a smooth random field (texture) plus white noise. Set once so that a small 2D U-Net
# (widths 8/16/32, 600 steps of batch 16, 64x64, two modalities) is not perfect: composite Dice
# 0.955 from both modalities, 0.80 from the first alone (DESIGN section 9 measured 0.97 / 0.80).
# Twice the noise and texture gave 0.79 / 0.64 (too hard); 0.75x gave 0.98, half 0.99 (too easy).
TEXTURE_STD = 0.25  # standard deviation of the smooth background field
TEXTURE_SIGMA_FRACTION = 0.05  # its Gaussian smoothing scale, as a fraction of the smallest image side
MIN_TEXTURE_SIGMA_VOXELS = 1.5
NOISE_STD = 0.2  # white noise on every voxel
DEFAULT_SIZE_2D = (64, 64)

SHAPE_KINDS = {2: ("ellipse", "rectangle", "triangle"), 3: ("ellipsoid", "box", "tetrahedron")}
COMPOSITE_REGION = "composite"
VISIBLE_PREFIX = "visible_"
REDUNDANT_LABEL = 1
FIRST_SPECIFIC_LABEL = 2  # label of shapes shown only by modality k is FIRST_SPECIFIC_LABEL + k


@dataclass(frozen=True)
class ShapeCompositionConfig:
    """Generator settings; the defaults are the module constants above.

    Attributes:
        shape_count: (min, max) number of shapes per sample, both included.
        redundant_probability: chance that a shape is shown by every modality.
        radius_fraction: (min, max) largest half-axis as a fraction of the smallest side; None picks
            the 2D or 3D default.
        intensity_magnitude: (min, max) of |intensity| of a shown shape; the sign is random.
        texture_std: standard deviation of the smooth background field.
        texture_sigma_fraction: smoothing scale of that field, fraction of the smallest side.
        noise_std: standard deviation of the white noise.
        margin: shapes keep a Euclidean distance greater than this many voxels.
    """

    shape_count: tuple[int, int] = SHAPE_COUNT_RANGE
    redundant_probability: float = REDUNDANT_PROBABILITY
    radius_fraction: tuple[float, float] | None = None
    intensity_magnitude: tuple[float, float] = INTENSITY_MAGNITUDE_RANGE
    texture_std: float = TEXTURE_STD
    texture_sigma_fraction: float = TEXTURE_SIGMA_FRACTION
    noise_std: float = NOISE_STD
    margin: int = OVERLAP_MARGIN_VOXELS

    def __post_init__(self) -> None:
        lo, hi = self.shape_count
        if not 1 <= lo <= hi:
            raise CimlError(
                f"ShapeComposition config: 'shape_count' must be 1 <= min <= max, got {self.shape_count}"
            )
        if not 0.0 <= self.redundant_probability <= 1.0:
            raise CimlError(
                "ShapeComposition config: 'redundant_probability' must lie in [0, 1], "
                f"got {self.redundant_probability}"
            )
        for name in ("radius_fraction", "intensity_magnitude"):
            pair = getattr(self, name)
            if pair is not None and not 0.0 < pair[0] <= pair[1]:
                raise CimlError(f"ShapeComposition config: '{name}' must be 0 < min <= max, got {pair}")
        for name in ("texture_std", "noise_std", "texture_sigma_fraction", "margin"):
            if getattr(self, name) < 0:
                raise CimlError(
                    f"ShapeComposition config: '{name}' must not be negative, got {getattr(self, name)}"
                )


DEFAULT_CONFIG = ShapeCompositionConfig()


@dataclass(frozen=True)
class PlacedShape:
    """One shape of a sample, kept for inspection and tests.

    Attributes:
        kind: ellipse, rectangle, triangle (2D) or ellipsoid, box, tetrahedron (3D).
        label: its value in the label map (1 redundant, 2 + k specific to modality k).
        visible: per modality, whether that modality shows it.
        intensity: per modality, the value added to the background inside it (0 where invisible).
        center: voxel coordinates of its centre.
        voxels: its size in voxels.
    """

    kind: str
    label: int
    visible: tuple[bool, ...]
    intensity: tuple[float, ...]
    center: tuple[float, ...]
    voxels: int


@dataclass(frozen=True)
class ShapeSample:
    """One generated sample.

    Attributes:
        image: float32 ``[K, *size]``, one channel per modality.
        label: uint8 ``[*size]`` in the ShapeComposition label convention (0 background).
        visibility: bool ``[K, *size]``: the voxel belongs to a shape modality k shows.
        instances: int16 ``[*size]``: 0 background, i + 1 inside ``shapes[i]``.
        shapes: the shapes, in placement order.
    """

    image: np.ndarray
    label: np.ndarray
    visibility: np.ndarray
    instances: np.ndarray
    shapes: tuple[PlacedShape, ...]


# --- spec convention ----------------------------------------------------------------------------------


def expected_regions(spec: TaskSpec) -> dict[str, tuple[int, ...]]:
    """The regions a ShapeComposition spec with ``spec``'s modalities must declare."""
    names = spec.modality_names
    regions = {COMPOSITE_REGION: tuple(range(REDUNDANT_LABEL, FIRST_SPECIFIC_LABEL + len(names)))}
    for k, name in enumerate(names[1:], start=1):
        regions[f"{VISIBLE_PREFIX}{name}"] = (REDUNDANT_LABEL, FIRST_SPECIFIC_LABEL + k)
    return regions


def validate_spec(spec: TaskSpec) -> int:
    """Check that ``spec`` follows the ShapeComposition label convention; return the modality count K.

    Raises:
        TaskSpecError: naming the first region that is missing, unexpected or has other labels.
    """
    where = f"task spec '{spec.name}'"
    if len(spec.modalities) < 2:
        raise TaskSpecError(
            f"{where}: 'modalities': ShapeComposition needs at least 2, got {len(spec.modalities)}"
        )
    expected = expected_regions(spec)
    for name, labels in expected.items():
        if name not in spec.regions:
            raise TaskSpecError(
                f"{where}: 'regions': ShapeComposition needs region '{name}' = {list(labels)}"
            )
        if spec.regions[name] != labels:
            raise TaskSpecError(
                f"{where}: 'regions.{name}': ShapeComposition expects labels {list(labels)}, "
                f"got {list(spec.regions[name])}"
            )
    extra = [name for name in spec.regions if name not in expected]
    if extra:
        raise TaskSpecError(
            f"{where}: 'regions.{extra[0]}': not a ShapeComposition region (expected: {', '.join(expected)})"
        )
    return len(spec.modalities)


# --- shape geometry -------------------------------------------------------------------------------------


def _random_rotations(rng: np.random.Generator, ndim: int, count: int) -> np.ndarray:
    """``count`` uniformly random rotation matrices: random angles in 2D, random unit quaternions in 3D."""
    if ndim == 2:
        angle = rng.uniform(0.0, 2 * np.pi, count)
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    q = rng.standard_normal((count, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, -1) for row in rows], -2)


def _regular_simplex(ndim: int) -> np.ndarray:
    """Vertices ``[ndim + 1, ndim]`` of a regular simplex with unit circumradius."""
    if ndim == 2:
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float) / np.sqrt(3)


@dataclass(frozen=True)
class _Candidates:
    """Candidate shapes for one sample, drawn in one go so that a rejected one costs next to nothing.

    Candidate ``i`` maps a voxel ``x`` to its own frame by ``(x - centers[i]) @ rotations[i]``.
    """

    kinds: np.ndarray  # [M] 0 ellipse/ellipsoid, 1 rectangle/box, 2 triangle/tetrahedron
    rotations: np.ndarray  # [M, d, d]
    axes: np.ndarray  # [M, d] half-axes of an ellipse or box (a simplex is stretched by them)
    origins: np.ndarray  # [M, d] first simplex vertex, local frame
    barycentric: np.ndarray  # [M, d, d]: (local - origin) @ it = barycentric weights 1..d of the simplex
    half_widths: np.ndarray  # [M, d] axis-aligned half extent of the rotated shape
    centers: np.ndarray  # [M, d] voxel coordinates
    probes: np.ndarray  # [M, P, d] voxels well inside each shape (a taken one rejects it early)
    fits: np.ndarray  # [M] bool: the shape fits inside the image

    def contains(self, i: int, local: list[np.ndarray]) -> np.ndarray:
        """Inside test of candidate ``i``; ``local`` holds one broadcastable array per local axis."""
        if self.kinds[i] == 0:
            return sum((u / a) ** 2 for u, a in zip(local, self.axes[i], strict=True)) <= 1.0
        if self.kinds[i] == 1:
            return np.logical_and.reduce([np.abs(u) <= a for u, a in zip(local, self.axes[i], strict=True)])
        shifted = [u - o for u, o in zip(local, self.origins[i], strict=True)]
        matrix = self.barycentric[i]
        weights = [sum(u * matrix[j, k] for j, u in enumerate(shifted)) for k in range(len(local))]
        return np.logical_and.reduce([w >= 0 for w in weights]) & (sum(weights) <= 1.0)


def _draw_candidates(
    rng: np.random.Generator, size: tuple[int, ...], kinds: np.ndarray, radius_range: tuple[float, float]
) -> _Candidates:
    """Shape parameters for every kind formula at once; ``kinds`` picks which one each row uses."""
    ndim, count = len(size), len(kinds)
    rotations = _random_rotations(rng, ndim, count)
    transposed = rotations.transpose(0, 2, 1)
    radius = np.maximum(rng.uniform(*radius_range, count), MIN_RADIUS_VOXELS)
    axes = radius[:, None] * rng.uniform(*SHAPE_ASPECT_RANGE, (count, ndim))
    axes[np.arange(count), rng.integers(ndim, size=count)] = radius  # the largest half-axis is the radius
    # Triangle / tetrahedron: a jittered regular simplex, stretched like the axes.
    jitter = rng.uniform(-SIMPLEX_VERTEX_JITTER, SIMPLEX_VERTEX_JITTER, (count, ndim + 1, ndim))
    vertices = (_regular_simplex(ndim) + jitter) * axes[:, None] * SIMPLEX_SCALE  # [M, d+1, d]
    barycentric = np.linalg.inv(vertices[:, 1:] - vertices[:, :1])  # a jittered simplex never degenerates
    centroid = vertices.mean(axis=1, keepdims=True)
    simplex_probes = np.concatenate([centroid] * (ndim - 1) + [centroid, (centroid + vertices) / 2], axis=1)
    steps = axes[:, :, None] * np.eye(ndim) / 2  # half-way to the surface along each local axis
    solid_probes = np.concatenate([np.zeros((count, 1, ndim)), steps, -steps], axis=1)
    weighted = rotations * axes[:, None, :]
    half_widths = np.select(
        [kinds[:, None] == 0, kinds[:, None] == 1],
        [np.sqrt((weighted**2).sum(-1)), np.abs(weighted).sum(-1)],
        np.abs(vertices @ transposed).max(axis=1),
    )
    room = np.asarray(size) - 1 - 2 * half_widths
    centers = half_widths + rng.uniform(0, 1, (count, ndim)) * np.maximum(room, 0)
    local_probes = np.where(kinds[:, None, None] == 2, simplex_probes, solid_probes)  # inside by convexity
    probes = np.clip(
        np.rint(centers[:, None] + local_probes @ transposed).astype(int), 0, np.asarray(size) - 1
    )
    fits = np.all(room > 0, axis=1)
    return _Candidates(
        kinds, rotations, axes, vertices[:, 0], barycentric, half_widths, centers, probes, fits
    )


def _rasterise(candidates: _Candidates, i: int, size: tuple[int, ...], pad: int):
    """Mask of candidate ``i`` inside its bounding box grown by ``pad``; returns (box slices, mask)."""
    ndim, center, half_width = len(size), candidates.centers[i], candidates.half_widths[i]
    lo = np.maximum(np.floor(center - half_width).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(center + half_width).astype(int) + pad + 1, size)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    # Open grid: offsets along each axis broadcast against the others, so nothing [..., ndim] is built.
    offsets = [
        (np.arange(a, b, dtype=float) - c).reshape([-1 if dim == axis else 1 for dim in range(ndim)])
        for axis, (a, b, c) in enumerate(zip(lo, hi, center, strict=True))
    ]
    rotation = candidates.rotations[i]
    local = [sum(offsets[k] * rotation[k, j] for k in range(ndim)) for j in range(ndim)]
    return box, np.broadcast_to(candidates.contains(i, local), tuple(hi - lo))


def _ball(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius**2


def _place_shapes(rng: np.random.Generator, size: tuple[int, ...], config: ShapeCompositionConfig):
    """Rejection-sample non-overlapping shapes; returns the instance map and (kind index, voxels, centre).

    Each requested shape gets PLACEMENT_ATTEMPTS candidates of its kind; the first that fits, keeps the
    margin to the shapes placed so far and has enough voxels is taken, else the shape is dropped.
    """
    fraction = config.radius_fraction or (
        SHAPE_RADIUS_FRACTION_2D if len(size) == 2 else SHAPE_RADIUS_FRACTION_3D
    )
    radius_range = (fraction[0] * min(size), fraction[1] * min(size))
    count = rng.integers(config.shape_count[0], config.shape_count[1] + 1)
    kinds = np.repeat(rng.integers(3, size=count), PLACEMENT_ATTEMPTS)
    candidates = _draw_candidates(rng, size, kinds, radius_range)
    instances = np.zeros(size, dtype=np.int16)
    occupied = np.zeros(size, dtype=bool)  # shapes grown by the margin
    ball = _ball(config.margin, len(size)) if config.margin > 0 else None
    placed: list[tuple[int, int, tuple[float, ...]]] = []
    for first in range(0, len(kinds), PLACEMENT_ATTEMPTS):
        rows = slice(first, first + PLACEMENT_ATTEMPTS)
        taken = occupied[tuple(np.moveaxis(candidates.probes[rows], -1, 0))].any(axis=1)
        for i in first + np.flatnonzero(candidates.fits[rows] & ~taken):
            box, mask = _rasterise(candidates, i, size, config.margin)
            voxels = int(mask.sum())
            if voxels < MIN_SHAPE_VOXELS or (mask & occupied[box]).any():
                continue
            instances[box][mask] = len(placed) + 1
            occupied[box] |= mask if ball is None else ndimage.binary_dilation(mask, structure=ball)
            placed.append((int(kinds[i]), voxels, tuple(float(c) for c in candidates.centers[i])))
            break
    return instances, placed


# --- images -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _texture_spectrum(size: tuple[int, ...], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (rfftn layout) where a Gaussian of width ``sigma`` keeps power, and its gains there."""
    grids = [np.fft.fftfreq(n) for n in size[:-1]] + [np.fft.rfftfreq(size[-1])]
    squared = sum(f**2 for f in np.meshgrid(*grids, indexing="ij", sparse=True))
    gain = np.exp(-2 * np.pi**2 * sigma**2 * squared)
    band = gain > 1e-3  # the rest contributes under 0.1 % of the amplitude
    band.flat[0] = False  # no constant offset
    return band, gain[band].astype(np.float32)


def _texture(rng: np.random.Generator, n_modalities: int, size: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit std per modality, ``[K, *size]`` float32.

    Drawn directly in Fourier space (a Gaussian spectrum, periodic boundary): the same random field
    as ``gaussian_filter(white noise)``, but it draws only the low frequencies that survive the filter.
    """
    band, gain = _texture_spectrum(size, sigma)
    coefficients = np.zeros((n_modalities, *band.shape), dtype=np.complex64)
    draws = rng.standard_normal((2, n_modalities, gain.size), dtype=np.float32) * gain
    coefficients[:, band] = draws[0] + 1j * draws[1]
    axes = tuple(range(1, len(size) + 1))
    field = scipy.fft.irfftn(coefficients, s=size, axes=axes).astype(np.float32, copy=False)
    field -= field.mean(axis=axes, keepdims=True)
    return field / (field.std(axis=axes, keepdims=True) + np.float32(1e-12))


def _background(rng: np.random.Generator, n_modalities: int, size: tuple[int, ...], config) -> np.ndarray:
    """Smooth random texture (std ``texture_std``) plus white noise (std ``noise_std``), float32."""
    image = rng.standard_normal((n_modalities, *size), dtype=np.float32) * np.float32(config.noise_std)
    if config.texture_std > 0:
        sigma = max(config.texture_sigma_fraction * min(size), MIN_TEXTURE_SIGMA_VOXELS)
        image += _texture(rng, n_modalities, size, float(sigma)) * np.float32(config.texture_std)
    return image


def _check_size(size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3) or min(size) < 8:
        raise CimlError(f"ShapeComposition: 'size' must be 2 or 3 sides of at least 8 voxels, got {size}")
    return size


def generate_sample(
    spec: TaskSpec,
    rng: np.random.Generator | int,
    size: Sequence[int] = DEFAULT_SIZE_2D,
    config: ShapeCompositionConfig = DEFAULT_CONFIG,
) -> ShapeSample:
    """Draw one sample: 2D when ``size`` has two sides, 3D when it has three.

    Args:
        spec: a ShapeComposition task spec; its modality count K sets the image channels.
        rng: the random generator (or a seed); the same state gives the same arrays.
        size: spatial size, e.g. ``(64, 64)`` or ``(32, 32, 32)``.
        config: generator settings (defaults: the module constants).

    Raises:
        TaskSpecError: the spec does not follow the ShapeComposition label convention.
        CimlError: the size is not 2D/3D or too small.
    """
    n_modalities = validate_spec(spec)
    size = _check_size(size)
    rng = np.random.default_rng(rng)
    instances, placed = _place_shapes(rng, size, config)
    n = len(placed)
    redundant = rng.uniform(size=n) < config.redundant_probability
    owner = rng.integers(n_modalities, size=n)
    visible = np.where(redundant[None, :], True, np.arange(n_modalities)[:, None] == owner[None, :])  # [K, n]
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_modalities, n))
    intensity = signs * rng.uniform(*config.intensity_magnitude, size=(n_modalities, n)) * visible
    labels = np.where(redundant, REDUNDANT_LABEL, FIRST_SPECIFIC_LABEL + owner).astype(np.uint8)

    # Lookup tables indexed by the instance map (column 0 = background).
    label_table = np.concatenate([[0], labels]).astype(np.uint8)
    visible_table = np.concatenate([np.zeros((n_modalities, 1), bool), visible], axis=1)
    intensity_table = np.concatenate([np.zeros((n_modalities, 1)), intensity], axis=1).astype(np.float32)
    image = _background(rng, n_modalities, size, config)
    image += intensity_table[:, instances]
    kinds = SHAPE_KINDS[len(size)]
    shapes = tuple(
        PlacedShape(
            kind=kinds[kind],
            label=int(labels[i]),
            visible=tuple(bool(v) for v in visible[:, i]),
            intensity=tuple(float(v) for v in intensity[:, i]),
            center=center,
            voxels=voxels,
        )
        for i, (kind, voxels, center) in enumerate(placed)
    )
    return ShapeSample(image, label_table[instances], visible_table[:, instances], instances, shapes)


# --- torch access ---------------------------------------------------------------------------------------


def sample_to_tensors(spec: TaskSpec, sample: ShapeSample) -> dict[str, torch.Tensor]:
    """Training tensors of one sample: ``image``, ``regions`` (float32, in ``spec.region_names`` order),
    ``visibility`` and ``label``."""
    return {
        "image": torch.from_numpy(sample.image),
        "regions": torch.from_numpy(spec.labels_to_regions(sample.label).astype(np.float32)),
        "visibility": torch.from_numpy(sample.visibility),
        "label": torch.from_numpy(sample.label),
    }


def make_batch(
    spec: TaskSpec,
    rng: np.random.Generator | int,
    batch_size: int,
    size: Sequence[int] = DEFAULT_SIZE_2D,
    config: ShapeCompositionConfig = DEFAULT_CONFIG,
) -> dict[str, torch.Tensor]:
    """A fresh batch for on-the-fly training.

    Sample ``b`` is ``generate_sample`` with the ``b``-th generator spawned from ``rng``, so a
    batch repeats exactly for the same seed, and successive calls on one generator differ.

    Returns:
        ``image`` [B, K, *size] float32, ``regions`` [B, R, *size] float32, ``visibility``
        [B, K, *size] bool, ``label`` [B, *size] uint8.
    """
    if batch_size < 1:
        raise CimlError(f"ShapeComposition: 'batch_size' must be at least 1, got {batch_size}")
    rng = np.random.default_rng(rng)
    samples = [generate_sample(spec, child, size, config) for child in rng.spawn(batch_size)]
    items = [sample_to_tensors(spec, sample) for sample in samples]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class ShapeCompositionDataset(Dataset):
    """A fixed set of ``n`` samples (validation/test sets); item ``i`` depends only on (seed, i).

    Items are generated on access (nothing is cached), so any order, worker split or repeat gives the
    same tensors. Each item is the dict of :func:`sample_to_tensors`.
    """

    def __init__(
        self,
        spec: TaskSpec,
        n: int,
        seed: int,
        size: Sequence[int] = DEFAULT_SIZE_2D,
        config: ShapeCompositionConfig = DEFAULT_CONFIG,
    ) -> None:
        validate_spec(spec)
        if n < 0 or seed < 0:
            raise CimlError(f"ShapeComposition: dataset 'n' and 'seed' must not be negative, got {n}, {seed}")
        self.spec, self.n, self.seed, self.config = spec, int(n), int(seed), config
        self.size = _check_size(size)

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> ShapeSample:
        """The raw sample behind item ``index`` (with its shape records)."""
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        return generate_sample(self.spec, np.random.default_rng([self.seed, index]), self.size, self.config)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return sample_to_tensors(self.spec, self.sample(index))


# --- metrics --------------------------------------------------------------------------------------------


def _as_mask(values: Any) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array > 0.5 if np.issubdtype(array.dtype, np.floating) else array.astype(bool)


def composite_dice(pred_mask: Any, target_mask: Any) -> np.ndarray:
    """Per-sample Dice of binary masks ``[B, *spatial]`` (or ``[B, 1, *spatial]``), BraTS convention.

    Both empty gives 1, exactly one empty gives 0 (MONAI would return NaN and drop the sample).
    Float inputs are thresholded at 0.5.

    Returns:
        float64 array ``[B]``.
    """
    pred, target = _as_mask(pred_mask), _as_mask(target_mask)
    if pred.shape != target.shape:
        raise ValueError(f"composite_dice: prediction {pred.shape} and target {target.shape} differ in shape")
    pred, target = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    overlap = (pred & target).sum(axis=1)
    total = pred.sum(axis=1) + target.sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))


class SelectivityMeter:
    """Accumulates where a message from ``sender_index`` into ``receiver_index`` spends its KL.

    Three masks per voxel: *specific* (inside a shape only the sender shows: the receiver needs it),
    *redundant* (inside a shape both show: the receiver has it already), *background* (no shape).
    Sums and voxel counts are kept in float64 across :meth:`update` calls, so many batches give the
    same result as one batch holding them all.
    """

    MASKS = ("specific", "redundant", "background")

    def __init__(self, receiver_index: int, sender_index: int) -> None:
        if receiver_index == sender_index:
            raise ValueError(f"receiver and sender must differ, both are {receiver_index}")
        self.receiver, self.sender = int(receiver_index), int(sender_index)
        self.sums = dict.fromkeys(self.MASKS, 0.0)
        self.counts = dict.fromkeys(self.MASKS, 0)

    def _masks(self, visibility: torch.Tensor) -> dict[str, torch.Tensor]:
        n_modalities = visibility.shape[1]
        for name, index in (("receiver", self.receiver), ("sender", self.sender)):
            if not 0 <= index < n_modalities:
                raise ValueError(f"{name} index {index} out of range for {n_modalities} modalities")
        sender, receiver = visibility[:, self.sender], visibility[:, self.receiver]
        shown_by = visibility.sum(dim=1)
        return {
            "specific": sender & (shown_by == 1),
            "redundant": sender & receiver,
            "background": shown_by == 0,
        }

    def update(self, kl_map: Any, visibility: Any) -> None:
        """Add one batch: ``kl_map`` [B, *s] or [B, 1, *s] (nats per voxel), ``visibility`` [B, K, *S] bool.

        A KL map at a coarser message level (each side of ``S`` a multiple of ``s``) is spread over
        the full-resolution voxels it covers, so every mean is over full-resolution voxels.
        """
        visibility = torch.as_tensor(visibility).bool()
        kl = torch.as_tensor(kl_map).detach().to(device=visibility.device, dtype=torch.float64)
        if kl.ndim == visibility.ndim and kl.shape[1] == 1:
            kl = kl[:, 0]
        kl = _to_resolution(kl, visibility.shape)
        for name, mask in self._masks(visibility).items():
            self.sums[name] += float(kl[mask].sum())
            self.counts[name] += int(mask.sum())

    def result(self) -> dict[str, float]:
        """Mean KL per mask, ``selectivity`` = specific / redundant, ``specific_over_background``,
        and the voxel counts ``n_<mask>``. An empty mask gives NaN for its mean and every ratio using it.
        """
        means = {name: _ratio(self.sums[name], self.counts[name]) for name in self.MASKS}
        out = dict(means)
        out["selectivity"] = _ratio(means["specific"], means["redundant"])
        out["specific_over_background"] = _ratio(means["specific"], means["background"])
        out.update({f"n_{name}": self.counts[name] for name in self.MASKS})
        return out


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN if either is NaN or both are 0, inf for x / 0 with x > 0."""
    if np.isnan(numerator) or np.isnan(denominator) or (numerator == 0 and denominator == 0):
        return float("nan")
    return numerator / denominator if denominator != 0 else float("inf")


def _to_resolution(kl: torch.Tensor, visibility_shape: torch.Size) -> torch.Tensor:
    """Repeat a coarse KL map ``[B, *s]`` up to the visibility's spatial size (integer factors only)."""
    batch, spatial = visibility_shape[0], tuple(visibility_shape[2:])
    if kl.shape[0] != batch or kl.ndim != len(spatial) + 1:
        raise ValueError(f"kl_map {tuple(kl.shape)} does not match visibility {tuple(visibility_shape)}")
    for axis, (full, coarse) in enumerate(zip(spatial, kl.shape[1:], strict=True), start=1):
        if full % coarse:
            raise ValueError(f"kl_map side {coarse} does not divide visibility side {full} (axis {axis})")
        kl = kl.repeat_interleave(full // coarse, dim=axis)
    return kl


def message_selectivity(
    kl_map: Any, visibility: Any, receiver_index: int, sender_index: int
) -> dict[str, float]:
    """Selectivity of the message sender -> receiver on one batch (see :class:`SelectivityMeter`).

    Example:
        >>> vis = np.zeros((1, 2, 1, 4), bool)
        >>> vis[0, 1, 0, :2] = True; vis[0, :, 0, 2] = True  # sender-only, redundant, background
        >>> kl = np.array([[[5.0, 5.0, 1.0, 0.5]]])
        >>> message_selectivity(kl, vis, receiver_index=0, sender_index=1)["selectivity"]
        5.0
    """
    meter = SelectivityMeter(receiver_index, sender_index)
    meter.update(kl_map, visibility)
    return meter.result()
