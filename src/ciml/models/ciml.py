"""CIML: one segmentor per modality, exchanging gated, information-bottlenecked messages.

Each segmentor's encoder sees only its primary modality (private encoders, so a sender never echoes
what it received). Messages enter the decoder side: at each message level l the skip of receiver m is

    s_m^l = e_m^l + sum over senders n of rho_{m<-n}(z_{m<-n}^l)

with z from the sender's information gate (:mod:`ciml.models.gate`). The same class, without message
levels, is the decomposition-only ablation (ciml-nomsg) and, with every segmentor owning every region,
the ensemble baseline.

A segmentor may also stand in for regions it does not own (the spec's ``fallback_owners``): its decoder
then has extra output channels for them, after the owned ones, used only when every owner is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ciml.errors import CimlError
from ciml.models.backbone import UNetDecoder, UNetEncoder
from ciml.models.gate import InformationGate, grouped_gates, sender_noise
from ciml.models.grouped import grouped_decode, grouped_encoder
from ciml.models.interface import MissingModalities, SegmentationNetwork
from ciml.models.output import SegmentationOutput


def gate_key(level: int, receiver: str, sender: str) -> str:
    """Name of the gate on message receiver <- sender at ``level`` (also the key of its maps)."""
    return f"{level}/{receiver}<-{sender}"


class CIMLNet(SegmentationNetwork):
    """Per-modality segmentors with cross-modality information gates.

    Args:
        modalities: modality names in input channel order.
        decomposition: modality -> regions its segmentor owns (may be empty: a pure sender).
        widths: feature channels per level of every segmentor, full resolution first.
        spatial_dims: 2 or 3.
        message_levels: levels that receive messages (default: all; empty: no messages).
        fallback: modality -> regions its segmentor stands in for when all their owners are missing
            (regions it owns itself are ignored). Default: none, which gives the plain architecture.
        grouped: run the segmentors and gates as grouped convolutions (one kernel per layer for all
            segmentors, :mod:`ciml.models.grouped`) instead of one after another. Same parameters, same
            outputs up to float rounding; ``False`` is the reference form (and what hooks on the
            per-segmentor modules, e.g. Grad-CAM's, need: see :meth:`per_segmentor`).
        message_channels: channels of every gate's value v and latent z, one per level or one for all
            (capped at the level's width). Default: the features' own width (the original gate).
        recompute_gates: in the grouped form, recompute the gates' per-voxel tensors in backward
            instead of keeping them; the gates then keep only their noise (same values and gradients;
            see :func:`grouped_gates`). ``False`` lets autograd keep them (the reference).
        deep_supervision: every decoder gets auxiliary heads (owned + fallback channels) at its coarser
            scales (:func:`~ciml.models.backbone.deep_supervision_levels`); in training mode their
            logits go to ``deep_logits`` / ``deep_fallback_logits``. Eval outputs are unchanged.
        config, fixed_beta: see :class:`~ciml.models.interface.SegmentationNetwork`.

    Example:
        >>> net = CIMLNet(["flair", "t1"], {"flair": ["WT"], "t1": ["TC"]}, widths=(4, 8), spatial_dims=2)
        >>> out = net(torch.randn(2, 2, 16, 16))
        >>> out.logits["flair"].shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        modalities: Sequence[str],
        decomposition: Mapping[str, Sequence[str]],
        widths: Sequence[int],
        spatial_dims: int = 3,
        message_levels: Iterable[int] | None = None,
        fallback: Mapping[str, Sequence[str]] | None = None,
        grouped: bool = True,
        message_channels: int | Sequence[int] | None = None,
        recompute_gates: bool = True,
        config: Mapping[str, object] | None = None,
        fixed_beta: float | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__(modalities, config, fixed_beta, deep_supervision)
        self.grouped = grouped
        self.recompute_gates = recompute_gates
        self.owned = {m: tuple(decomposition.get(m, ())) for m in self.modalities}
        fallback = fallback or {}
        unknown = sorted(set(fallback) - set(self.modalities))
        if unknown:
            raise ValueError(f"fallback for unknown modalities {unknown}; the model has {self.modalities}")
        self.fallback = {
            m: tuple(r for r in dict.fromkeys(fallback.get(m, ())) if r not in self.owned[m])
            for m in self.modalities
        }
        self.widths = tuple(widths)
        levels = range(len(self.widths)) if message_levels is None else message_levels
        self._message_levels = tuple(sorted(set(levels)))
        if any(not 0 <= level < len(self.widths) for level in self.message_levels):
            raise ValueError(f"message levels {self.message_levels} outside 0..{len(self.widths) - 1}")
        self.encoders = nn.ModuleDict({m: UNetEncoder(1, self.widths, spatial_dims) for m in self.modalities})
        self.decoders = nn.ModuleDict(
            {
                m: UNetDecoder(
                    self.widths, len(self.owned[m]) + len(self.fallback[m]), spatial_dims, deep_supervision
                )
                for m in self.modalities
                if self.owned[m] or self.fallback[m]
            }
        )
        self.message_channels = _per_level(message_channels, self.widths)
        self.gates = nn.ModuleDict(
            {
                gate_key(level, receiver, sender): InformationGate(
                    self.widths[level], spatial_dims, message_channels=self.message_channels[level]
                )
                for level in self.message_levels
                for receiver in self.decoders
                for sender in self.modalities
                if sender != receiver
            }
        )

    missing_modalities = MissingModalities.SKIP_SEGMENTOR
    supports_deep_supervision = True

    @property
    def owners(self) -> dict[str, tuple[str, ...]]:
        regions = dict.fromkeys(r for m in self.modalities for r in self.owned[m])
        return {r: tuple(m for m in self.modalities if r in self.owned[m]) for r in regions}

    @property
    def fallback_owners(self) -> dict[str, tuple[str, ...]]:
        regions = dict.fromkeys(r for m in self.modalities for r in self.fallback[m])
        return {r: tuple(m for m in self.modalities if r in self.fallback[m]) for r in regions}

    @property
    def primary_inputs(self) -> dict[str, tuple[str, ...]]:
        return {m: (m,) for m in self.decoders}

    @property
    def message_levels(self) -> tuple[int, ...]:
        return self._message_levels

    @property
    def size_divisor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(
        self,
        x: torch.Tensor,
        present: Iterable[str] | None = None,
        return_maps: bool = False,
        close_gates: bool = False,
    ) -> SegmentationOutput:
        """Segment ``x`` [B, M, *spatial] (channels in modality order).

        Args:
            present: modalities available (default: all). A missing modality's segmentor is skipped and
                its messages sit at the prior mean (lambda = 0), exactly the gate's "no information" state.
            return_maps: also return every gate's attention (lambda) and KL map.
            close_gates: force lambda = 0 on every gate (no information flows between segmentors).
        """
        available = self._available(present, x.shape[1])
        output = SegmentationOutput(logits={}, owned={}, kl=x.new_zeros((), dtype=torch.float32))
        if self.grouped:
            self._forward_grouped(x, available, close_gates, return_maps, output)
        else:
            self._forward_per_segmentor(x, available, close_gates, return_maps, output)
        output.kl = sum(output.kl_terms.values(), output.kl)
        return output

    @property
    def checkpoint_activations(self) -> bool:
        """Recompute the segmentors' encoder stages and decoder levels in backward (less memory)."""
        return any(
            module.checkpoint_activations for module in (*self.encoders.values(), *self.decoders.values())
        )

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        for module in (*self.encoders.values(), *self.decoders.values()):
            module.checkpoint_activations = bool(enabled)

    @contextlib.contextmanager
    def per_segmentor(self) -> Iterator[CIMLNet]:
        """Run segmentor by segmentor inside the block, so forward hooks on their modules fire."""
        grouped, self.grouped = self.grouped, False
        try:
            yield self
        finally:
            self.grouped = grouped

    def _forward_per_segmentor(
        self,
        x: torch.Tensor,
        available: set[str],
        close_gates: bool,
        return_maps: bool,
        output: SegmentationOutput,
    ) -> None:
        """The reference form: each segmentor and each gate as its own module call.

        The noise is drawn as the grouped form draws it (one xi per sender and level, in level order),
        so both forms are the same model in training mode too.
        """
        features = {
            m: self.encoders[m](x[:, i : i + 1]) for i, m in enumerate(self.modalities) if m in available
        }
        noise = self._per_segmentor_noise(features)
        for receiver in self.decoders:
            if receiver not in available:
                continue
            skips = list(features[receiver])
            for level in self.message_levels:
                skips[level] = skips[level] + self._messages(
                    level, receiver, features, noise.get(level, {}), close_gates, return_maps, output
                )
            self._record(receiver, *self.decoders[receiver].decode(skips, self._deep), output)

    def _forward_grouped(
        self,
        x: torch.Tensor,
        available: set[str],
        close_gates: bool,
        return_maps: bool,
        output: SegmentationOutput,
    ) -> None:
        """All present segmentors as one grouped network; the gates of a level as one grouped bank."""
        present = [m for m in self.modalities if m in available]
        if len(present) < len(self.modalities):
            x = x[:, [self.modalities.index(m) for m in present]]
        features = grouped_encoder(x, [self.encoders[m] for m in present])
        receivers = [m for m in self.decoders if m in available]
        if not receivers:
            return
        slots = [present.index(m) for m in receivers]
        skips = [_channel_groups(f, slots, len(present)) for f in features]
        for level in self.message_levels:
            skips[level] = skips[level] + self._grouped_messages(
                level, present, receivers, skips[level], features[level], close_gates, return_maps, output
            )
        logits, deep = grouped_decode(skips, [self.decoders[m] for m in receivers], self._deep)
        for receiver, receiver_logits, receiver_deep in zip(receivers, logits, deep, strict=True):
            self._record(receiver, receiver_logits, receiver_deep, output)

    def _grouped_messages(
        self,
        level: int,
        present: list[str],
        receivers: list[str],
        own: torch.Tensor,
        senders: torch.Tensor,
        close_gates: bool,
        return_maps: bool,
        output: SegmentationOutput,
    ) -> torch.Tensor | float:
        """Every receiver's summed messages at ``level`` [B, R * C, ...]; records KL terms (and maps)."""
        total: torch.Tensor | float = self._silent_messages(level, present, receivers, own)
        pairs = [(r, s) for r in receivers for s in present if s != r]
        if not pairs:
            return total
        keys = [gate_key(level, r, s) for r, s in pairs]
        result = grouped_gates(
            [self.gates[k] for k in keys],
            own,
            senders,
            [present.index(s) for _, s in pairs],
            close_gates,
            recompute=self.recompute_gates,
        )
        kl_means = result.kl_maps.mean(dim=[0, *range(2, result.kl_maps.dim())])
        for p, key in enumerate(keys):
            output.kl_terms[key] = kl_means[p]
            if return_maps:
                output.kl_maps[key] = result.kl_maps[:, p : p + 1]
                output.attention_maps[key] = result.attention[:, p : p + 1]
        return total + result.messages

    def _silent_messages(
        self, level: int, present: list[str], receivers: list[str], own: torch.Tensor
    ) -> torch.Tensor | float:
        """The constant messages from absent senders, per receiver [1, R * C, 1, ...] (0 when none)."""
        absent = [m for m in self.modalities if m not in present]
        if not absent:
            return 0.0
        like = own[:1, : self.widths[level]][(...,) + (slice(0, 1),) * (own.dim() - 2)]
        return torch.cat(
            [sum(self.gates[gate_key(level, r, s)].silent_message(like) for s in absent) for r in receivers],
            dim=1,
        )

    @property
    def _deep(self) -> bool:
        """Whether this forward pass computes the deep-supervision logits (training mode only)."""
        return self.deep_supervision and self.training

    def _record(
        self,
        segmentor: str,
        logits: torch.Tensor,
        deep: list[torch.Tensor],
        output: SegmentationOutput,
    ) -> None:
        """Split a decoder's channels into owned logits and fallback logits (kept apart, never mixed);
        the same for its deep-supervision logits, when there are any."""
        owned = len(self.owned[segmentor])
        if owned:
            output.logits[segmentor] = logits[:, :owned]
            output.owned[segmentor] = self.owned[segmentor]
            if deep:
                output.deep_logits[segmentor] = [d[:, :owned] for d in deep]
        if self.fallback[segmentor]:
            output.fallback_logits[segmentor] = logits[:, owned:]
            output.fallback[segmentor] = self.fallback[segmentor]
            if deep:
                output.deep_fallback_logits[segmentor] = [d[:, owned:] for d in deep]

    def _per_segmentor_noise(
        self, features: dict[str, list[torch.Tensor]]
    ) -> dict[int, dict[str, torch.Tensor]]:
        """While training, each present sender's xi per message level (see :func:`sender_noise`)."""
        if not self.training or len(features) < 2 or not any(m in features for m in self.decoders):
            return {}  # as the grouped form, which draws only when some message is sent
        noise = {}
        for level in self.message_levels:
            like = next(iter(features.values()))[level]
            xi = sender_noise(like, len(features), self.message_channels[level])
            noise[level] = dict(zip(features, xi.unbind(1), strict=True))
        return noise

    def _messages(
        self,
        level: int,
        receiver: str,
        features: dict[str, list[torch.Tensor]],
        noise: dict[str, torch.Tensor],
        close_gates: bool,
        return_maps: bool,
        output: SegmentationOutput,
    ) -> torch.Tensor | float:
        """Sum of all messages into ``receiver`` at ``level``; records KL terms (and maps) in ``output``."""
        total: torch.Tensor | float = 0.0
        own = features[receiver][level]
        for sender in self.modalities:
            if sender == receiver:
                continue
            key = gate_key(level, receiver, sender)
            gate = self.gates[key]
            if sender not in features:
                total = total + gate.silent_message(own)
                continue
            result = gate(own, features[sender][level], closed=close_gates, noise=noise.get(sender))
            total = total + result.message
            output.kl_terms[key] = result.kl_map.mean()
            if return_maps:
                output.kl_maps[key] = result.kl_map
                output.attention_maps[key] = result.attention
        return total

    def _available(self, present: Iterable[str] | None, channels: int) -> set[str]:
        if channels != len(self.modalities):
            raise CimlError(
                f"input has {channels} channels but the model expects {len(self.modalities)} "
                f"({', '.join(self.modalities)})"
            )
        self.check_present(present)
        return set(self.modalities) if present is None else set(present)


def _per_level(channels: int | Sequence[int] | None, widths: Sequence[int]) -> tuple[int, ...]:
    """Message channels per level: the widths themselves, one number for all (capped), or one per level."""
    if channels is None:
        return tuple(widths)
    if isinstance(channels, int):
        channels = [channels] * len(widths)
    channels = tuple(int(c) for c in channels)
    if len(channels) != len(widths) or any(c <= 0 for c in channels):
        raise ValueError(f"message_channels {channels}: one positive number, or one per level of {widths}")
    return tuple(min(c, w) for c, w in zip(channels, widths, strict=True))


def _channel_groups(features: torch.Tensor, slots: Sequence[int], groups: int) -> torch.Tensor:
    """The channel groups ``slots`` of grouped ``features`` (the tensor itself when that is all of them)."""
    if list(slots) == list(range(groups)):
        return features
    return features.unflatten(1, (groups, -1))[:, list(slots)].flatten(1, 2)
