"""A trained run, loaded once: task spec, preprocessing plan, patch size and the fold networks.

Prediction, robustness sweeps and explanations all start from the same files, so they share one loader
that reads run.json once, checks it once and names the file on any problem.

Example:
    >>> trained = load_trained_run("runs/brats", folds=[0], checkpoint="best")  # doctest: +SKIP
    >>> trained.spec.name, trained.patch_size, len(trained.models)  # doctest: +SKIP
    ('brats2020', (64, 64, 64), 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ciml.data.preprocessing import PreprocessingPlan
from ciml.devices import resolve_device
from ciml.errors import CimlError
from ciml.inferers import tile_text
from ciml.models import SegmentationNetwork
from ciml.runs.folder import CHECKPOINTS, RunFolder
from ciml.tasks import TaskSpec


@dataclass(frozen=True)
class TrainedRun:
    """What a trained run holds for inference: one network per loaded fold, all on ``device``."""

    folder: RunFolder
    info: dict[str, Any]
    spec: TaskSpec
    plan: PreprocessingPlan
    patch_size: tuple[int, int, int]
    folds: tuple[int, ...]
    checkpoint: str
    models: tuple[SegmentationNetwork, ...]
    device: torch.device
    tile: tuple[int, int, int] | None = None
    tile_source: str = "the training patch"

    @property
    def inference_tile(self) -> tuple[int, int, int]:
        """The sliding-window tile to predict with: the one given, else the one chosen on validation."""
        return self.tile or self.patch_size

    @property
    def network(self) -> SegmentationNetwork:
        """The first fold's network (every fold of a run is the same architecture)."""
        return self.models[0]


def load_trained_run(
    run: RunFolder | str | Path,
    folds: Sequence[int] | None = None,
    checkpoint: str = "last",
    device: str | torch.device = "auto",
    patch_size: Sequence[int] | None = None,
) -> TrainedRun:
    """Load a run folder's folds (all with a checkpoint when ``folds`` is None) for 3D inference.

    Args:
        run: the run folder.
        folds: folds to load, in order (duplicates dropped).
        checkpoint: ``last`` or ``best``.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
        patch_size: tile size to use instead of the one the run chose on its validation cases
            (``fold_K/tile.json``), or its training patch when it chose none.

    Raises:
        CimlError: not a run folder, no trained fold, a missing or mismatched checkpoint, a run.json
            without a preprocessing plan or a valid patch size, or a 2D run.
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    info = folder.read_info()
    spec = TaskSpec.from_dict(info["task"], source=str(folder.info_path))
    if "preprocessing" not in info:
        raise CimlError(f"{folder.info_path}: missing 'preprocessing' (the plan inference must repeat)")
    plan = PreprocessingPlan.from_dict(info["preprocessing"], source=f"{folder.info_path}: preprocessing")
    if checkpoint not in CHECKPOINTS:
        raise CimlError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    chosen = tuple(dict.fromkeys(int(f) for f in folds)) if folds else tuple(folder.folds())
    if not chosen:
        raise CimlError(f"{folder.path}: no trained fold (no fold_K/checkpoint_last.pt)")
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    models = tuple(
        folder.load_model(fold, checkpoint, map_location=torch_device, expected=info["model"])[0]
        for fold in chosen
    )
    dims = models[0].spatial_dims
    if dims != 3:
        raise CimlError(f"{folder.info_path}: a {dims}D model; prediction on volumes needs a 3D run")
    divisor = models[0].size_divisor
    if patch_size is not None:
        given = _patch_size(patch_size, "patch_size", divisor)
        return TrainedRun(
            folder, info, spec, plan, given, chosen, checkpoint, models, torch_device, given, "given"
        )
    patch = _patch_size(info.get("patch_size"), f"{folder.info_path}: 'patch_size'", divisor)
    tile, source = _validated_tile(folder, chosen, divisor)
    return TrainedRun(folder, info, spec, plan, patch, chosen, checkpoint, models, torch_device, tile, source)


def _validated_tile(
    folder: RunFolder, folds: Sequence[int], divisor: int
) -> tuple[tuple[int, int, int] | None, str]:
    """The tile the first of ``folds`` chose on its validation cases (``fold_K/tile.json``), with a note
    when the folds chose differently; (None, "the training patch") for a fold trained without a choice.
    """
    tiles = {fold: folder.read_tile(fold) for fold in folds}
    first = tiles[folds[0]]
    if len(set(tiles.values())) > 1:
        chosen = "; ".join(f"fold {f}: {_text(t)}" for f, t in tiles.items())
        print(f"note: the folds chose different tiles ({chosen}); using fold {folds[0]}'s", flush=True)
    if first is None:
        return None, "the training patch"
    tile = _patch_size(first, f"{folder.tile_path(folds[0])}: 'tile'", divisor)
    return tile, f"chosen on fold {folds[0]}'s validation cases"


def _text(tile: Sequence[int] | None) -> str:
    return "the training patch" if tile is None else tile_text(tile)


def _patch_size(value: Any, where: str, divisor: int) -> tuple[int, int, int]:
    try:
        patch = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        patch = ()
    if len(patch) != 3 or any(p <= 0 or p % divisor for p in patch):
        raise CimlError(f"{where} must be 3 positive integers divisible by {divisor}, got {value!r}")
    return patch  # type: ignore[return-value]
