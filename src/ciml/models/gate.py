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

from dataclasses import dataclass

import torch
from torch import nn

from ciml.models.backbone import conv

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
    """

    def __init__(
        self, channels: int, spatial_dims: int, attention_channels: int | None = None, momentum: float = 0.1
    ) -> None:
        super().__init__()
        hidden = attention_channels or max(4, channels // 2)
        self.value = conv(spatial_dims, channels, channels)
        self.attention = nn.Sequential(
            conv(spatial_dims, 2 * channels, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            conv(spatial_dims, hidden, 1),
        )
        self.project = conv(spatial_dims, channels, channels)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))

    def forward(self, receiver: torch.Tensor, sender: torch.Tensor, closed: bool = False) -> GateOutput:
        value = self.value(sender)
        mean, std = self._prior(value)
        if closed:
            attention = torch.zeros_like(value[:, :1])
        else:
            attention = torch.sigmoid(self.attention(torch.cat([receiver, sender], dim=1)))
        shape = (1, -1) + (1,) * (value.dim() - 2)
        mean, std = mean.view(shape), std.view(shape)
        noise = mean + std * torch.randn_like(value) if self.training else mean.expand_as(value)
        z = attention * value + (1.0 - attention) * noise
        kl = gaussian_bottleneck_kl(attention.float(), ((value - mean) / std).float())
        return GateOutput(self.project(z), kl.sum(dim=1, keepdim=True), attention)

    def silent_message(self, like: torch.Tensor) -> torch.Tensor:
        """The message of an absent sender: z at the prior mean (lambda = 0), broadcast like ``like``."""
        shape = (1, -1) + (1,) * (like.dim() - 2)
        z = self.running_mean.view(shape).to(like.dtype)
        return self.project(z).expand_as(like)

    def _prior(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel prior N(mu, sd^2): batch statistics while training, running ones at evaluation."""
        if not self.training:
            return self.running_mean, self.running_std
        with torch.no_grad():
            dims = [0, *range(2, value.dim())]
            mean = value.mean(dim=dims)
            std = value.std(dim=dims).clamp_min(1e-5)
            self.running_mean.lerp_(mean.float(), self.momentum)
            self.running_std.lerp_(std.float(), self.momentum)
        return mean, std
