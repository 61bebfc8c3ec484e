"""Load a case's modalities and label onto one grid, through ciml's one image reader.

Every file is read by :mod:`ciml.data.io` (the reader check-data, evaluation and the writers use), so
training and prediction refuse exactly what check-data refuses; this module only wraps its array and
RAS affine as the MONAI ``MetaTensor`` the spatial transforms need, and resamples modalities whose grid
differs from the first one's (HECKTOR's PET and CT) in physical space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

from ciml.data.cases import Case
from ciml.data.io import ImageHeader, ImageReadError, load_image, read_header, select_volume
from ciml.data.preprocessing.plan import PreprocessingError
from ciml.tasks.spec import TaskSpec

# Two grids count as one when shapes match and affines agree to within this many millimetres.
GRID_ATOL = 1e-3
_Read = TypeVar("_Read")


def load_volume(path: str | Path, volume: int | None = None) -> MetaTensor:
    """One 3D image as a ``[1, X, Y, Z]`` float32 MetaTensor with its RAS affine.

    The voxels and affine come from :func:`ciml.data.io.load_image`, the reader check-data uses, so
    training and prediction refuse exactly the files check-data refuses; MONAI's spatial transforms
    need the affine on the tensor, hence the MetaTensor. ``volume`` picks one volume of a 4D file (MSD
    keeps a case's modalities in one file).

    Raises:
        PreprocessingError: the reader refuses the file (its message), or the file is not one 3D image
            (4D with ``volume``) or holds NaN/inf.
    """
    return _as_volume(*_read(load_image, path), volume)


def _as_volume(array: np.ndarray, header: ImageHeader, volume: int | None) -> MetaTensor:
    """A file's voxels (all volumes) as the MetaTensor of one 3D volume, checked."""
    if volume is not None:
        try:
            array, header = select_volume(array, header, volume)
        except ImageReadError as exc:
            raise PreprocessingError(str(exc)) from None
    volume = _single_volume(array, header)
    if not np.isfinite(volume).all():
        raise PreprocessingError(f"{header.path}: contains NaN or infinite values")
    return MetaTensor(
        torch.from_numpy(volume[None]), affine=torch.as_tensor(header.affine, dtype=torch.float64)
    )


def read_geometry(path: str | Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and 3D shape from the header, without reading voxels (except DICOM folders)."""
    header = _read(read_header, path)
    if len(header.spacing) != 3:
        raise PreprocessingError(f"{header.path}: expected a 3D image, got shape {header.shape}")
    return header.affine, header.spatial_shape  # type: ignore[return-value]


def _read(reader: Callable[[Path], _Read], path: str | Path) -> _Read:
    """``reader(path)``, its refusal re-raised as a PreprocessingError with the reader's message."""
    try:
        return reader(Path(path))
    except ImageReadError as exc:
        raise PreprocessingError(str(exc)) from None


def _single_volume(array: np.ndarray, header: ImageHeader) -> np.ndarray:
    """The ``[X, Y, Z]`` voxels as float32, dropping the trailing length-1 axis of a one-volume 4D NIfTI."""
    if len(header.spacing) == 3 and array.shape[3:] == (1,):
        array = array[..., 0]
    if len(header.spacing) != 3 or array.ndim != 3:
        raise PreprocessingError(
            f"{header.path}: expected a single-channel 3D image, got array shape {tuple(array.shape)}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass
class LoadedCase:
    """A case's modalities stacked on the reference grid, before reorientation."""

    image: MetaTensor  # [M, X, Y, Z]
    label: MetaTensor | None  # [1, X, Y, Z], dataset label values
    bodies: dict[str, np.ndarray]  # modality -> body mask on the reference grid
    reference: str
    missing: list[str]


def present_modalities(case: Case, spec: TaskSpec, allow_missing: bool) -> list[str]:
    present = [m for m in spec.modalities if m in case.images]
    missing = [m for m in spec.modalities if m not in case.images]
    if (missing and not allow_missing) or not present:
        raise PreprocessingError(f"case {case.case_id}: no image for modality {', '.join(missing)}")
    return present


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return a.shape[1:] == b.shape[1:] and np.allclose(a.affine.numpy(), b.affine.numpy(), atol=GRID_ATOL)


def _body_mask(values: np.ndarray, kind: str, ct_threshold: float) -> np.ndarray:
    """Voxels that belong to the subject: nonzero, or above the air threshold for CT."""
    return values > ct_threshold if kind == "ct" else values != 0


def load_case(case: Case, spec: TaskSpec, ct_threshold: float, allow_missing: bool) -> LoadedCase:
    present = present_modalities(case, spec, allow_missing)
    files: dict[Path, tuple[np.ndarray, ImageHeader]] = {}  # a 4D file (MSD) is read once per case

    def load(m: str) -> MetaTensor:
        path = Path(case.images[m])
        if path not in files:
            files[path] = _read(load_image, path)
        return _as_volume(*files[path], case.volumes.get(m))

    reference = load(present[0])
    channels, bodies = [], {}
    for m, kind in spec.modalities.items():
        if m not in present:
            channels.append(np.zeros(reference.shape[1:], dtype=np.float32))
            continue
        vol = reference if m == present[0] else load(m)
        if not _same_grid(vol, reference):
            # Outside a modality's field of view: air for CT, no signal for the others.
            padding = "border" if kind == "ct" else "zeros"
            vol = ResampleToMatch(mode="bilinear", padding_mode=padding, dtype=torch.float32)(vol, reference)
        channels.append(vol.as_tensor()[0].numpy().astype(np.float32, copy=False))
        bodies[m] = _body_mask(channels[-1], kind, ct_threshold)
    image = MetaTensor(torch.from_numpy(np.stack(channels)), affine=reference.affine.clone())
    label = None if case.label is None else _load_label(case.label, spec, reference)
    missing = [m for m in spec.modalities if m not in present]
    return LoadedCase(image, label, bodies, present[0], missing)


def _load_label(path: Path, spec: TaskSpec, reference: MetaTensor) -> MetaTensor:
    label = load_volume(path)
    values = np.unique(label.as_tensor().numpy())
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise PreprocessingError(f"{path}: label values must be integers, found {fractional[:5].tolist()}")
    unexpected = sorted(set(values.astype(np.int64).tolist()) - set(spec.label_values))
    if unexpected:
        raise PreprocessingError(
            f"{path}: unexpected label values {unexpected} (task {spec.name} uses {list(spec.label_values)})"
        )
    if not _same_grid(label, reference):
        label = ResampleToMatch(mode="nearest", padding_mode="zeros", dtype=torch.float32)(label, reference)
    return MetaTensor(label.as_tensor().float(), affine=reference.affine.clone())
