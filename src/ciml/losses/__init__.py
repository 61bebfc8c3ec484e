"""Losses: per-segmentor region loss (BCE + soft Dice) plus the weighted bottleneck term."""

from ciml.losses.region import DEFAULT_BETA, CIMLLoss, LossTerms, downsample_target, soft_dice_loss

__all__ = ["DEFAULT_BETA", "CIMLLoss", "LossTerms", "downsample_target", "soft_dice_loss"]
