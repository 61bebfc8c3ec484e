"""Run several structurally identical U-Net parts as one grouped computation.

CIML's segmentors (and the ensemble's members) have the same architecture and different weights. Run
one after another, N narrow networks launch N times the kernels of one wide network and keep the device
busy with small convolutions. Here the N copies' weights are concatenated along the output channels at
each call and the features of all copies travel as one tensor [B, N * C, *spatial]: each convolution is
one grouped convolution (``groups=N``), each InstanceNorm one call (it is per channel anyway). The
parameters stay in the per-segmentor modules, so checkpoints, optimizers and explanations are unchanged,
and autograd routes each copy's gradient back to its own weights.

Example:
    >>> from ciml.models.backbone import UNetEncoder
    >>> encoders = [UNetEncoder(1, (4, 8), spatial_dims=2) for _ in range(3)]
    >>> [f.shape[1] for f in grouped_encoder(torch.randn(2, 3, 16, 16), encoders)]
    [12, 24]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ciml.models.backbone import UNetDecoder, UNetEncoder, instance_norm, maybe_checkpoint

CONV_FN = {2: F.conv2d, 3: F.conv3d}
TRANSPOSED_CONV_FN = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


def stacked(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Concatenate per-copy parameters (a single copy is used as is: no copy, no extra kernel)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def grouped_conv(x: torch.Tensor, convs: Sequence[nn.Module]) -> torch.Tensor:
    """Apply ``convs[g]`` to channel group ``g`` of ``x``: one grouped convolution."""
    first = convs[0]
    bias = stacked([c.bias for c in convs]) if first.bias is not None else None
    return CONV_FN[x.dim() - 2](
        x,
        stacked([c.weight for c in convs]),
        bias,
        stride=first.stride,
        padding=first.padding,
        groups=len(convs),
    )


def grouped_pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1
) -> torch.Tensor:
    """A grouped 1x1 convolution as one batched matrix product.

    Same result as ``conv3d(x, weight, bias, groups=groups)`` for 1x1 kernels, but CPU backends run
    grouped 1x1 convolutions through a slow generic path while batched GEMM is fast everywhere.

    Args:
        x: [B, groups * C_in, *spatial].
        weight: [groups * C_out, C_in, 1, ...].
        bias: [groups * C_out] or None.
    """
    batch, spatial = x.shape[0], x.shape[2:]
    matrices = weight.reshape(groups, -1, weight.shape[1])
    columns = x.reshape(batch * groups, weight.shape[1], -1)
    matrices = matrices.expand(batch, -1, -1, -1).reshape(batch * groups, -1, weight.shape[1])
    if bias is None:
        out = torch.bmm(matrices, columns)
    else:
        out = torch.baddbmm(
            bias.reshape(1, groups, -1, 1).expand(batch, -1, -1, -1).reshape(batch * groups, -1, 1),
            matrices,
            columns,
        )
    return out.reshape(batch, -1, *spatial)


def grouped_transposed_conv(x: torch.Tensor, convs: Sequence[nn.Module]) -> torch.Tensor:
    """Transposed-convolution counterpart of :func:`grouped_conv` (the decoder's upsampling)."""
    first = convs[0]
    return TRANSPOSED_CONV_FN[x.dim() - 2](
        x,
        stacked([c.weight for c in convs]),
        stacked([c.bias for c in convs]),
        stride=first.stride,
        padding=first.padding,
        output_padding=first.output_padding,
        groups=len(convs),
    )


def grouped_conv_norm_act(x: torch.Tensor, blocks: Sequence[nn.Sequential]) -> torch.Tensor:
    """:class:`~ciml.models.backbone.ConvNormAct` (conv, InstanceNorm, LeakyReLU) for every copy."""
    norms = [block[1] for block in blocks]
    x = grouped_conv(x, [block[0] for block in blocks])
    weight, bias = stacked([n.weight for n in norms]), stacked([n.bias for n in norms])
    x = instance_norm(x, weight, bias, norms[0].eps)
    return F.leaky_relu(x, blocks[0][2].negative_slope, inplace=True)


def grouped_stage(x: torch.Tensor, stages: Sequence[nn.Sequential]) -> torch.Tensor:
    """A :class:`~ciml.models.backbone.Stage` (two ConvNormAct blocks) for every copy."""
    for block in range(len(stages[0])):
        x = grouped_conv_norm_act(x, [stage[block] for stage in stages])
    return x


def interleave(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """Per group, ``a``'s channels then ``b``'s: what ``torch.cat([a_g, b_g], 1)`` gives for each copy."""
    return torch.cat([a.unflatten(1, (groups, -1)), b.unflatten(1, (groups, -1))], dim=2).flatten(1, 2)


def grouped_encoder(x: torch.Tensor, encoders: Sequence[UNetEncoder]) -> list[torch.Tensor]:
    """Every encoder on its own input channels (``x`` holds them in encoder order); features per level."""
    features = []
    enabled = encoders[0].checkpoint_activations
    for level in range(len(encoders[0].stages)):
        stages = [encoder.stages[level] for encoder in encoders]
        x = maybe_checkpoint(lambda x, stages=stages: grouped_stage(x, stages), x, enabled=enabled)
        features.append(x)
    return features


def grouped_decoder(skips: Sequence[torch.Tensor], decoders: Sequence[UNetDecoder]) -> list[torch.Tensor]:
    """Every decoder on its own skips (grouped like the encoder's features); each decoder's logits.

    The 1x1 heads may differ in output channels (owned + fallback regions), so they run per decoder.
    """
    return grouped_decode(skips, decoders)[0]


def grouped_decode(
    skips: Sequence[torch.Tensor], decoders: Sequence[UNetDecoder], deep: bool = False
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """:func:`grouped_decoder`, plus each decoder's deep-supervision logits when ``deep``.

    The grouped counterpart of :meth:`UNetDecoder.decode`: per decoder, the main logits and the
    auxiliary heads' logits (finest scale first; empty lists without ``deep`` or without heads).
    """
    groups = len(decoders)
    x = skips[-1]
    deep_levels = decoders[0].deep_levels if deep else ()
    deep_logits: list[dict[int, torch.Tensor]] = [{} for _ in decoders]

    def decoder_level(x: torch.Tensor, skip: torch.Tensor, level: int) -> torch.Tensor:
        x = grouped_transposed_conv(x, [d.upsample[level] for d in decoders])
        return grouped_stage(interleave(x, skip, groups), [d.stages[level] for d in decoders])

    for level in reversed(range(len(skips) - 1)):
        x = maybe_checkpoint(
            decoder_level, x, skips[level], level, enabled=decoders[0].checkpoint_activations
        )
        if level in deep_levels:
            head = deep_levels.index(level)
            for out, decoder, features in zip(deep_logits, decoders, x.chunk(groups, dim=1), strict=True):
                out[level] = decoder.deep_heads[head](features)
    logits = [
        decoder.head(features) for decoder, features in zip(decoders, x.chunk(groups, dim=1), strict=True)
    ]
    return logits, [[out[level] for level in deep_levels] for out in deep_logits]
