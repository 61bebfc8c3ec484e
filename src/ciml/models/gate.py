"""The cross-modality information gate (CIG): attention decides what passes, a bottleneck charges for it.

For a message from sender n to receiver m at one level (DESIGN section 4):

    v      = phi(e_n)                       value (1x1 conv of the sender's features)
    lambda = sigmoid(psi([e_m ; e_n]))      cross-modal spatial attention, one channel per voxel
    train: z = lambda * v + (1 - lambda) * eps,  eps ~ N(mu, sd^2)  (per-channel batch statistics of v)
    eval:  z = lambda * v + (1 - lambda) * mu                       (running statistics)
    kl     = 0.5 * ((1 - lambda)^2 + (lambda * u)^2 - 1) - log(1 - lambda),  u = (v - mu) / sd

lambda = 0 sends nothing (z is the prior mean, KL 0); lambda -> 1 passes v exactly at unbounded cost.
The message added to the receiver is rho(z), rho a zero-initialised 1x1 conv, so a fresh gate changes
nothing and training adds only what pays. The per-voxel bottleneck follows Schulz et al. (ICLR 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ciml.models.backbone import conv
from ciml.models.grouped import grouped_pointwise, stacked

LAMBDA_MAX = 1.0 - 1e-4  # keeps log(1 - lambda) finite; a gate this open costs ~9.2 nats per channel


@dataclass
class GateOutput:
    """What one gate produced for one forward pass.

    Attributes:
        message: rho(z), to be added to the receiver's features [B, C_receiver, *spatial].
        kl_map: information sent, nats per voxel summed over channels [B, 1, *spatial].
        attention: lambda [B, 1, *spatial].
    """

    message: torch.Tensor
    kl_map: torch.Tensor
    attention: torch.Tensor


def gaussian_bottleneck_kl(attention: torch.Tensor, standardized_value: torch.Tensor) -> torch.Tensor:
    """Closed-form KL( N(lambda*v + (1-lambda)*mu, (1-lambda)^2 sd^2) || N(mu, sd^2) ) per voxel and channel.

    Args:
        attention: lambda in [0, 1), broadcastable to ``standardized_value``.
        standardized_value: u = (v - mu) / sd.
    """
    lam = attention.clamp(0.0, LAMBDA_MAX)
    return 0.5 * ((1.0 - lam) ** 2 + (lam * standardized_value) ** 2 - 1.0) - torch.log1p(-lam)


def bottleneck(
    value: torch.Tensor,
    attention: torch.Tensor,
    running_mean: torch.Tensor,
    running_std: torch.Tensor,
    training: bool,
    channel_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """z and its KL map (summed over channels, kept as a size-1 dim) for one lambda per voxel.

    The prior is per channel (every dim from 1 to ``channel_dim``): the batch statistics of ``value``
    while training (detached; returned so the caller can update its running averages), else the running
    ones. Because lambda has one channel, the channel sum of :func:`gaussian_bottleneck_kl` is
    ``C * (0.5 * ((1 - lambda)^2 - 1) - log(1 - lambda)) + 0.5 * lambda^2 * |u|^2``, so only |u|^2 is
    computed per channel, from the same centred values as the variance: at full resolution the gates'
    cost is memory traffic, and this keeps it to a few passes.

    Args:
        value: v, channels along ``channel_dim``.
        attention: lambda, size 1 along ``channel_dim``.
        running_mean, running_std: the evaluation prior, shaped ``value.shape[1 : channel_dim + 1]``.
        training: use batch statistics and sample eps ~ N(mu, sd^2); else use the running mu.

    Returns:
        (z, KL map, (batch mean, batch sd) while training else None).
    """
    prior_shape = value.shape[1 : channel_dim + 1]
    broadcast = (1, *prior_shape) + (1,) * (value.dim() - channel_dim - 1)
    eps = torch.randn_like(value) if training else None
    z, squared_norm, mean, std = _Bottleneck.apply(
        value,
        attention.to(value.dtype),
        running_mean.view(broadcast),
        running_std.view(broadcast),
        eps,
        channel_dim,
    )
    lam = attention.to(squared_norm.dtype).clamp(0.0, LAMBDA_MAX)
    channels = value.shape[channel_dim]
    kl = channels * (0.5 * ((1.0 - lam) ** 2 - 1.0) - torch.log1p(-lam)) + 0.5 * lam**2 * squared_norm
    batch_stats = (mean.reshape(prior_shape), std.reshape(prior_shape)) if training else None
    return z, kl, batch_stats


class _Bottleneck(torch.autograd.Function):
    """z = lambda * v + (1 - lambda) * (mu + sd * eps) and |u|^2 = sum_c ((v - mu) / sd)^2, fused.

    With ``eps`` (training) the prior is the batch's per-channel statistics, else the given running
    ones; either way they are constants for the gradient. Written out, the backward pass needs two
    saved tensors and five passes over the per-voxel values instead of autograd's nine: at full
    resolution the gates are memory-bound, so this is most of their cost. Per-voxel tensors stay in
    value's dtype (bf16 under autocast); statistics and channel sums are float32.

    Returns:
        (z, |u|^2 with a size-1 channel dim, mu, sd), mu and sd shaped like the running statistics.
    """

    @staticmethod
    def forward(
        ctx,
        value: torch.Tensor,
        attention: torch.Tensor,
        running_mean: torch.Tensor,
        running_std: torch.Tensor,
        eps: torch.Tensor | None,
        channel_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = value.dtype
        accumulate = torch.promote_types(dtype, torch.float32)  # statistics: float32 at least
        dims = [0, *range(channel_dim + 1, value.dim())]
        mean = running_mean if eps is None else value.mean(dim=dims, keepdim=True, dtype=accumulate)
        centered = value - mean.to(dtype)
        squared = centered * centered
        if eps is None:
            std = running_std
        else:
            count = value.numel() // mean.numel()
            variance = squared.mean(dim=dims, keepdim=True, dtype=accumulate) * (count / max(count - 1, 1))
            std = variance.sqrt().clamp_min(1e-5)
        inverse_variance = std.square().reciprocal().to(dtype)
        squared_norm = squared.mul_(inverse_variance).sum(dim=channel_dim, keepdim=True, dtype=accumulate)
        # difference = v - noise; z = v - (1 - lambda) * (v - noise)
        difference = centered if eps is None else torch.addcmul(centered, eps, std.to(dtype), value=-1.0)
        z = torch.addcmul(value, 1.0 - attention, difference, value=-1.0)
        ctx.save_for_backward(attention, centered, difference, inverse_variance)
        ctx.channel_dim = channel_dim
        ctx.mark_non_differentiable(mean, std)
        return z, squared_norm, mean, std

    @staticmethod
    def backward(
        ctx, grad_z: torch.Tensor | None, grad_squared_norm: torch.Tensor | None, *_stats_grads: None
    ) -> tuple[torch.Tensor | None, ...]:
        attention, centered, difference, inverse_variance = ctx.saved_tensors
        dtype = centered.dtype
        grad_value = grad_attention = None
        if grad_squared_norm is not None:
            grad_value = centered * (2.0 * inverse_variance) * grad_squared_norm.to(dtype)
        if grad_z is not None:
            grad_value = grad_z * attention if grad_value is None else grad_value.addcmul_(grad_z, attention)
            grad_attention = (grad_z * difference).sum(dim=ctx.channel_dim, keepdim=True)
        return grad_value, grad_attention, None, None, None, None


class InformationGate(nn.Module):
    """One CIG for one message (sender -> receiver) at one level.

    Args:
        channels: feature channels of sender and receiver at this level.
        spatial_dims: 2 or 3.
        attention_channels: hidden channels of the attention branch psi (default: channels // 2, >= 4).
            psi is a per-voxel two-layer 1x1 network, as in Attention U-Net's gates: the encoder
            features it reads already carry spatial context, and a 3x3 kernel made the gates cost more
            than the segmentors themselves.
        momentum: update rate of the running prior statistics, as BatchNorm's.
        message_channels: channels of the value v and the message latent z (default: ``channels``).
            Fewer channels make a narrower bottleneck (still charged nat by nat against the prior)
            and the gates' per-voxel tensors proportionally smaller.
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int,
        attention_channels: int | None = None,
        momentum: float = 0.1,
        message_channels: int | None = None,
    ) -> None:
        super().__init__()
        hidden = attention_channels or max(4, channels // 2)
        latent = message_channels or channels
        self.value = conv(spatial_dims, channels, latent)
        self.attention = nn.Sequential(
            conv(spatial_dims, 2 * channels, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            conv(spatial_dims, hidden, 1),
        )
        self.project = conv(spatial_dims, latent, channels)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(latent))
        self.register_buffer("running_std", torch.ones(latent))

    def forward(self, receiver: torch.Tensor, sender: torch.Tensor, closed: bool = False) -> GateOutput:
        value = self.value(sender)
        if closed:
            attention = torch.zeros_like(value[:, :1])
        else:
            attention = torch.sigmoid(self.attention(torch.cat([receiver, sender], dim=1)))
        z, kl, batch_stats = bottleneck(value, attention, self.running_mean, self.running_std, self.training)
        if batch_stats is not None:
            self.update_prior(*batch_stats)
        return GateOutput(self.project(z), kl, attention)

    def silent_message(self, like: torch.Tensor) -> torch.Tensor:
        """The message of an absent sender: z at the prior mean (lambda = 0), broadcast like ``like``."""
        shape = (1, -1) + (1,) * (like.dim() - 2)
        z = self.running_mean.view(shape).to(like.dtype)
        return self.project(z).expand_as(like)

    @torch.no_grad()
    def update_prior(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Move the running prior towards a batch's statistics, as BatchNorm's running averages."""
        self.running_mean.lerp_(mean.float(), self.momentum)
        self.running_std.lerp_(std.float(), self.momentum)


@dataclass
class GroupedGateOutput:
    """What a bank of gates produced (see :func:`grouped_gates`); P gates, R receivers.

    Attributes:
        messages: per receiver, the sum of its messages [B, R * C, *spatial].
        kl_maps: per gate, nats per voxel summed over channels [B, P, *spatial].
        attention: per gate, lambda [B, P, *spatial].
    """

    messages: torch.Tensor
    kl_maps: torch.Tensor
    attention: torch.Tensor


def grouped_gates(
    gates: Sequence[InformationGate],
    receivers: torch.Tensor,
    senders: torch.Tensor,
    sender_slots: Sequence[int],
    closed: bool = False,
    recompute: bool = False,
) -> GroupedGateOutput:
    """Run P gates at one level as a few grouped convolutions; the same maths as calling each gate.

    The gates are ordered receiver by receiver, every receiver with the same number of senders; gate p
    reads receiver ``p // (P / R)`` and the sender in channel group ``sender_slots[p]`` of ``senders``.
    psi's first layer acts on [e_m ; e_n], so it splits into a receiver half (one grouped convolution over
    the receivers) and a sender half, computed together with the value phi in one convolution per gate.
    The messages into one receiver are summed by one convolution over its gates' z (their rho weights
    side by side), so the per-gate messages are never materialised.

    Args:
        gates: the P gates, receiver-major.
        receivers: receivers' features [B, R * C, *spatial].
        senders: candidate senders' features [B, S * C, *spatial].
        sender_slots: for each gate, the group of its sender in ``senders``.
        closed: force lambda = 0 (no information flows).
        recompute: when gradients are on, keep none of the bank's per-voxel tensors for backward and
            recompute them there from the features (which the segmentors keep anyway), with the same
            noise (:func:`torch.utils.checkpoint.checkpoint`, RNG state preserved). Same values and
            gradients; the gates then hold almost no memory between forward and backward.
    """
    count = len(gates)
    receiver_count = receivers.shape[1] // gates[0].value.in_channels
    if (count // receiver_count) * receiver_count != count or len(sender_slots) != count:
        raise ValueError(f"{count} gates do not split evenly over {receiver_count} receivers")
    training = gates[0].training
    if recompute and torch.is_grad_enabled():
        # one recomputed bank per receiver: backward then holds one receiver's gate tensors at a time
        per_receiver = count // receiver_count
        parts = [
            torch.utils.checkpoint.checkpoint(
                _gate_bank,
                gates[r * per_receiver : (r + 1) * per_receiver],
                own,
                senders,
                sender_slots[r * per_receiver : (r + 1) * per_receiver],
                closed,
                training,
                use_reentrant=False,
                preserve_rng_state=receivers.device.type != "meta",
            )
            for r, own in enumerate(receivers.chunk(receiver_count, dim=1))
        ]
        joined = [
            torch.cat(tensors, dim=0 if i > 2 else 1) for i, tensors in enumerate(zip(*parts, strict=True))
        ]
        messages, kl, attention, *stats = joined  # statistics [P, C] join along gates, maps along channels
    else:
        messages, kl, attention, *stats = _gate_bank(
            gates, receivers, senders, sender_slots, closed, training
        )
    if training:  # outside the recomputed function: the running prior moves once per forward
        for gate, mean, std in zip(gates, *stats, strict=True):
            gate.update_prior(mean, std)
    return GroupedGateOutput(messages, kl.squeeze(2), attention.squeeze(2))


def _gate_bank(
    gates: Sequence[InformationGate],
    receivers: torch.Tensor,
    senders: torch.Tensor,
    sender_slots: Sequence[int],
    closed: bool,
    training: bool,
) -> tuple[torch.Tensor, ...]:
    """(messages, KL maps, attention) and, while training, the batch prior statistics (mean, sd)."""
    count, channels = len(gates), gates[0].value.in_channels
    latent = gates[0].value.out_channels
    receiver_count = receivers.shape[1] // channels
    per_receiver = count // receiver_count
    sender_features = senders.unflatten(1, (-1, channels))[:, list(sender_slots)].flatten(1, 2)
    first_psi = [gate.attention[0] for gate in gates]
    # value phi (and psi's sender half unless closed) from each gate's sender, as one grouped conv
    weights = [
        g.value.weight if closed else torch.cat([g.value.weight, a.weight[:, channels:]])
        for g, a in zip(gates, first_psi, strict=True)
    ]
    biases = [
        g.value.bias if closed else torch.cat([g.value.bias, a.bias])
        for g, a in zip(gates, first_psi, strict=True)
    ]
    sender_side = grouped_pointwise(
        sender_features, stacked(weights), stacked(biases), groups=count
    ).unflatten(1, (count, -1))
    if closed:
        value = sender_side
        attention = value.new_zeros(value.shape[:2] + (1,) + value.shape[3:])
    else:
        value, sender_half = sender_side.split([latent, sender_side.shape[2] - latent], dim=2)
        receiver_half = stacked([a.weight[:, :channels] for a in first_psi])
        hidden = sender_half + grouped_pointwise(receivers, receiver_half, groups=receiver_count).unflatten(
            1, (count, -1)
        )
        hidden = F.leaky_relu(hidden, gates[0].attention[1].negative_slope).flatten(1, 2)
        second_psi = [gate.attention[2] for gate in gates]
        logits = grouped_pointwise(
            hidden,
            stacked([c.weight for c in second_psi]),
            stacked([c.bias for c in second_psi]),
            groups=count,
        )
        attention = torch.sigmoid(logits).unsqueeze(2)
    running_mean = torch.stack([g.running_mean for g in gates])
    running_std = torch.stack([g.running_std for g in gates])
    z, kl, batch_stats = bottleneck(value, attention, running_mean, running_std, training, 2)
    project_weight = torch.cat(
        [
            torch.cat([g.project.weight for g in gates[r * per_receiver : (r + 1) * per_receiver]], dim=1)
            for r in range(receiver_count)
        ]
    )
    project_bias = (
        torch.stack([g.project.bias for g in gates]).unflatten(0, (receiver_count, -1)).sum(1).flatten()
    )
    messages = grouped_pointwise(z.flatten(1, 2), project_weight, project_bias, groups=receiver_count)
    return (messages, kl, attention, *(batch_stats or ()))
