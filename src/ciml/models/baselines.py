"""Networks that see all modalities stacked as channels: the joint U-Net and MONAI's SegResNet.

Both predict every region from one network ("joint learning", nnU-Net's region-based setup). By default
they cannot run when a modality is missing and say so instead of inventing the channel. Built with
``zero_fill_missing`` (training with modality dropout does so, since its batches zero the dropped
channels), they run on any subset with the absent channels set to zero: the standard missing-modality
baseline, so the 15-subset comparison with CIML is like for like.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from monai.networks.nets import SegResNet
from torch import nn

from ciml.errors import CimlError
from ciml.models.backbone import UNet
from ciml.models.interface import MissingModalities, SegmentationNetwork
from ciml.models.output import SegmentationOutput


class StackedModalityNet(SegmentationNetwork):
    """Wraps a network mapping [B, M, *spatial] -> [B, R, *spatial] into the common output."""

    segmentor_name = "joint"

    def __init__(
        self,
        network: nn.Module,
        modalities: Sequence[str],
        regions: Sequence[str],
        size_divisor: int,
        zero_fill_missing: bool = False,
        **interface: object,
    ) -> None:
        super().__init__(modalities, **interface)
        self.network = network
        self.regions = tuple(regions)
        self._size_divisor = size_divisor
        self.zero_fill_missing = zero_fill_missing

    @property
    def missing_modalities(self) -> MissingModalities:
        return MissingModalities.ZERO_FILL if self.zero_fill_missing else MissingModalities.UNSUPPORTED

    @property
    def owners(self) -> dict[str, tuple[str, ...]]:
        return {r: (self.segmentor_name,) for r in self.regions}

    @property
    def primary_inputs(self) -> dict[str, tuple[str, ...]]:
        return {self.segmentor_name: self.modalities}

    @property
    def size_divisor(self) -> int:
        return self._size_divisor

    def forward(
        self, x: torch.Tensor, present: Iterable[str] | None = None, **_: object
    ) -> SegmentationOutput:
        self.check_present(present)
        if x.shape[1] != len(self.modalities):
            raise CimlError(f"input has {x.shape[1]} channels but the model expects {len(self.modalities)}")
        if present is not None and set(present) != set(self.modalities):
            x = x.clone()
            x[:, [i for i, m in enumerate(self.modalities) if m not in set(present)]] = 0.0  # as in training
        logits, deep = self._logits(x)
        return SegmentationOutput(
            logits={self.segmentor_name: logits},
            owned={self.segmentor_name: self.regions},
            kl=x.new_zeros((), dtype=torch.float32),
            deep_logits={self.segmentor_name: deep} if deep else {},
        )

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The network's logits and its deep-supervision logits (none unless a subclass has them)."""
        return self.network(x), []


class JointUNet(StackedModalityNet):
    """One U-Net on all modalities stacked as channels, all regions.

    With ``deep_supervision`` its decoder has auxiliary heads (see
    :func:`~ciml.models.backbone.deep_supervision_levels`), whose logits training mode returns.
    """

    supports_deep_supervision = True

    def __init__(
        self,
        modalities: Sequence[str],
        regions: Sequence[str],
        widths: Sequence[int],
        spatial_dims: int,
        zero_fill_missing: bool = False,
        deep_supervision: bool = False,
        **interface: object,
    ):
        network = UNet(len(modalities), len(regions), widths, spatial_dims, deep_supervision)
        super().__init__(
            network,
            modalities,
            regions,
            2 ** (len(widths) - 1),
            zero_fill_missing,
            deep_supervision=deep_supervision,
            **interface,
        )

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.deep_supervision and self.training:
            return self.network.decode(x, deep=True)
        return self.network(x), []

    @property
    def checkpoint_activations(self) -> bool:
        """Recompute encoder stages and decoder levels in backward (see UNet.checkpoint_activations)."""
        return self.network.checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        self.network.checkpoint_activations = enabled


class SegResNetPeer(StackedModalityNet):
    """MONAI's SegResNet (BraTS tutorial configuration, scaled by ``init_filters``) as an external peer.

    No deep supervision (``supports_deep_supervision`` is False): MONAI's SegResNet returns only its
    full-resolution output (its deep-supervised variant is a different network, SegResNetDS).
    """

    segmentor_name = "segresnet"

    def __init__(
        self,
        modalities: Sequence[str],
        regions: Sequence[str],
        widths: Sequence[int],
        spatial_dims: int,
        zero_fill_missing: bool = False,
        deep_supervision: bool = False,
        **interface: object,
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
        super().__init__(  # deep_supervision=True is refused by the interface (not supported)
            network,
            modalities,
            regions,
            2 ** (levels - 1),
            zero_fill_missing,
            deep_supervision=deep_supervision,
            **interface,
        )
