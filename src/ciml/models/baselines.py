"""Networks that see all modalities stacked as channels: the joint U-Net and MONAI's SegResNet.

Both predict every region from one network ("joint learning", nnU-Net's region-based setup), so they
cannot run when a modality is missing; they say so instead of inventing the channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from monai.networks.nets import SegResNet
from torch import nn

from ciml.errors import CimlError
from ciml.models.backbone import UNet
from ciml.models.output import SegmentationOutput


class StackedModalityNet(nn.Module):
    """Wraps a network mapping [B, M, *spatial] -> [B, R, *spatial] into the common output."""

    segmentor_name = "joint"

    def __init__(self, network: nn.Module, modalities: Sequence[str], regions: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.modalities = tuple(modalities)
        self.regions = tuple(regions)

    def forward(
        self, x: torch.Tensor, present: Iterable[str] | None = None, **_: object
    ) -> SegmentationOutput:
        if present is not None and set(present) != set(self.modalities):
            missing = sorted(set(self.modalities) - set(present))
            raise CimlError(
                f"the {self.segmentor_name} model needs every modality and cannot run without "
                f"{', '.join(missing)}; "
                "use a CIML model for missing-modality inference"
            )
        if x.shape[1] != len(self.modalities):
            raise CimlError(f"input has {x.shape[1]} channels but the model expects {len(self.modalities)}")
        logits = self.network(x)
        return SegmentationOutput(
            logits={self.segmentor_name: logits},
            owned={self.segmentor_name: self.regions},
            kl=x.new_zeros((), dtype=torch.float32),
        )


class JointUNet(StackedModalityNet):
    """One U-Net on all modalities stacked as channels, all regions."""

    def __init__(
        self, modalities: Sequence[str], regions: Sequence[str], widths: Sequence[int], spatial_dims: int
    ):
        super().__init__(UNet(len(modalities), len(regions), widths, spatial_dims), modalities, regions)

    @property
    def checkpoint_activations(self) -> bool:
        """Recompute encoder stages and decoder levels in backward (see UNet.checkpoint_activations)."""
        return self.network.checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        self.network.checkpoint_activations = enabled


class SegResNetPeer(StackedModalityNet):
    """MONAI's SegResNet (BraTS tutorial configuration, scaled by ``init_filters``) as an external peer."""

    segmentor_name = "segresnet"

    def __init__(
        self, modalities: Sequence[str], regions: Sequence[str], widths: Sequence[int], spatial_dims: int
    ):
        levels = len(widths)
        network = SegResNet(
            spatial_dims=spatial_dims,
            init_filters=widths[0],
            in_channels=len(modalities),
            out_channels=len(regions),
            blocks_down=((1, 2, 2) + (4,) * levels)[:levels],
            blocks_up=(1,) * (levels - 1),
            norm=("GROUP", {"num_groups": min(8, widths[0])}),
        )
        super().__init__(network, modalities, regions)
