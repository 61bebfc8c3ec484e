"""What every network returns: region logits per segmentor, plus the gates' information when asked."""

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
    """

    logits: dict[str, torch.Tensor]
    owned: dict[str, tuple[str, ...]]
    kl: torch.Tensor
    kl_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def predictable_regions(self, region_names: Sequence[str]) -> list[str]:
        """Regions that at least one segmentor in this output predicts."""
        covered = {r for regions in self.owned.values() for r in regions}
        return [r for r in region_names if r in covered]

    def region_probabilities(self, region_names: Sequence[str]) -> torch.Tensor:
        """Mean of the owners' sigmoid outputs per region, [B, R, *spatial] in ``region_names`` order.

        A region that no segmentor of this output predicts (all its owners' modalities missing) is NaN,
        so it can never pass for a prediction.
        """
        some = next(iter(self.logits.values()))
        shape = (some.shape[0], len(region_names), *some.shape[2:])
        total = torch.zeros(shape, dtype=torch.float32, device=some.device)
        count = torch.zeros(len(region_names), dtype=torch.float32, device=some.device)
        index = {r: i for i, r in enumerate(region_names)}
        for name, logits in self.logits.items():
            probabilities = torch.sigmoid(logits.float())
            for channel, region in enumerate(self.owned[name]):
                total[:, index[region]] += probabilities[:, channel]
                count[index[region]] += 1
        view = (1, -1) + (1,) * (total.dim() - 2)
        return total / count.view(view)  # 0 / 0 -> NaN for regions nobody predicts
