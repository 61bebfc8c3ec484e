"""Run folders: the layout training writes, its checkpoints, and loading a trained run for every consumer."""

from ciml.runs.checkpoint import load_checkpoint, save_checkpoint
from ciml.runs.folder import CHECKPOINTS, POSTPROCESSING_FILE, RUN_FILE, SPLITS_FILE, RunFolder
from ciml.runs.trained import TrainedRun, load_trained_run

__all__ = [
    "CHECKPOINTS",
    "POSTPROCESSING_FILE",
    "RUN_FILE",
    "SPLITS_FILE",
    "RunFolder",
    "TrainedRun",
    "load_checkpoint",
    "load_trained_run",
    "save_checkpoint",
]
