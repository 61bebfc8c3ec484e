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
