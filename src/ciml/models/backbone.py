"""nnU-Net-style U-Net parts (2D or 3D), shared by CIML's segmentors and the baselines.

Per level: two conv-InstanceNorm-LeakyReLU blocks (the first strided to downsample, except at full
resolution); the decoder upsamples with transposed convolutions and concatenates the skip features.
The encoder and decoder are separate modules so CIML can add messages to the skips in between.

Deep supervision (nnU-Net's): the decoder may carry auxiliary 1x1 heads on its outputs at the coarser
resolutions, whose logits training supervises against downsampled targets with the weights of
:func:`deep_supervision_weights`. Which levels get heads is :func:`deep_supervision_levels`.

Example:
    >>> net = UNet(in_channels=4, out_channels=3, widths=(8, 16, 32), spatial_dims=3)
    >>> net(torch.zeros(1, 4, 16, 16, 16)).shape
    torch.Size([1, 3, 16, 16, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def conv(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1
) -> nn.Module:
    """A plain convolution with 'same' padding for odd kernels."""
    return _CONV[spatial_dims](
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
    )


def maybe_checkpoint(fn, *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``fn(*args)``, recomputed in backward instead of keeping its activations when ``enabled``.

    Activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): only the
    block's inputs stay alive between forward and backward; the block runs twice. Values and gradients
    are the same. No effect without gradients (inference).
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def deep_supervision_levels(levels: int) -> tuple[int, ...]:
    """Decoder levels supervised by auxiliary heads for a U-Net of ``levels`` levels (0 = full resolution).

    nnU-Net supervises every decoder output except the lowest one (its weight is zeroed), and the
    bottleneck has no output: all but the two lowest resolutions. Level 0 is the main head, so the
    auxiliary levels are ``1 .. levels - 3`` (none for fewer than 4 levels).

    Example:
        >>> deep_supervision_levels(5), deep_supervision_levels(4), deep_supervision_levels(3)
        ((1, 2), (1,), ())
    """
    return tuple(range(1, levels - 2))


def deep_supervision_weights(scales: int) -> tuple[float, ...]:
    """Loss weights of scales ``0 .. scales - 1`` (0: full resolution): 1 / 2^i, normalised to sum 1.

    nnU-Net's weights, with its zero-weighted lowest decoder output left out (it has no head here).

    Example:
        >>> deep_supervision_weights(3)  # 1, 1/2, 1/4 over 7/4
        (0.5714285714285714, 0.2857142857142857, 0.14285714285714285)
    """
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")
    raw = [1.0 / 2**i for i in range(scales)]
    total = sum(raw)
    return tuple(w / total for w in raw)


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """InstanceNorm (affine) computed as a GroupNorm with one channel per group, on a contiguous input.

    GroupNorm's kernel is about twice as fast as InstanceNorm's on a CPU, and its output is not a view,
    so the activation can work in place. In channels_last_3d its backward pass is about 5x slower than
    in the contiguous layout, far more than the copy costs (benchmarks/results/conv_layout_cpu.md).
    """
    return F.group_norm(x.contiguous(), x.shape[1], weight=weight, bias=bias, eps=eps)


class InstanceNorm(nn.GroupNorm):
    """:func:`instance_norm` as a module, with GroupNorm's ``weight``/``bias`` parameters."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)


class ConvNormAct(nn.Sequential):
    """Conv (3x3[x3]) -> InstanceNorm (affine) -> LeakyReLU(0.01), nnU-Net's basic block."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            conv(spatial_dims, in_channels, out_channels, kernel_size=3, stride=stride),
            InstanceNorm(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Stage(nn.Sequential):
    """Two ConvNormAct blocks; the first one may downsample with its stride."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, stride=stride),
            ConvNormAct(spatial_dims, out_channels, out_channels),
        )


class UNetEncoder(nn.Module):
    """Returns the features of every level, full resolution first, bottleneck last."""

    def __init__(self, in_channels: int, widths: Sequence[int], spatial_dims: int) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.stages = nn.ModuleList(
            Stage(spatial_dims, channels[i], channels[i + 1], stride=1 if i == 0 else 2)
            for i in range(len(widths))
        )
        self.checkpoint_activations = False  # recompute each stage in backward (see maybe_checkpoint)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = maybe_checkpoint(stage, x, enabled=self.checkpoint_activations)
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """Upsamples from the bottleneck, concatenating each level's skip, and ends in a 1x1 head.

    With ``deep_supervision``, ``deep_heads[i]`` is a 1x1 head on the output of decoder level
    ``deep_supervision_levels(len(widths))[i]`` (created after ``head``, so the other parameters are
    initialised as without them).
    """

    def __init__(
        self, widths: Sequence[int], out_channels: int, spatial_dims: int, deep_supervision: bool = False
    ) -> None:
        super().__init__()
        levels = len(widths)
        self.upsample = nn.ModuleList(
            _TRANSPOSED_CONV[spatial_dims](widths[i + 1], widths[i], kernel_size=2, stride=2)
            for i in range(levels - 1)
        )
        self.stages = nn.ModuleList(Stage(spatial_dims, 2 * widths[i], widths[i]) for i in range(levels - 1))
        self.head = conv(spatial_dims, widths[0], out_channels)
        self.deep_levels = deep_supervision_levels(levels) if deep_supervision else ()
        self.deep_heads = nn.ModuleList(conv(spatial_dims, widths[i], out_channels) for i in self.deep_levels)
        self.checkpoint_activations = False  # recompute each level in backward (see maybe_checkpoint)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode(skips)[0]

    def decode(
        self, skips: Sequence[torch.Tensor], deep: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The main logits and, when ``deep``, the auxiliary heads' logits (finest scale first)."""
        x = skips[-1]
        deep_logits = {}
        for level in reversed(range(len(skips) - 1)):
            x = maybe_checkpoint(self._level, x, skips[level], level, enabled=self.checkpoint_activations)
            if deep and level in self.deep_levels:
                deep_logits[level] = self.deep_heads[self.deep_levels.index(level)](x)
        return self.head(x), [deep_logits[level] for level in self.deep_levels if level in deep_logits]

    def _level(self, x: torch.Tensor, skip: torch.Tensor, level: int) -> torch.Tensor:
        return self.stages[level](torch.cat([self.upsample[level](x), skip], dim=1))


class UNet(nn.Module):
    """Encoder + decoder; input sizes must be divisible by ``2 ** (len(widths) - 1)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        spatial_dims: int = 3,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.encoder = UNetEncoder(in_channels, widths, spatial_dims)
        self.decoder = UNetDecoder(widths, out_channels, spatial_dims, deep_supervision)

    @property
    def checkpoint_activations(self) -> bool:
        """Recompute encoder stages and decoder levels in backward instead of keeping activations."""
        return self.encoder.checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        self.encoder.checkpoint_activations = self.decoder.checkpoint_activations = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def decode(self, x: torch.Tensor, deep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and, when ``deep``, the auxiliary heads' logits (see :meth:`UNetDecoder.decode`)."""
        return self.decoder.decode(self.encoder(x), deep)
