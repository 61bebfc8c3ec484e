"""Training: the loop, its schedule and the engine behind `ciml train` (checkpoints: :mod:`ciml.runs`)."""

from ciml.training.loop import Batch, TrainConfig, Trainer, make_optimizer, poly_lr

__all__ = ["Batch", "TrainConfig", "Trainer", "make_optimizer", "poly_lr"]
