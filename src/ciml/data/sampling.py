"""Patch sampling for training, with nnU-Net's foreground oversampling.

Tumours fill a tiny share of a volume, so uniformly drawn patches would rarely show one. As nnU-Net does
(``oversample_foreground_percent = 0.33``), a share of each batch is forced to contain foreground: a label
class present in the case is picked at random, then a voxel of that class, then a patch that contains
it. The other patches are drawn uniformly. Volumes smaller than the patch are zero-padded.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, target = sample_patches(cases, (64, 64, 64), batch_size=2, rng=rng)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def forced_foreground_count(batch_size: int, foreground_fraction: float, rng: np.random.Generator) -> int:
    """How many patches of a batch must contain foreground: ``batch_size * fraction``, rounded at random.

    Random rounding keeps the expected share exact even for a batch of 1 or 2 (nnU-Net's fixed
    rounding forces none at batch size 1), and never forces fewer than ``floor(batch_size * fraction)``.
    """
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    expected = batch_size * foreground_fraction
    return int(np.floor(expected + rng.random()))


def sample_patches(
    case_arrays: Sequence[Any],
    patch_size: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    foreground_fraction: float = 1 / 3,
    augment: Augment | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a training batch of patches from random cases.

    Args:
        case_arrays: cases, each an ``(image, label)`` pair or an object with ``image`` and ``label``
            attributes (e.g. :class:`ciml.data.preprocessing.PreprocessedCase`); image ``[M, *spatial]``,
            label ``[*spatial]`` (label values) or ``[C, *spatial]`` (region masks). Arrays may be
            memory-mapped: only the patches are copied.
        patch_size: spatial size of a patch.
        batch_size: number of patches.
        rng: the only source of randomness, so a seed repeats a batch exactly.
        foreground_fraction: share of patches forced to contain foreground (nnU-Net: 1/3). Cases
            without foreground give a random patch instead.
        augment: optional ``(image, target, rng) -> (image, target)`` applied to each patch; it must
            keep the shapes (e.g. :func:`random_mirror`).

    Returns:
        ``image`` float32 ``[B, M, *patch]`` and ``target`` ``[B, *patch]`` or ``[B, C, *patch]`` (the
        label's dtype). The forced-foreground patches come first.
    """
    if not case_arrays:
        raise ValueError("sample_patches needs at least one case")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = [_as_pair(c, i) for i, c in enumerate(case_arrays)]
    patch = tuple(int(p) for p in patch_size)
    for i, (image, label) in enumerate(pairs):
        _check_shapes(image, label, patch, i)
    n_forced = forced_foreground_count(batch_size, foreground_fraction, rng)
    images, targets = [], []
    for b in range(batch_size):
        image, label = pairs[int(rng.integers(len(pairs)))]
        start = _patch_start(label, patch, force_foreground=b < n_forced, rng=rng)
        img_patch, tgt_patch = _crop(image, start, patch), _crop(label, start, patch)
        if augment is not None:
            img_patch, tgt_patch = augment(img_patch, tgt_patch, rng)
        images.append(img_patch)
        targets.append(tgt_patch)
    return np.stack(images).astype(np.float32, copy=False), np.stack(targets)


def random_mirror(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip each spatial axis with probability 1/2 (nnU-Net's mirroring), image and target alike."""
    ndim = len(image.shape) - 1
    axes = [a for a in range(ndim) if rng.random() < 0.5]
    if not axes:
        return image, target
    t_offset = target.ndim - ndim
    image = np.flip(image, axis=[a + 1 for a in axes])
    target = np.flip(target, axis=[a + t_offset for a in axes])
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def _as_pair(case: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = (case.image, case.label) if hasattr(case, "image") else case
    if label is None:
        raise ValueError(f"case {getattr(case, 'case_id', index)} has no label; training patches need one")
    return image, label


def _check_shapes(image: np.ndarray, label: np.ndarray, patch: tuple[int, ...], index: int) -> None:
    spatial = tuple(image.shape[1:])
    if len(spatial) != len(patch):
        raise ValueError(f"case {index}: image {image.shape} is [M, *spatial] with {len(patch)} spatial axes")
    if tuple(label.shape[-len(spatial) :]) != spatial or label.ndim not in (len(spatial), len(spatial) + 1):
        raise ValueError(f"case {index}: label shape {label.shape} does not match image shape {image.shape}")


def _foreground_voxel(label: np.ndarray, spatial_ndim: int, rng: np.random.Generator) -> np.ndarray | None:
    """A random voxel of a randomly chosen foreground class (or region channel); None if there is none."""
    if label.ndim == spatial_ndim:
        classes = _present_classes(np.asarray(label))
        if not classes.size:
            return None
        mask = np.asarray(label) == classes[int(rng.integers(classes.size))]
    else:
        present = [c for c in range(label.shape[0]) if np.any(label[c])]
        if not present:
            return None
        mask = np.asarray(label[present[int(rng.integers(len(present)))]]) != 0
    flat = np.flatnonzero(mask)
    return np.array(np.unravel_index(flat[int(rng.integers(flat.size))], mask.shape))


def _present_classes(label: np.ndarray) -> np.ndarray:
    """Nonzero values in a label map (a bincount for unsigned labels: linear time, no sort)."""
    if label.dtype.kind in "ub":
        counts = np.bincount(label.ravel().astype(np.intp, copy=False))
        return np.flatnonzero(counts[1:]) + 1
    values = np.unique(label)
    return values[values != 0]


def _patch_start(
    label: np.ndarray, patch: tuple[int, ...], force_foreground: bool, rng: np.random.Generator
) -> np.ndarray:
    """Patch corner in the volume's coordinates (negative or overhanging where the volume is small)."""
    spatial = np.array(label.shape[-len(patch) :])
    size = np.array(patch)
    voxel = _foreground_voxel(label, len(patch), rng) if force_foreground else None
    # Volumes smaller than the patch are centred in it: the corner is fixed at -(padding before).
    low = np.minimum(0, -((size - spatial) // 2))
    high = np.maximum(spatial - size, low)
    if voxel is None:
        return np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high, strict=True)])
    # Place the voxel uniformly inside the patch, then clamp: clamping keeps it inside.
    offset = np.array([int(rng.integers(p)) for p in patch])
    return np.clip(voxel - offset, low, high)


def _crop(array: np.ndarray, start: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """``array[..., start:start+patch]`` with zeros where the window leaves the volume."""
    spatial = array.shape[-len(patch) :]
    lead = array.shape[: array.ndim - len(patch)]
    out = np.zeros(lead + patch, dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch, spatial, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[(..., *dst)] = array[(..., *src)]
    return out
