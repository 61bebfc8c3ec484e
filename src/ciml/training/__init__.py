"""Training: the loop, its schedule and exactly-resumable checkpoints."""

from ciml.training.checkpoint import load_checkpoint, save_checkpoint
from ciml.training.loop import Batch, TrainConfig, Trainer, poly_lr

__all__ = ["Batch", "TrainConfig", "Trainer", "load_checkpoint", "poly_lr", "save_checkpoint"]
