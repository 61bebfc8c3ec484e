"""Checkpoints that restore a run exactly and load safely.

They hold only tensors and plain data, so they load with ``torch.load(weights_only=True)``: a file that
wants to unpickle arbitrary objects is refused. Writes go to a temporary file and are renamed over the
old one, so a kill while saving never corrupts the last good checkpoint.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ciml.errors import CimlError
from ciml.files import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically to ``path`` (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        torch.save(state, stream)
        stream.flush()
        os.fsync(stream.fileno())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without unpickling arbitrary objects.

    Raises:
        CimlError: missing, corrupt or unsafe file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CimlError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if unsafe:
            raise CimlError(
                f"{path}: refused: the checkpoint wants to unpickle arbitrary objects ({unsafe[0]}); "
                "ciml loads only tensors and plain data"
            ) from None
        raise CimlError(f"{path}: not a readable checkpoint (corrupt or not written by torch.save)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CimlError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CimlError(f"{path}: not a ciml checkpoint (no model weights and config)")
    return state
