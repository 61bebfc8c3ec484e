"""Realistic phantoms written in the layouts of real datasets (BraTS2020, autoPET, HECKTOR 2022).

They exist so that every reader, check, preprocessing step, model and metric can be exercised end to
end on data that looks like the real thing (file names, grids, affines, intensity units, label values)
without downloading anything. The generators live in :mod:`.brain` (MRI brain tumours on the MNI
ICBM152 anatomy that nilearn ships) and :mod:`.petct` (PET/CT bodies in HU and SUV). This module holds
what they share: seeded noise fields, soft (partial-volume) occupancy, and safe NIfTI writing.

The public functions are imported lazily, so ``import ciml.data.phantoms`` stays cheap (nilearn's
import alone takes over a second).

Example:
    >>> from ciml.data.phantoms import make_brats_phantom  # doctest: +SKIP
    >>> cases = make_brats_phantom("phantom_brats", n_cases=2, seed=0, spacing_mm=2.0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from ciml.errors import CimlError, ParameterError
from ciml.files import atomic_path

__all__ = [
    "PHANTOMS",
    "PhantomCase",
    "autopet_phantom_case",
    "brats_affine",
    "brats_phantom_case",
    "hecktor_phantom_case",
    "make_autopet_phantom",
    "make_brats_phantom",
    "make_hecktor_phantom",
    "phantom_generator",
    "write_nifti",
]

# Public name -> submodule that defines it (resolved on first access, PEP 562).
_LAZY = {
    "brats_affine": "brain",
    "brats_phantom_case": "brain",
    "make_brats_phantom": "brain",
    "autopet_phantom_case": "petct",
    "hecktor_phantom_case": "petct",
    "make_autopet_phantom": "petct",
    "make_hecktor_phantom": "petct",
}

# Phantom name (as the CLI spells it) -> (module, generator function).
PHANTOMS = {
    "brats": ("brain", "make_brats_phantom"),
    "autopet": ("petct", "make_autopet_phantom"),
    "hecktor": ("petct", "make_hecktor_phantom"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class PhantomCase:
    """One generated case in memory, before it is written in a dataset's layout.

    Attributes:
        images: modality (as in the task spec) -> array in the stored dtype and units.
        affines: modality -> voxel-to-RAS affine; key ``"label"`` for the label's grid.
        label: label map in the dataset's own values, on ``affines["label"]``'s grid.
        tissue: ground-truth anatomy on the label's grid, for checks and explanations: volume
            fractions (brain: csf, gm, wm) or boolean masks (PET/CT: lung, bone, muscle, ...).
    """

    images: dict[str, np.ndarray]
    affines: dict[str, np.ndarray]
    label: np.ndarray
    tissue: dict[str, np.ndarray] = field(default_factory=dict)


def phantom_generator(name: str):
    """The ``make_*_phantom`` function for a phantom name of :data:`PHANTOMS`."""
    if name not in PHANTOMS:
        raise CimlError(f"unknown phantom {name!r}; choose one of {', '.join(PHANTOMS)}")
    module, function = PHANTOMS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


# --------------------------------------------------------------------------------------------------
# Randomness and soft shapes
# --------------------------------------------------------------------------------------------------


def case_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one case that depends only on (seed, keys), not on how many cases are made.

    So case 7 of a 10-case phantom equals case 7 of a 100-case phantom with the same seed.
    """
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], correlation_vox: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with the given correlation length (in voxels).

    Drawn on a grid coarser by about half the correlation length, smoothed there and interpolated
    linearly: the same look as smoothing full-size white noise, at a fraction of the cost.
    """
    shape = tuple(int(s) for s in shape)
    step = max(1.0, correlation_vox / 2.0)
    coarse = tuple(int(np.ceil((s - 1) / step)) + 2 for s in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 1.0, mode="wrap")
    field = resize_linear(field, shape)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def resize_linear(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of ``array`` onto ``shape``, first and last samples aligned on every axis.

    Same result as ``scipy.ndimage.zoom(order=1, grid_mode=False)``, but separable with two gathers per
    axis, so upsampling a coarse lattice to a full volume costs a few passes over the output.
    """
    out = np.asarray(array, dtype=np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        if m == n:
            continue
        if m == 1:
            out = np.repeat(out, n, axis=axis)
            continue
        position = np.linspace(0.0, m - 1.0, int(n))
        low = np.minimum(position.astype(np.intp), m - 2)
        weight = (
            (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        )
        below = np.take(out, low, axis=axis)
        out = below + (np.take(out, low + 1, axis=axis) - below) * weight
    return out


def soft_inside(signed_distance_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Occupancy in [0, 1] from a signed distance (negative inside): a partial-volume edge.

    ``width_mm`` of about a third of a voxel makes a boundary voxel's value close to the fraction of
    it that lies inside, which is what a scanner integrates.
    """
    x = np.clip(signed_distance_mm / np.float32(width_mm), -30.0, 30.0)
    return (1.0 / (1.0 + np.exp(x))).astype(np.float32, copy=False)


def axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about coordinate axis 0, 1 or 2 (right-handed)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation if axis != 1 else rotation.T


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A 3x3 rotation with each Euler angle uniform in +-max_degrees."""
    angles = rng.uniform(-max_degrees, max_degrees, size=3)
    return axis_rotation(2, angles[2]) @ axis_rotation(1, angles[1]) @ axis_rotation(0, angles[0])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def check_output_root(out_dir: str | Path) -> Path:
    """The output folder as a Path; an existing non-folder there is an error, not something to replace."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ParameterError("out", f"{out}: exists and is not a folder; choose another")
    return out


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` as NIfTI at ``path`` atomically: a temporary name in the same folder, then rename.

    A crash or Ctrl-C leaves either the old file or the new one, never a truncated ``.nii.gz``. Both
    qform and sform carry the affine (code 1, scanner), as converters such as dcm2niix write them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path


def to_int16(values: np.ndarray) -> np.ndarray:
    """Round to int16, clipped to its range (scanner images are stored as integers)."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(values), info.min, info.max).astype(np.int16)
