"""What every network returns: region logits per segmentor, plus the gates' information when asked
(and, in training, deep-supervision logits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationOutput:
    """Output of any ciml network.

    Attributes:
        logits: segmentor name -> logits [B, len(owned[name]), *spatial] of the regions it owns.
        owned: segmentor name -> region names, in the order of the logits' channels.
        kl: the bottleneck term of the loss: mean over voxels of the channel-summed KL, summed over
            messages and levels (0 for networks without gates).
        kl_terms: gate key ("level/receiver<-sender") -> that gate's share of ``kl``.
        kl_maps: gate key -> KL map [B, 1, *level_spatial] (nats per voxel), when maps were requested.
        attention_maps: gate key -> lambda [B, 1, *level_spatial], when maps were requested.
        fallback_logits: segmentor name -> logits [B, len(fallback[name]), *spatial] of the regions it
            stands in for (the spec's ``fallback_owners``); kept apart from ``logits`` so that ``owned``
            keeps meaning "regions it owns".
        fallback: segmentor name -> region names of its ``fallback_logits`` channels, in order.
        deep_logits: segmentor name -> auxiliary deep-supervision logits of its owned regions, one
            tensor [B, len(owned[name]), *spatial / 2^i] per scale i = 1, 2, ... (finest first). Only in
            training mode of a network built with deep supervision; empty otherwise, and never part of
            predictions (those come from ``logits`` alone).
        deep_fallback_logits: the same for its fallback channels (``fallback[name]``).
    """

    logits: dict[str, torch.Tensor]
    owned: dict[str, tuple[str, ...]]
    kl: torch.Tensor
    kl_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: dict[str, tuple[str, ...]] = field(default_factory=dict)
    deep_logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    deep_fallback_logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def predictable_regions(self, region_names: Sequence[str]) -> list[str]:
        """Regions that at least one segmentor in this output predicts, as owner or as fallback."""
        covered = {r for regions in (*self.owned.values(), *self.fallback.values()) for r in regions}
        return [r for r in region_names if r in covered]

    def region_probabilities(self, region_names: Sequence[str]) -> torch.Tensor:
        """Mean of the owners' sigmoid outputs per region, [B, R, *spatial] in ``region_names`` order.

        A region no owner of this output predicts takes the mean of its fallback channels instead (never
        mixed with owners, which know the region better). A region with neither (all its owners' and
        fallback owners' modalities missing) is NaN, so it can never pass for a prediction.
        """
        total, count = self._mean_parts(self.logits, self.owned, region_names)
        if self.fallback_logits:
            stand_in, stand_in_count = self._mean_parts(self.fallback_logits, self.fallback, region_names)
            orphan = count == 0
            total[:, orphan], count[orphan] = stand_in[:, orphan], stand_in_count[orphan]
        view = (1, -1) + (1,) * (total.dim() - 2)
        return total / count.view(view)  # 0 / 0 -> NaN for regions nobody predicts

    def _mean_parts(
        self,
        logits: dict[str, torch.Tensor],
        regions: dict[str, tuple[str, ...]],
        region_names: Sequence[str],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of sigmoid outputs [B, R, *spatial] and number of contributing channels [R] per region."""
        some = next(iter((*self.logits.values(), *self.fallback_logits.values())))
        shape = (some.shape[0], len(region_names), *some.shape[2:])
        total = torch.zeros(shape, dtype=torch.float32, device=some.device)
        count = torch.zeros(len(region_names), dtype=torch.float32, device=some.device)
        index = {r: i for i, r in enumerate(region_names)}
        for name, values in logits.items():
            probabilities = torch.sigmoid(values.float())
            for channel, region in enumerate(regions[name]):
                if region in index:
                    total[:, index[region]] += probabilities[:, channel]
                    count[index[region]] += 1
        return total, count
