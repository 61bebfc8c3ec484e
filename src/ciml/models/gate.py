"""The cross-modality information gate (CIG): attention decides what passes, a bottleneck charges for it.

For a message from sender n to receiver m at one level (DESIGN section 4):

    v      = phi(e_n)                       value (1x1 conv of the sender's features)
    lambda = sigmoid(psi([e_m ; e_n]))      cross-modal spatial attention, one channel per voxel
    train: z = lambda * v + (1 - lambda) * eps,  eps ~ N(mu, sd^2)  (per-channel batch statistics of v)
           eps = mu + sd * xi, xi ~ N(0, 1) drawn once per sender and level (:func:`sender_noise`)
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
from torch import nn

from ciml.models.backbone import conv
from ciml.models.grouped import grouped_pointwise, stacked

LAMBDA_MAX = 1.0 - 1e-4  # keeps log(1 - lambda) finite; a gate this open costs ~9.2 nats per channel
ATTENTION_SLOPE = 0.01  # psi's LeakyReLU


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
    noise: torch.Tensor | None = None,
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
        noise: while training, the standard-normal xi of eps = mu + sd * xi, shaped like ``value``
            (e.g. the sender's, shared by its gates: :func:`sender_noise`); drawn here when None.

    Returns:
        (z, KL map, (batch mean, batch sd) while training else None).
    """
    prior_shape = value.shape[1 : channel_dim + 1]
    broadcast = (1, *prior_shape) + (1,) * (value.dim() - channel_dim - 1)
    eps = (torch.randn_like(value) if noise is None else noise) if training else None
    z, squared_norm, mean, std = _Bottleneck.apply(
        value,
        attention.to(value.dtype),
        running_mean.view(broadcast),
        running_std.view(broadcast),
        eps,
        channel_dim,
    )
    kl = _kl(attention.to(squared_norm.dtype), squared_norm, value.shape[channel_dim])
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
            nn.LeakyReLU(ATTENTION_SLOPE, inplace=True),
            conv(spatial_dims, hidden, 1),
        )
        self.project = conv(spatial_dims, latent, channels)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(latent))
        self.register_buffer("running_std", torch.ones(latent))

    def forward(
        self,
        receiver: torch.Tensor,
        sender: torch.Tensor,
        closed: bool = False,
        noise: torch.Tensor | None = None,
    ) -> GateOutput:
        """The message receiver <- sender; ``noise``: the sender's xi while training (:func:`bottleneck`)."""
        value = self.value(sender)
        if closed:
            attention = torch.zeros_like(value[:, :1])
        else:
            attention = torch.sigmoid(self.attention(torch.cat([receiver, sender], dim=1)))
        z, kl, batch_stats = bottleneck(
            value, attention, self.running_mean, self.running_std, self.training, noise=noise
        )
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
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_std.lerp_(std.to(self.running_std.dtype), self.momentum)


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


def sender_noise(features: torch.Tensor, senders: int, latent: int) -> torch.Tensor:
    """xi ~ N(0, 1) [B, senders, latent, *spatial], batch and spatial shape those of ``features``.

    Every gate from a sender scales that sender's xi by its own prior (eps = mu + sd * xi), so each
    message has the prior's marginal noise. The messages into one receiver come from different senders,
    so their noises are independent, as the bottleneck's bound needs; messages from one sender to
    different receivers share it, which is harmless because the encoders are private (receivers never
    exchange what they received). Drawing normals was the gates' dearest per-voxel operation on a CPU
    (one draw per gate, again when recomputing): now one per sender, kept for backward. In the dtype the
    values have (autocast's, if on).
    """
    shape = (features.shape[0], senders, latent, *features.shape[2:])
    return torch.randn(shape, dtype=_compute_dtype(features), device=features.device)


@dataclass
class _BankWeights:
    """The parameters of P gates (receiver-major, R receivers), stacked once per forward pass.

    Every field stacks along dim 0 in receiver order, so a group of receivers' part is a view
    (:meth:`split`): the per-receiver banks and their recomputation reuse these stacks. ``receiver``,
    ``logit`` and ``logit_bias`` are None for closed gates (psi is not computed).
    """

    sender: torch.Tensor  # per gate phi, then psi's sender half [P * (L + H), C, 1, ...] (closed: phi)
    sender_bias: torch.Tensor
    receiver: torch.Tensor | None  # psi's receiver half [P * H, C, 1, ...]
    logit: torch.Tensor | None  # psi's second layer [P, H, 1, ...]
    logit_bias: torch.Tensor | None
    running_mean: torch.Tensor  # [P, L]
    running_std: torch.Tensor
    project: torch.Tensor  # rho of each receiver's gates side by side [R * C, (P / R) * L, 1, ...]
    project_bias: torch.Tensor  # summed over each receiver's gates [R * C]

    @classmethod
    def stack(cls, gates: Sequence[InformationGate], receiver_count: int, closed: bool) -> _BankWeights:
        channels = gates[0].value.in_channels
        first, second = [g.attention[0] for g in gates], [g.attention[2] for g in gates]
        phi, phi_bias = [g.value.weight for g in gates], [g.value.bias for g in gates]
        if closed:
            sender, sender_bias = stacked(phi), stacked(phi_bias)
            receiver = logit = logit_bias = None
        else:
            sender = _gate_by_gate(phi, [a.weight[:, channels:] for a in first])
            sender_bias = _gate_by_gate(phi_bias, [a.bias for a in first])
            receiver = stacked([a.weight[:, :channels] for a in first])
            logit, logit_bias = stacked([c.weight for c in second]), stacked([c.bias for c in second])
        project = stacked([g.project.weight for g in gates], dim=1)  # [C, P * L]
        project_bias = torch.stack([g.project.bias for g in gates]).unflatten(0, (receiver_count, -1)).sum(1)
        return cls(
            sender,
            sender_bias,
            receiver,
            logit,
            logit_bias,
            torch.stack([g.running_mean for g in gates]),
            torch.stack([g.running_std for g in gates]),
            torch.cat(project.chunk(receiver_count, dim=1)),
            project_bias.flatten(),
        )

    def split(self, parts: int) -> list[_BankWeights]:
        """The weights of ``parts`` equal groups of receivers, in order (views of these stacks)."""
        chunks = [None if t is None else t.chunk(parts) for t in vars(self).values()]
        return [_BankWeights(*(None if c is None else c[i] for c in chunks)) for i in range(parts)]


def _gate_by_gate(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> torch.Tensor:
    """``first[p]`` then ``second[p]`` for every gate p, concatenated along dim 0."""
    return torch.cat([t for pair in zip(first, second, strict=True) for t in pair])


def grouped_gates(
    gates: Sequence[InformationGate],
    receivers: torch.Tensor,
    senders: torch.Tensor,
    sender_slots: Sequence[int],
    closed: bool = False,
    recompute: bool = False,
) -> GroupedGateOutput:
    """Run P gates at one level as a few batched products; the same maths as calling each gate.

    The gates are ordered receiver by receiver, every receiver with the same number of senders; gate p
    reads receiver ``p // (P / R)`` and the sender in channel group ``sender_slots[p]`` of ``senders``.
    psi's first layer acts on [e_m ; e_n], so it splits into a receiver half (one product per receiver)
    and a sender half, computed together with the value phi in one product per gate. The messages into
    one receiver are summed by one product over its gates' z (their rho weights side by side), so the
    per-gate messages are never materialised. While training, the noise is one standard-normal xi per
    sender (:func:`sender_noise`), drawn once here.

    Args:
        gates: the P gates, receiver-major.
        receivers: receivers' features [B, R * C, *spatial].
        senders: candidate senders' features [B, S * C, *spatial].
        sender_slots: for each gate, the group of its sender in ``senders``.
        closed: force lambda = 0 (no information flows).
        recompute: when gradients are on, keep none of the gates' per-voxel tensors for backward and
            recompute there what the gradients need, one receiver at a time, from the features (which
            the segmentors keep anyway) and the noise xi (:class:`_RecomputedBanks`). Same values and
            gradients; the gates then keep only xi between forward and backward. Without gradients the
            same receiver-by-receiver pass runs either way.
    """
    count = len(gates)
    channels, latent = gates[0].value.in_channels, gates[0].value.out_channels
    receiver_count = receivers.shape[1] // channels
    if (count // receiver_count) * receiver_count != count or len(sender_slots) != count:
        raise ValueError(f"{count} gates do not split evenly over {receiver_count} receivers")
    training = gates[0].training
    weights = _BankWeights.stack(gates, receiver_count, closed)
    noise = sender_noise(senders, senders.shape[1] // channels, latent) if training else None
    if recompute or not torch.is_grad_enabled():
        layout = (tuple(sender_slots), closed, receiver_count)
        messages, kl, attention, *stats = _RecomputedBanks.apply(
            layout, receivers, senders, noise, *vars(weights).values()
        )
    else:
        messages, kl, attention, *stats = _gate_bank(weights, receivers, senders, noise, sender_slots, closed)
        kl, attention = kl.squeeze(2), attention.squeeze(2)
    if training:  # the running prior moves once per forward
        for gate, mean, std in zip(gates, *stats, strict=True):
            gate.update_prior(mean, std)
    return GroupedGateOutput(messages, kl, attention)


def _gate_bank(
    weights: _BankWeights,
    receivers: torch.Tensor,
    senders: torch.Tensor,
    noise: torch.Tensor | None,
    sender_slots: Sequence[int],
    closed: bool,
) -> tuple[torch.Tensor, ...]:
    """The reference form, differentiated by autograd (which keeps every per-voxel tensor).

    Returns (messages, KL maps, attention), the maps [B, P, 1, ...], and, with ``noise`` (training),
    the batch prior statistics.
    """
    count, channels = len(sender_slots), weights.sender.shape[1]
    latent = weights.running_mean.shape[1]
    receiver_count = receivers.shape[1] // channels
    slots = list(sender_slots)
    features = senders.unflatten(1, (-1, channels))[:, slots].flatten(1, 2)
    sender_side = grouped_pointwise(features, weights.sender, weights.sender_bias, groups=count)
    sender_side = sender_side.unflatten(1, (count, -1))
    if closed:
        value = sender_side
        attention = value.new_zeros(value[:, :, :1].shape)
    else:
        value, sender_half = sender_side.split([latent, sender_side.shape[2] - latent], dim=2)
        receiver_half = grouped_pointwise(receivers, weights.receiver, groups=receiver_count)
        hidden = F.leaky_relu(sender_half + receiver_half.unflatten(1, (count, -1)), ATTENTION_SLOPE)
        logits = grouped_pointwise(hidden.flatten(1, 2), weights.logit, weights.logit_bias, groups=count)
        attention = torch.sigmoid(logits).unsqueeze(2)
    eps = None if noise is None else noise[:, slots]
    z, kl, batch_stats = bottleneck(
        value, attention, weights.running_mean, weights.running_std, noise is not None, 2, eps
    )
    messages = grouped_pointwise(
        z.flatten(1, 2), weights.project, weights.project_bias, groups=receiver_count
    )
    return (messages, kl, attention, *(batch_stats or ()))


class _RecomputedBanks(torch.autograd.Function):
    """A level's gates, receiver by receiver, keeping only their inputs; the backward pass written out.

    Both passes work one receiver's K gates at a time (so they hold one receiver's per-voxel gate
    tensors at most), straight from the features: one matrix product per gate from its sender's
    channels into a preallocated buffer (no gathered copy of the sender features, no split), the
    bottleneck as a few in-place passes, phi's bias never added per voxel (it only moves the prior
    mean, so z - b is computed and rho(b) joins rho's bias). Backward recomputes only what the
    gradients need (not the messages, the KL or the prior, whose 2 x P x L numbers were saved) and
    applies the chain rule through rho, the bottleneck (the prior a constant, as in
    :class:`_Bottleneck`), psi and phi by hand, accumulating the senders' gradients in one buffer.
    Same values and gradients as autograd through :func:`_gate_bank`, up to float rounding, in about
    half its per-voxel passes and allocations: on a CPU the gates are memory-bound.

    Inputs: ``layout`` = (sender slots, closed, receiver count), receivers, senders, the noise xi (None
    in evaluation), the fields of :class:`_BankWeights`. Outputs: messages [B, R * C, ...], KL maps and
    lambda [B, P, ...] and, while training, the batch prior (mu, sd) [P, L].
    """

    @staticmethod
    def forward(ctx, layout, receivers, senders, noise, *tensors):
        slots, closed, receiver_count = layout
        weights, dtype = _BankWeights(*tensors), _compute_dtype(senders)
        flat_senders = senders.flatten(2)
        flat_noise = None if noise is None else noise.flatten(3)
        banks = [
            _bank_forward(part, own, flat_senders, flat_noise, slots[gates], closed, dtype)
            for part, own, gates in _receivers(weights, receivers, len(slots), receiver_count)
        ]
        messages, kl, attention, mean, std = (
            torch.cat(tensors, dim=0 if i > 2 else 1) for i, tensors in enumerate(zip(*banks, strict=True))
        )
        ctx.save_for_backward(receivers, senders, noise, *tensors, mean, std)
        ctx.layout, ctx.dtype = layout, dtype
        ctx.set_materialize_grads(False)
        spatial = receivers.shape[2:]
        outputs = (messages.unflatten(2, spatial), kl.unflatten(2, spatial), attention.unflatten(2, spatial))
        if noise is None:
            return outputs
        ctx.mark_non_differentiable(mean, std)
        return *outputs, mean, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, messages_grad, kl_grad, attention_grad, *_prior_grads):
        receivers, senders, noise, *tensors = ctx.saved_tensors
        slots, closed, receiver_count = ctx.layout
        weights, (mean, std) = _BankWeights(*tensors[:-2]), tensors[-2:]
        flat_senders = senders.flatten(2)
        flat_noise = None if noise is None else noise.flatten(3)
        sender_grad = torch.zeros(flat_senders.shape, dtype=ctx.dtype, device=senders.device)
        receiver_grad = torch.empty(receivers.flatten(2).shape, dtype=ctx.dtype, device=receivers.device)
        output_grads = [
            None if g is None else g.flatten(2).chunk(receiver_count, dim=1)
            for g in (messages_grad, kl_grad, attention_grad)
        ]
        grads = [
            _bank_backward(
                part,
                own,
                flat_senders,
                flat_noise,
                slots[gates],
                closed,
                (mean[gates], std[gates]),
                ctx.dtype,
                *(None if g is None else g[r] for g in output_grads),
                sender_grad,
                receiver_grad.chunk(receiver_count, dim=1)[r],
            )
            for r, (part, own, gates) in enumerate(_receivers(weights, receivers, len(slots), receiver_count))
        ]
        weight_grads = [None if g[0] is None else torch.cat(g) for g in zip(*grads, strict=True)]
        if closed:
            return None, None, None, None, *weight_grads
        return None, receiver_grad.view(receivers.shape), sender_grad.view(senders.shape), None, *weight_grads


def _receivers(
    weights: _BankWeights, receivers: torch.Tensor, count: int, receiver_count: int
) -> list[tuple[_BankWeights, torch.Tensor, slice]]:
    """Per receiver: its gates' weights, its features [B, C, N] and its gates' slice of the P gates."""
    per_receiver = count // receiver_count
    return [
        (part, own, slice(r * per_receiver, (r + 1) * per_receiver))
        for r, (part, own) in enumerate(
            zip(weights.split(receiver_count), receivers.flatten(2).chunk(receiver_count, dim=1), strict=True)
        )
    ]


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the gates' per-voxel tensors have: autocast's, if it is on, else the features'."""
    device = features.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return features.dtype


def _sender_side(
    weights: _BankWeights, senders: torch.Tensor, sender_slots: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """phi without its bias, then psi's sender half, of K gates [B, K, L + H, N] (phi only when closed).

    One product per gate, from its sender's channels of ``senders`` [B, S * C, N] into one buffer.
    """
    channels = weights.sender.shape[1]
    matrices = weights.sender.view(len(sender_slots), -1, channels).to(dtype)
    by_slot = senders.unflatten(1, (-1, channels)).to(dtype)
    out = torch.empty(
        (senders.shape[0], len(sender_slots), matrices.shape[1], senders.shape[2]),
        dtype=dtype,
        device=senders.device,
    )
    for k, slot in enumerate(sender_slots):
        _product(matrices[k], by_slot[:, slot], out=out[:, k])
    return out


def _attention(
    weights: _BankWeights, receiver: torch.Tensor, sender_half: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """psi of K gates from the receiver [B, C, N] and their sender halves [B, K, H, N]: (hidden layer
    after its LeakyReLU [B, K, H, N], lambda [B, K, N])."""
    batch, count, hidden_channels, _ = sender_half.shape
    dtype = sender_half.dtype
    bias = weights.sender_bias.view(count, -1)[:, -hidden_channels:, None].to(dtype)
    hidden = torch.add(sender_half, bias)
    matrix = weights.receiver.view(count * hidden_channels, -1).to(dtype)
    _product(matrix, receiver.to(dtype), out=hidden.view(batch, count * hidden_channels, -1), add=True)
    F.leaky_relu_(hidden, ATTENTION_SLOPE)
    logits = grouped_pointwise(
        hidden.flatten(1, 2), weights.logit.to(dtype), weights.logit_bias.to(dtype), groups=count
    )
    return hidden, logits.sigmoid_()


def _bank_forward(
    weights: _BankWeights,
    receiver: torch.Tensor,
    senders: torch.Tensor,
    noise: torch.Tensor | None,
    sender_slots: Sequence[int],
    closed: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """One receiver's K gates, spatial dims flattened to N, without a graph.

    Returns (messages [B, C, N], KL [B, K, N], lambda [B, K, N], mu, sd [K, L]): the prior used, the
    batch's while training (then ``noise`` [B, S, L, N] is each sender's xi), else the running one.
    """
    count, latent = len(sender_slots), weights.running_mean.shape[1]
    accumulate = torch.promote_types(dtype, torch.float32)
    sender_side = _sender_side(weights, senders, sender_slots, dtype)
    value = sender_side[:, :, :latent]  # v - b
    if closed:
        attention = value.new_zeros(value[:, :, 0].shape)
    else:
        attention = _attention(weights, receiver, sender_side[:, :, latent:])[1]
    value_bias = weights.sender_bias.view(count, -1)[:, :latent]
    if noise is None:
        mean, std = weights.running_mean, weights.running_std
        work = value - (mean - value_bias).unsqueeze(-1).to(dtype)
    else:
        shift = value.mean(dim=(0, 3), dtype=accumulate)
        work = value - shift.unsqueeze(-1).to(dtype)  # v - mu
        samples = value.shape[0] * value.shape[3]
        norm = torch.linalg.vector_norm(work, dim=(0, 3), dtype=accumulate)
        std = (norm / max(samples - 1, 1) ** 0.5).clamp_min(1e-5)
        mean = shift + value_bias
    squared_norm = _squared_norm(work, std)
    if noise is not None:
        for k, slot in enumerate(sender_slots):
            work[:, k].addcmul_(noise[:, slot], std[k].unsqueeze(-1).to(dtype), value=-1.0)  # d = v - eps
    torch.addcmul(value, work, (attention - 1.0).unsqueeze(2), out=work)  # z - b = (v - b) - (1 - lambda) d
    project = weights.project.view(weights.project.shape[0], -1)
    constant = project @ value_bias.flatten() + weights.project_bias  # rho(b)
    messages = _product(project.to(dtype), work.flatten(1, 2)).add_(constant.unsqueeze(-1).to(dtype))
    return messages, _kl(attention.to(accumulate), squared_norm, latent), attention, mean, std


def _bank_backward(
    weights: _BankWeights,
    receiver: torch.Tensor,
    senders: torch.Tensor,
    noise: torch.Tensor | None,
    sender_slots: Sequence[int],
    closed: bool,
    prior: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    messages_grad: torch.Tensor | None,
    kl_grad: torch.Tensor | None,
    attention_grad: torch.Tensor | None,
    sender_grad: torch.Tensor,
    receiver_grad: torch.Tensor,
) -> list[torch.Tensor | None]:
    """The gradients of one receiver's :class:`_BankWeights` fields (see :class:`_RecomputedBanks`).

    Adds the features' gradients to ``sender_grad`` [B, S * C, N] and ``receiver_grad`` [B, C, N].
    ``prior``: the (mu, sd) [K, L] the forward pass used.
    """
    count, latent = len(sender_slots), weights.running_mean.shape[1]
    channels = weights.sender.shape[1]
    accumulate = torch.promote_types(dtype, torch.float32)
    mean, std = (p.unsqueeze(-1) for p in prior)
    value_bias = weights.sender_bias.view(count, -1)[:, :latent]
    sender_side = _sender_side(weights, senders, sender_slots, dtype)
    value = sender_side[:, :, :latent]
    if closed:
        hidden, attention = None, value.new_zeros(value[:, :, 0].shape)
    else:
        hidden, attention = _attention(weights, receiver, sender_side[:, :, latent:])
    work = value - (mean - value_bias.unsqueeze(-1)).to(dtype)  # v - mu
    scaled = None
    if kl_grad is not None and not closed:
        squared_norm = _squared_norm(work, std.squeeze(-1))
        scaled = work * std.square().reciprocal().to(dtype)  # (v - mu) / sd^2
    if noise is not None:
        for k, slot in enumerate(sender_slots):
            work[:, k].addcmul_(noise[:, slot], std[k].to(dtype), value=-1.0)  # difference d = v - eps
    # rho: messages = W z + c, z = v - (1 - lambda) d
    if messages_grad is None:
        messages_grad = receiver.new_zeros(receiver.shape, dtype=dtype)
    messages_grad = messages_grad.to(dtype)
    z = torch.addcmul(value, work, (attention - 1.0).unsqueeze(2)).flatten(1, 2)  # z - b
    project = weights.project.view(weights.project.shape[0], -1).to(dtype)
    summed_messages_grad = messages_grad.sum(dim=(0, 2))
    project_grad = _outer_sum(messages_grad, z) + torch.outer(summed_messages_grad, value_bias.flatten())
    rho_grads = [project_grad.view(weights.project.shape), summed_messages_grad]
    if closed:  # lambda = 0: z is the prior's noise, nothing flows back into v or the features
        return [None] * 7 + rho_grads
    z_grad = _product(project.T, messages_grad, out=z).unflatten(1, (count, latent))
    attention_total = work.mul_(z_grad).sum(dim=2, dtype=accumulate)  # sum_c dL/dz * d
    torch.mul(z_grad, attention.unsqueeze(2), out=value)  # dL/dv, in the buffer phi's output had
    if scaled is not None:  # kl = L (0.5 ((1 - lam)^2 - 1) - log(1 - lam)) + 0.5 lam^2 |u|^2, lam clamped
        lam = attention.to(accumulate)
        clamped = lam.clamp(0.0, LAMBDA_MAX)
        kl_grad = kl_grad.to(accumulate)
        value.addcmul_(scaled, (kl_grad * clamped.square()).unsqueeze(2).to(dtype))
        slope = latent * ((1.0 - clamped).reciprocal() - (1.0 - clamped)) + clamped * squared_norm
        attention_total += kl_grad * slope * (lam <= LAMBDA_MAX)
    if attention_grad is not None:
        attention_total += attention_grad
    logits_grad = (attention_total * attention * (1.0 - attention)).to(dtype)  # [B, K, N]
    logit = weights.logit.view(count, -1)
    logit_grad = torch.einsum("bkn,bkhn->kh", logits_grad, hidden)
    psi_grad = sender_side[:, :, latent:]
    torch.mul(logits_grad.unsqueeze(2), logit.to(dtype).unsqueeze(-1), out=psi_grad)
    torch.ops.aten.leaky_relu_backward.grad_input(
        psi_grad, hidden, ATTENTION_SLOPE, True, grad_input=psi_grad
    )
    receiver_matrices = weights.receiver.view(count, -1, channels).to(dtype)
    by_slot = senders.unflatten(1, (-1, channels)).to(dtype)
    sender_matrices = weights.sender.view(count, -1, channels).to(dtype)
    receiver_grads, sender_grads = [], []
    receiver = receiver.to(dtype)
    for k, slot in enumerate(sender_slots):
        _product(receiver_matrices[k].T, psi_grad[:, k], out=receiver_grad, add=k > 0)
        receiver_grads.append(_outer_sum(psi_grad[:, k], receiver))
        sender_channels = sender_grad[:, slot * channels : (slot + 1) * channels]
        _product(sender_matrices[k].T, sender_side[:, k], out=sender_channels, add=True)
        sender_grads.append(_outer_sum(sender_side[:, k], by_slot[:, slot]))
    return [
        torch.cat(sender_grads).view(weights.sender.shape),
        sender_side.sum(dim=(0, 3)).flatten(),
        torch.cat(receiver_grads).view(weights.receiver.shape),
        logit_grad.reshape(weights.logit.shape),
        logits_grad.sum(dim=(0, 2)),
        None,
        None,
        *rho_grads,
    ]


def _product(
    matrix: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None, add: bool = False
) -> torch.Tensor:
    """``matrix`` [O, I] at every voxel of ``x`` [B, I, N] as one batched product (torch.matmul would
    fold a 2-D by 3-D product into a slow transposed one), written into ``out`` or, with ``add``, added
    to it."""
    matrices = matrix.expand(x.shape[0], -1, -1)
    if add:
        return out.baddbmm_(matrices, x)
    return torch.bmm(matrices, x, out=out)


def _squared_norm(centered: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|u|^2 = sum_l ((v - mu) / sd)^2 [B, K, N] from v - mu [B, K, L, N] and sd [K, L]: the squares,
    then one batched product with 1 / sd^2 (float32 at least)."""
    batch, count, latent, voxels = centered.shape
    accumulate = torch.promote_types(centered.dtype, torch.float32)
    weights = std.square().reciprocal().to(accumulate).view(1, count, 1, latent).expand(batch, -1, -1, -1)
    squares = centered.square().to(accumulate).view(batch * count, latent, voxels)
    return torch.bmm(weights.reshape(batch * count, 1, latent), squares).view(batch, count, voxels)


def _outer_sum(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over batch and voxels of grad x^T: a 1x1 convolution's weight gradient [O, I]."""
    return torch.einsum("bon,bin->oi", grad, x)


def _kl(attention: torch.Tensor, squared_norm: torch.Tensor, channels: int) -> torch.Tensor:
    """The channel sum of :func:`gaussian_bottleneck_kl` from lambda and |u|^2 (see :func:`bottleneck`)."""
    lam = attention.clamp(0.0, LAMBDA_MAX)
    return channels * (0.5 * ((1.0 - lam) ** 2 - 1.0) - torch.log1p(-lam)) + 0.5 * lam**2 * squared_norm
