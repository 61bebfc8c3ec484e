"""Which part of a case is explained in one piece: the whole case when it fits in memory, else a
window around the predicted tumour; sizes padded to the network's divisor."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ciml.explain.gradcam import (
    GradCamResult,
)
from ciml.models import SegmentationNetwork

EXTENTS = ("auto", "case", "patch")
#: Peak memory of an explanation per voxel, per full-resolution channel (``widths[0]``) and per modality:
#: measured ~240 bytes on the demo (4 modalities, widths 8/16/32, 76x88x76 voxels, 4.5 GB peak on CPU).
BYTES_PER_VOXEL = 256
#: ``extent="auto"`` explains the whole case when its estimated memory stays below this.
DEFAULT_MEMORY_BYTES = 4 * 2**30
#: A window's tumour is located by one pass without gradients when the case is at most this many times the
#: explanation budget (measured: such a pass needs ~1/10 of the memory), else by tiles.
LOCATE_FACTOR = 8
Window = tuple[tuple[int, ...], tuple[int, ...]]


def default_max_voxels(model: SegmentationNetwork, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """Voxels one explanation of ``model`` can cover within ``memory_bytes`` (see :data:`BYTES_PER_VOXEL`)."""
    width = int(model.config["widths"][0])
    return int(memory_bytes // (BYTES_PER_VOXEL * width * len(model.modalities)))


def window_around(centre: Sequence[float], size: Sequence[int], shape: Sequence[int]) -> Window:
    """A window of ``size`` (at most ``shape``) centred on ``centre`` and moved inside the grid."""
    start, end = [], []
    for c, s, n in zip(centre, size, shape, strict=True):
        s = min(int(s), int(n))
        lo = int(round(c - s / 2))
        lo = min(max(lo, 0), n - s)
        start.append(lo)
        end.append(lo + s)
    return tuple(start), tuple(end)


def pad_to(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad the spatial dimensions of [1, M, *spatial] at their ends to multiples of ``divisor``."""
    pad: list[int] = []
    for size in reversed(x.shape[2:]):
        pad += [0, (-size) % divisor]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def paste(values: np.ndarray, shape: Sequence[int], window: Window) -> np.ndarray:
    """``values`` [..., *window size] placed into zeros of [..., *shape]."""
    out = np.zeros((*values.shape[:-3], *shape), dtype=values.dtype)
    start, end = window
    out[(..., *[slice(s, e) for s, e in zip(start, end, strict=True)])] = values
    return out


def placed(result: GradCamResult, size: Sequence[int], shape: Sequence[int], window: Window) -> GradCamResult:
    """The contributions with maps and masks cropped to ``size`` and placed on the full grid."""
    inside = tuple(slice(0, n) for n in size)

    def place(tensor: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(paste(tensor[inside].numpy(), shape, window))

    contributions = [
        dataclasses.replace(c, maps={m: place(v) for m, v in c.maps.items()}, mask=place(c.mask))
        for c in result.contributions
    ]
    return dataclasses.replace(result, contributions=contributions)
