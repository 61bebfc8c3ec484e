"""Choosing the torch device from a ``device`` name (one rule for training, prediction, explanation)."""

from __future__ import annotations

import torch

from ciml.errors import ParameterError


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a fallback.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: under torchrun, the GPU of this process (overrides N and becomes the current device).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ParameterError("device", f"must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{name}: torch sees no CUDA device here; use cpu or auto")
        if local_rank is not None:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
    return torch.device(name)


MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def resolve_memory_format(name: str, device: torch.device, spatial_dims: int) -> torch.memory_format:
    """The tensor layout a network runs in: ``auto`` -> ``channels_last_3d`` for 3D networks on a CPU.

    On a CPU, oneDNN's grouped 3D convolutions (CIML's segmentors run as one) are several times faster
    in channels_last_3d, and whole training steps take 0.63-0.84 of the time
    (benchmarks/results/conv_layout_cpu.md). On CUDA ``auto`` keeps the contiguous layout: not measured.
    The layout changes float rounding only, never what is computed.
    """
    if name not in MEMORY_FORMATS:
        raise ParameterError("memory_format", f"must be one of {', '.join(MEMORY_FORMATS)}, got {name!r}")
    if name == "auto":
        name = "channels_last" if device.type == "cpu" and spatial_dims == 3 else "contiguous"
    if name == "channels_last":
        if spatial_dims != 3:
            raise ParameterError(
                "memory_format", f"channels_last is for 3D networks, this one is {spatial_dims}D"
            )
        return torch.channels_last_3d
    return torch.contiguous_format
