"""Losses: per-segmentor region loss (BCE + soft Dice) plus the weighted bottleneck term."""

from ciml.losses.region import CIMLLoss, LossTerms, soft_dice_loss

__all__ = ["CIMLLoss", "LossTerms", "soft_dice_loss"]
