"""The run folder: what training leaves behind and what prediction reads.

Layout (like nnU-Net's results folder, one run for all folds)::

    RUN/
      run.json             task spec, model config, preprocessing plan, data source, training settings
      splits_final.json    5-fold patient-level split, editable before training a fold
      fold_K/
        checkpoint_last.pt checkpoint_best.pt log.jsonl progress.png
        postprocessing.json  the rule chosen on the fold's validation cases and the comparison behind it
        tile.json          the inference tile chosen on the same cases and the comparison behind it

Example:
    >>> run = RunFolder("runs/brats")          # doctest: +SKIP
    >>> model = run.load_model(fold=0, which="best")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ciml.errors import CimlError
from ciml.files import write_json_atomic
from ciml.inferers import Postprocessing
from ciml.models import SegmentationNetwork, check_state_dict, model_from_config
from ciml.runs import load_checkpoint
from ciml.tasks import TaskSpec

RUN_FILE = "run.json"
SPLITS_FILE = "splits_final.json"
POSTPROCESSING_FILE = "postprocessing.json"
TILE_FILE = "tile.json"
CHECKPOINTS = ("last", "best")


class RunFolder:
    """Paths and files of one run; reading validates and names the file on any problem."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def info_path(self) -> Path:
        return self.path / RUN_FILE

    @property
    def splits_path(self) -> Path:
        return self.path / SPLITS_FILE

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    def checkpoint(self, fold: int, which: str = "last") -> Path:
        if which not in CHECKPOINTS:
            raise CimlError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
        return self.fold_dir(fold) / f"checkpoint_{which}.pt"

    def postprocessing_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / POSTPROCESSING_FILE

    def read_postprocessing(self, fold: int) -> Postprocessing | None:
        """The postprocessing chosen on the fold's validation cases; None for a fold trained without one.

        Raises:
            CimlError: the file is not valid JSON or its rule is malformed (named with the key).
        """
        path = self.postprocessing_path(fold)
        if not path.is_file():
            return None
        data = _read_json(path)
        if not isinstance(data, dict) or "rule" not in data:
            raise CimlError(f"{path}: missing 'rule'")
        return Postprocessing.from_dict(data["rule"], source=f"{path}: rule")

    def tile_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / TILE_FILE

    def read_tile(self, fold: int) -> tuple[int, int, int] | None:
        """The inference tile chosen on the fold's validation cases; None for a fold trained without one.

        Raises:
            CimlError: the file is not valid JSON or its ``tile`` is not 3 positive integers.
        """
        path = self.tile_path(fold)
        if not path.is_file():
            return None
        data = _read_json(path)
        tile = data.get("tile") if isinstance(data, dict) else None
        if not (isinstance(tile, list) and len(tile) == 3 and all(type(t) is int and t > 0 for t in tile)):
            raise CimlError(f"{path}: 'tile' must be 3 positive integers, got {tile!r}")
        return (tile[0], tile[1], tile[2])

    def folds(self) -> list[int]:
        """Folds that have at least a last checkpoint."""
        found = []
        for child in sorted(self.path.glob("fold_*")):
            suffix = child.name.removeprefix("fold_")
            if suffix.isdigit() and (child / "checkpoint_last.pt").is_file():
                found.append(int(suffix))
        return sorted(found)

    def write_info(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.info_path, info)

    def read_info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            raise CimlError(f"{self.path}: not a ciml run folder (no {RUN_FILE})")
        info = _read_json(self.info_path)
        for key in ("task", "model"):
            if key not in info:
                raise CimlError(f"{self.info_path}: missing '{key}'")
        return info

    def spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self.read_info()["task"], source=str(self.info_path))

    def load_model(
        self,
        fold: int,
        which: str = "last",
        map_location: str | torch.device = "cpu",
        expected: dict[str, Any] | None = None,
    ) -> tuple[SegmentationNetwork, dict[str, Any]]:
        """The fold's network with its weights, in eval mode, and the checkpoint's state.

        ``expected`` is run.json's model config when the caller has read it already.

        Raises:
            CimlError: missing checkpoint, unsafe file, or a checkpoint that does not belong to this run
                (another task or architecture): named, not a shape traceback.
        """
        path = self.checkpoint(fold, which)
        if not path.is_file():
            available = ", ".join(f"fold_{f}" for f in self.folds()) or "none"
            raise CimlError(f"{path}: checkpoint not found (folds with checkpoints: {available})")
        state = load_checkpoint(path, map_location=map_location)
        expected = self.read_info()["model"] if expected is None else expected
        if state["config"] != expected:
            differing = sorted(
                k for k in set(expected) | set(state["config"]) if expected.get(k) != state["config"].get(k)
            )
            raise CimlError(
                f"{path}: checkpoint does not match {self.info_path} (differs in: {', '.join(differing)})"
            )
        model = model_from_config(state["config"])
        try:  # names the format versions, not a shape traceback
            check_state_dict(model, state["model"])
        except CimlError as exc:
            raise CimlError(f"{path}: {exc}") from None
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CimlError(f"{path}: weights do not fit the model in its config ({first})") from None
        return model.eval(), state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CimlError(f"{path}: not valid JSON ({exc})") from None
