"""The CIML loss: sum over segmentors of (BCE + soft Dice) on the regions each owns, plus beta * KL.

Every term is reported separately so logs show what the optimiser is trading off. A segmentor's fallback
channels (regions it stands in for, the spec's ``fallback_owners``) get the same BCE + soft Dice against
those regions' targets, reported apart as ``seg/<segmentor>/fallback`` and added to the segmentation sum.

Deep supervision (nnU-Net's weighted multi-scale loss): when the output carries deep-supervision logits
(``deep_logits`` / ``deep_fallback_logits``, scales 1, 2, ...), each segmentor's term is instead
sum_i w_i * (BCE + soft Dice)(logits at scale i, target at scale i) over scales i = 0 (full resolution,
the main logits) and the auxiliary ones, with w_i = 1 / 2^i normalised to sum 1
(:func:`~ciml.models.deep_supervision_weights`). Targets are max-pooled to each scale
(:func:`downsample_target`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ciml.errors import CimlError
from ciml.models.backbone import deep_supervision_weights
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


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Binary region masks [B, R, *spatial] max-pooled to ``shape`` (the logits' spatial size).

    A coarse voxel is in a region when any of the fine voxels it covers is (kernel = stride = the
    integer factor per axis, the cells the strided encoder convolutions tile). Max rather than
    nnU-Net's nearest-neighbour sampling: a structure smaller than the cell (a thin enhancing rim, a
    small lesion) is never dropped by the grid phase, and nesting of regions (ET in TC in WT) is kept.

    Raises:
        ValueError: a target size that is not an integer multiple of ``shape``.
    """
    spatial = tuple(target.shape[2:])
    shape = tuple(int(n) for n in shape)
    if spatial == shape:
        return target
    if len(shape) != len(spatial) or any(n <= 0 or t % n for t, n in zip(spatial, shape, strict=True)):
        raise ValueError(f"target size {spatial} is not an integer multiple of the logits' size {shape}")
    factors = tuple(t // n for t, n in zip(spatial, shape, strict=True))
    pool = F.max_pool3d if len(shape) == 3 else F.max_pool2d if len(shape) == 2 else F.max_pool1d
    return pool(target.float(), kernel_size=factors, stride=factors).to(target.dtype)


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
        targets: dict[tuple[int, ...], torch.Tensor] = {}  # target per scale, pooled once
        per_segmentor = {
            name: self._scaled_loss(
                logits, output.deep_logits.get(name, []), output.owned[name], target, targets
            )
            for name, logits in output.logits.items()
        }
        for name, logits in output.fallback_logits.items():
            deep = output.deep_fallback_logits.get(name, [])
            per_segmentor[f"{name}/fallback"] = self._scaled_loss(
                logits, deep, output.fallback[name], target, targets
            )
        segmentation = sum(per_segmentor.values(), target.new_zeros((), dtype=torch.float32))
        total = segmentation + self.beta * output.kl if self.beta else segmentation
        return LossTerms(total, segmentation, output.kl, per_segmentor, dict(output.kl_terms))

    def _scaled_loss(
        self,
        logits: torch.Tensor,
        deep: Sequence[torch.Tensor],
        regions: Sequence[str],
        target: torch.Tensor,
        targets: dict[tuple[int, ...], torch.Tensor],
    ) -> torch.Tensor:
        """The region loss of ``logits``, or with ``deep`` logits nnU-Net's weighted sum over scales."""
        if not deep:
            return self._region_loss(logits, regions, target)
        weights = deep_supervision_weights(1 + len(deep))
        total = weights[0] * self._region_loss(logits, regions, target)
        for weight, scale_logits in zip(weights[1:], deep, strict=True):
            shape = tuple(scale_logits.shape[2:])
            if shape not in targets:
                targets[shape] = downsample_target(target, shape)
            total = total + weight * self._region_loss(scale_logits, regions, targets[shape])
        return total

    def _region_loss(
        self, logits: torch.Tensor, regions: Sequence[str], target: torch.Tensor
    ) -> torch.Tensor:
        """BCE + soft Dice of ``logits`` against the target channels of ``regions``."""
        selected = target[:, [self.index[r] for r in regions]].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.float(), selected.float())
        return bce + soft_dice_loss(logits, selected)
