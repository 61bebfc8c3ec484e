"""Information maps: how many nats each message m<-n carried, voxel by voxel (the gates' exact view).

Every information gate reports its KL map at its level's resolution (nats per voxel of that level, summed
over channels; DESIGN section 4), and the loss's KL term is the mean of each map, summed over messages and
levels. To show one map per message on the image grid, each level's map is upsampled by *nearest-neighbour
replication* (every coarse voxel copied onto the fine voxels it covers) and the levels are added. The mean
of a message's map over the grid is then exactly that message's share of the loss's KL term, and the
means over all messages add up to it; smoother interpolation would break that identity.

Example:
    >>> output, maps = information_maps_of(model, x)       # doctest: +SKIP
    >>> maps["flair<-t2"].shape                             # [B, 1, *x.shape[2:]]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ciml.models.output import SegmentationOutput


def message_name(receiver: str, sender: str) -> str:
    """Name of the message receiver <- sender over all levels (a gate key without its level)."""
    return f"{receiver}<-{sender}"


def parse_gate_key(key: str) -> tuple[int, str, str]:
    """``"level/receiver<-sender"`` -> (level, receiver, sender); see :func:`ciml.models.gate_key`."""
    level, _, message = key.partition("/")
    receiver, _, sender = message.partition("<-")
    if not level.isdigit() or not receiver or not sender:
        raise ValueError(f"not a gate key: {key!r} (expected 'level/receiver<-sender')")
    return int(level), receiver, sender


def upsample_replicate(level_map: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Copy each voxel of ``level_map`` [B, C, *s] onto the block of ``spatial_shape`` it covers.

    Raises:
        ValueError: ``spatial_shape`` is not an integer multiple of the map's shape along every axis.
    """
    shape = tuple(int(s) for s in spatial_shape)
    coarse = tuple(level_map.shape[2:])
    if len(shape) != len(coarse) or any(f % c for f, c in zip(shape, coarse, strict=True)):
        raise ValueError(f"grid {shape} is not an integer multiple of the level grid {coarse}")
    if shape == coarse:
        return level_map
    return F.interpolate(level_map, size=shape, mode="nearest")


def information_totals(output: SegmentationOutput) -> dict[str, float]:
    """Message -> nats per voxel it sent, summed over levels: its share of ``output.kl``."""
    totals: dict[str, float] = {}
    for key, term in output.kl_terms.items():
        _, receiver, sender = parse_gate_key(key)
        name = message_name(receiver, sender)
        totals[name] = totals.get(name, 0.0) + float(term)
    return totals


def information_maps(output: SegmentationOutput, spatial_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """Message -> KL map [B, 1, *spatial_shape] in nats per voxel, summed over the message's levels.

    ``output`` must come from a forward pass with ``return_maps=True``; the maps are detached, float32.
    """
    maps: dict[str, torch.Tensor] = {}
    for key, level_map in output.kl_maps.items():
        _, receiver, sender = parse_gate_key(key)
        name = message_name(receiver, sender)
        upsampled = upsample_replicate(level_map.detach().float(), spatial_shape)
        maps[name] = upsampled if name not in maps else maps[name] + upsampled
    return maps


def information_maps_of(
    model: nn.Module, x: torch.Tensor, present: Iterable[str] | None = None
) -> tuple[SegmentationOutput, dict[str, torch.Tensor]]:
    """One forward pass of ``model`` on ``x`` without gradients: its output and every message's map.

    Put the model in eval mode first (in training mode the gates sample noise and update their running
    statistics). Networks without gates (joint, ensemble, no messages) give an empty mapping.
    """
    with torch.no_grad():
        output = model(x, present=present, return_maps=True)
    return output, information_maps(output, x.shape[2:])
