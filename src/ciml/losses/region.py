"""The CIML loss: sum over segmentors of (BCE + soft Dice) on the regions each owns, plus beta * KL.

Every term is reported separately so logs show what the optimiser is trading off. A segmentor's fallback
channels (regions it stands in for, the spec's ``fallback_owners``) get the same BCE + soft Dice against
those regions' targets, reported apart as ``seg/<segmentor>/fallback`` and added to the segmentation sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ciml.errors import CimlError
from ciml.models.output import SegmentationOutput


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice per channel over batch and voxels (nnU-Net's batch Dice), averaged over channels."""
    probabilities = torch.sigmoid(logits.float())
    dims = [0, *range(2, logits.dim())]
    intersection = (probabilities * target).sum(dims)
    denominator = probabilities.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


@dataclass
class LossTerms:
    """The total loss and each of its terms (detached floats for logging in ``as_dict``).

    ``per_segmentor`` maps a segmentor to its owned regions' term and ``<segmentor>/fallback`` to its
    fallback channels' term.
    """

    total: torch.Tensor
    segmentation: torch.Tensor
    kl: torch.Tensor
    per_segmentor: dict[str, torch.Tensor] = field(default_factory=dict)
    per_gate: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        out = {"loss": self.total, "seg": self.segmentation, "kl": self.kl}
        out.update({f"seg/{k}": v for k, v in self.per_segmentor.items()})
        out.update({f"kl/{k}": v for k, v in self.per_gate.items()})
        return {k: float(v.detach()) for k, v in out.items()}


#: Weight of the KL (bottleneck) term unless a run asks for another; chosen on ShapeComposition
#: by ``benchmarks/beta_sweep.py``.
DEFAULT_BETA = 1e-3


class CIMLLoss(torch.nn.Module):
    """Region loss for any network's :class:`SegmentationOutput`.

    Args:
        region_names: order of the target's channels (the task spec's regions), each named once.
        beta: weight of the KL (bottleneck) term, finite and >= 0 (a negative weight would reward
            information instead of charging for it).

    Raises:
        CimlError: repeated region names, or a negative or non-finite ``beta``.
    """

    def __init__(self, region_names: Sequence[str], beta: float = DEFAULT_BETA) -> None:
        super().__init__()
        names = tuple(region_names)
        repeated = sorted({r for r in names if names.count(r) > 1})
        if repeated:
            raise CimlError(f"region names must be unique, got {list(names)} (repeated: {repeated})")
        beta = float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise CimlError(f"beta (the weight of the KL term) must be finite and >= 0, got {beta}")
        self.index = {r: i for i, r in enumerate(names)}
        self.beta = beta

    def forward(self, output: SegmentationOutput, target: torch.Tensor) -> LossTerms:
        """``target``: binary region masks [B, R, *spatial] in ``region_names`` order.

        Raises:
            ValueError: ``target`` does not have one channel per region (an extra channel, such as a
                background channel in front, would otherwise shift every region silently).
        """
        if target.dim() < 2 or target.shape[1] != len(self.index):
            raise ValueError(
                f"target of shape {tuple(target.shape)} must have one channel per region "
                f"({len(self.index)}: {', '.join(self.index)}) along dim 1"
            )
        per_segmentor = {
            name: self._region_loss(logits, output.owned[name], target)
            for name, logits in output.logits.items()
        }
        for name, logits in output.fallback_logits.items():
            per_segmentor[f"{name}/fallback"] = self._region_loss(logits, output.fallback[name], target)
        segmentation = sum(per_segmentor.values(), target.new_zeros((), dtype=torch.float32))
        total = segmentation + self.beta * output.kl if self.beta else segmentation
        return LossTerms(total, segmentation, output.kl, per_segmentor, dict(output.kl_terms))

    def _region_loss(
        self, logits: torch.Tensor, regions: Sequence[str], target: torch.Tensor
    ) -> torch.Tensor:
        """BCE + soft Dice of ``logits`` against the target channels of ``regions``."""
        selected = target[:, [self.index[r] for r in regions]].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.float(), selected.float())
        return bce + soft_dice_loss(logits, selected)
