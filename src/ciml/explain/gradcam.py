"""Which modality contributed where (Grad-CAM maps) and how much (ablation shares), per segmentor and region.

A CIML segmentor's encoder sees only its own modality, but its decoder receives the other modalities'
messages. Every segmentor m and region r is explained for the score

    s = sum of r's logits (segmentor m) over the voxels m predicts as r

(every voxel when m predicts none), on each modality n's encoder features e_n at one level.

**Where: maps.** Grad-CAM (Selvaraju et al., ICCV 2017): ``relu(sum_c w_c e_n[c])`` with ``w_c`` the
mean of ds/de_n[c] over voxels, the formula of MONAI's ``GradCAM.compute_map``; ``cam="hirescam"`` uses
the element-wise product instead, ``relu(sum_c ds/de_n[c] * e_n[c])`` (HiResCAM, Draelos and Carin 2020),
which follows the gradient voxel by voxel. For n == m the gradient reaches e_m through m's own skips and
gates' attention; for n != m only through the messages m <- n. Maps are upsampled (linearly) to the input
grid; ``mass`` is a map's sum inside the explained voxels (the predicted mask; everything when empty).

**How much: shares.** A modality's *effect* is how much s drops when its features at the level are
replaced by their spatial mean (per channel), i.e. when the segmentors lose everything that modality
says about *where* (its deeper levels are computed from the flattened features): one exact forward pass
per modality, no gradient. Its *share* is the size of its effect, |effect|, over the sum of all
modalities' (a modality whose removal raises the score is counter-evidence and counts as much; the
signed effects are kept in :attr:`Contribution.effect`).

The shares used to be the maps' masses, and that failed: Grad-CAM's weight ``w_c`` averages the gradient
over the whole grid, and around a region the gradient has the other sign (features there push the
region's edge logits down). In a toy model that failed (trained with oneDNN's SSE4.1 kernels on an AMD
EPYC; the issue saw the same failure on an Intel AVX-512 CPU), the one channel of the informative sender
that marked the target had gradient +0.027 inside it and -0.0054 on the 7x more voxels outside: w_c =
-0.0016, a near-cancellation whose sign the training trajectory (so the CPU's rounding) decided, and the
ReLU zeroed the only informative modality's map. The ablation has no such cancellation and clips
nothing: removing a modality that carries the region changes the score, whatever the sign or offset of
the features that encode it. On the toy task (three modalities, one informative, segmentor a owning the
target; 8 seeds x {own modality, sender} x {AVX-512, AVX2, SSE4.1 kernels} = 48 trained models) the
ablation gave the informative modality a share of at least 0.99 every time; Grad-CAM's map masses named
it 47 times (once 0 %), HiResCAM's 48 times (at least 81 %). Grad-CAM maps are still what ``gradcam``
draws (they are the method users ask for); :attr:`GradCamResult.notes` says what they can miss.

**Level.** The features at e_n^l cover the messages entering at level l and deeper only (n's deeper
stages are computed from e_n^l), never the shallower ones. CIML sends messages at every level by default
(most information flows at full resolution), so the default level is the shallowest message level (0):
the one that sees every message. Networks without messages default to level 1.

MONAI's :class:`monai.visualize.GradCAM` itself does not fit here: it scores one class logit of a
classifier's output, runs one forward and backward pass per target layer, rescales each map to [0, 1]
(which destroys the comparison between modalities that the shares need) and leaves its hooks on the
network. Here one forward pass serves every segmentor, region and modality (one backward pass per
segmentor and region), and the hooks are removed afterwards.

What other networks allow (stated in :attr:`GradCamResult.notes`):

- **ensemble** (one U-Net per modality, all regions, averaged, no messages): a member sees only its own
  modality, so per member the answer is trivial; each region is explained for the *averaged* logits
  inside the ensemble's mask, with Grad-CAM on every member's own encoder (segmentor ``ensemble``).
- **ciml-nomsg**: no messages, so every segmentor's share is 100 % its own modality.
- **joint / segresnet** (one network on stacked channels): one shared encoder mixes the modalities from
  the first convolution on, so Grad-CAM cannot separate them; the fallback maps are input-gradient x
  input per channel (positive part), and the shares ablate each input channel (its spatial mean).

Example:
    >>> result = explain_contributions(model.eval(), x)   # x: [1, M, *spatial]  # doctest: +SKIP
    >>> result.contributions[0].fractions                  # {'flair': 0.7, 't1': 0.1, ...}  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ciml.errors import CimlError, ParameterError
from ciml.models import SegmentationNetwork
from ciml.models.output import SegmentationOutput
from ciml.tasks import REGION_THRESHOLD

GRADCAM = "gradcam"
HIRESCAM = "hirescam"
INPUT_GRADIENT = "input_gradient"
ENSEMBLE = "ensemble"
LEVEL_WITHOUT_MESSAGES = 1


@dataclass
class Contribution:
    """How much each modality contributed to one segmentor's region.

    Attributes:
        segmentor: the segmentor's (primary modality's) name, ``ensemble`` or ``joint``.
        region: the region explained.
        maps: modality -> non-negative map [*spatial] on the input's grid (float32, CPU).
        mass: modality -> its map's sum over the explained voxels (the predicted mask, or all if empty).
        mask: the predicted mask [*spatial] (bool, CPU); when it is empty every voxel was explained.
        effect: modality -> how much the score (the region's logits summed over the explained voxels)
            drops when the modality's features are replaced by their spatial mean; the shares' basis.
    """

    segmentor: str
    region: str
    maps: dict[str, torch.Tensor]
    mass: dict[str, float]
    mask: torch.Tensor
    effect: dict[str, float]

    @property
    def mask_voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def name(self) -> str:
        return f"{self.segmentor}:{self.region}"

    @property
    def fractions(self) -> dict[str, float]:
        """Modality -> |effect| over the sum of all |effect| (all 0 when no ablation changes the score).

        From the ablation, not the maps: a map's mass can be clipped to zero by its ReLU for the very
        modality that carries the region (see the module's docstring).
        """
        size = {m: abs(v) for m, v in self.effect.items()}
        total = sum(size.values())
        return {m: (v / total if total > 0 else 0.0) for m, v in size.items()}


@dataclass
class GradCamResult:
    """Every contribution of one input, with how it was computed.

    Attributes:
        method: ``gradcam`` or ``hirescam`` (encoder features at ``level``), or ``input_gradient``
            (networks on stacked channels).
        level: the encoder level (0 = full resolution) for Grad-CAM, None for the input-gradient fallback.
        contributions: one per segmentor and region (ensembles: one per region).
        notes: what the method can and cannot say for this network, for the reader.
        output: the forward pass's output, detached (with the gates' maps when they were asked for).
    """

    method: str
    level: int | None
    contributions: list[Contribution]
    notes: list[str] = field(default_factory=list)
    output: SegmentationOutput | None = None


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """Grad-CAM map ``relu(sum_c mean_voxels(grad_c) * activation_c)``, [B, 1, *spatial].

    The same arithmetic as MONAI's ``GradCAM.compute_map``; a missing gradient (no path to the score)
    gives a zero map.
    """
    if gradient is None:
        return torch.zeros_like(activation[:, :1])
    weights = gradient.flatten(2).mean(2).view(*gradient.shape[:2], *[1] * (gradient.dim() - 2))
    return F.relu((weights * activation).sum(1, keepdim=True))


def hires_cam(activation: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """HiResCAM map ``relu(sum_c grad_c * activation_c)`` (element-wise), [B, 1, *spatial]."""
    if gradient is None:
        return torch.zeros_like(activation[:, :1])
    return F.relu((gradient * activation).sum(1, keepdim=True))


CAMS = {GRADCAM: grad_cam, HIRESCAM: hires_cam}


def default_level(model: SegmentationNetwork) -> int:
    """The shallowest message level (it sees every message), or level 1 for networks without messages."""
    if model.message_levels:
        return min(model.message_levels)
    return min(LEVEL_WITHOUT_MESSAGES, len(model.widths) - 1)


@contextlib.contextmanager
def _captured_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's forward output under its name; the hooks are removed on exit."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name, module in modules.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _mask_and_score(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxels explained (``mask``, or all when it is empty) and the sum of ``logits`` over them."""
    explained = mask if bool(mask.any()) else torch.ones_like(mask)
    return explained, logits[explained].sum()


def _targets(
    output: SegmentationOutput, ensemble: bool = False
) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(segmentor, region, logits [1, *spatial], predicted mask) to explain.

    Per segmentor and owned region; for ensembles per region, the members' mean logits inside the
    ensemble's mask (mean probability above :data:`~ciml.tasks.REGION_THRESHOLD`).
    """
    if ensemble:
        stacked = torch.stack(list(output.logits.values()))
        regions = next(iter(output.owned.values()))
        mean, probability = stacked.mean(0), torch.sigmoid(stacked.detach()).mean(0)
        return [
            (ENSEMBLE, r, mean[:, c], probability[:, c] > REGION_THRESHOLD) for c, r in enumerate(regions)
        ]
    return [
        (m, r, logits[:, c], logits[:, c].detach() > 0)
        for m, logits in output.logits.items()
        for c, r in enumerate(output.owned[m])
    ]


def _detached(output: SegmentationOutput) -> SegmentationOutput:
    """A copy of ``output`` that holds no autograd graph."""

    def detach(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in values.items()}

    return SegmentationOutput(
        logits=detach(output.logits),
        owned=dict(output.owned),
        kl=output.kl.detach(),
        kl_terms=detach(output.kl_terms),
        kl_maps=detach(output.kl_maps),
        attention_maps=detach(output.attention_maps),
    )


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.dim() not in (4, 5) or x.shape[0] != 1:
        raise CimlError(
            f"explanations take one case at a time: expected [1, M, *spatial], got {tuple(x.shape)}"
        )
    return x.detach().clone().float().requires_grad_(True)


def spatial_mean(features: torch.Tensor) -> torch.Tensor:
    """Each channel's mean over the spatial dims, broadcast back to ``features``' shape: no "where" left."""
    return features.mean(dim=tuple(range(2, features.dim())), keepdim=True).expand_as(features).contiguous()


@contextlib.contextmanager
def _flattened(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module`` outputs its output's :func:`spatial_mean` (the hook is removed on exit)."""
    handle = module.register_forward_hook(lambda _m, _i, out: spatial_mean(out))
    try:
        yield
    finally:
        handle.remove()


Ablations = Mapping[str, Callable[[], SegmentationOutput]]


def _effects(
    explained: Sequence[torch.Tensor],
    ensemble: bool,
    run: Callable[[], SegmentationOutput],
    ablated: Ablations,
) -> list[dict[str, float]]:
    """Per target, modality -> score of the plain run minus the score with that modality ablated.

    Every run is a forward pass without gradients, so the plain score and the ablated ones come from the
    same kernels: a modality with no path to a target has an effect of exactly 0.
    """

    def scores(output: SegmentationOutput) -> list[float]:
        targets = _targets(output, ensemble)
        return [float(t[2][e].double().sum()) for t, e in zip(targets, explained, strict=True)]

    with torch.no_grad():
        plain = scores(run())
        without = {m: scores(ablate()) for m, ablate in ablated.items()}
    return [{m: plain[i] - without[m][i] for m in ablated} for i in range(len(plain))]


def _contribution(
    segmentor: str,
    region: str,
    maps: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    explained: torch.Tensor,
    effect: dict[str, float],
) -> Contribution:
    """Maps [1, 1, *s] upsampled (linearly) to the mask's grid, on the CPU, with their masses inside it."""
    size = tuple(mask.shape[1:])
    mode = "trilinear" if len(size) == 3 else "bilinear"
    full = {}
    for m, v in maps.items():
        if tuple(v.shape[2:]) != size:
            v = F.interpolate(v, size=size, mode=mode, align_corners=False)
        full[m] = v[0, 0].detach().float().cpu()
    inside = explained[0].cpu()
    mass = {m: float(v[inside].sum()) for m, v in full.items()}
    return Contribution(segmentor, region, full, mass, mask[0].cpu(), effect)


def gradcam_contributions(
    model: SegmentationNetwork,
    x: torch.Tensor,
    level: int | None = None,
    present: Iterable[str] | None = None,
    cam: str = GRADCAM,
    return_maps: bool = False,
) -> GradCamResult:
    """Grad-CAM on every present modality's encoder at ``level`` for every segmentor and region.

    Args:
        model: a CIML network (ciml, ciml-beta0, ciml-nomsg or ensemble) in eval mode.
        x: one case, [1, M, *spatial], sizes divisible by the network's 2^(levels - 1).
        level: encoder level (0 = full resolution); default :func:`default_level`.
        present: modalities available (default all).
        cam: ``gradcam`` or ``hirescam``.
        return_maps: keep the gates' attention and KL maps in ``result.output`` (same forward pass).
    """
    if cam not in CAMS:
        raise ParameterError("cam", f"must be one of {', '.join(CAMS)}, got {cam!r}")
    level = default_level(model) if level is None else int(level)
    if not 0 <= level < len(model.widths):
        raise ParameterError("level", f"{level}: the network has levels 0..{len(model.widths) - 1}")
    x = _check_input(x)
    names = [m for m in model.modalities if present is None or m in set(present)]
    stages = {m: model.encoders[m].stages[level] for m in names}
    ensemble = model.is_ensemble
    found = []
    # hooks on the per-modality encoder stages fire only in the per-segmentor form
    with model.per_segmentor():
        with torch.enable_grad(), _captured_outputs(stages) as features:
            output = model(x, present=present, return_maps=return_maps)
            activations = [features[m] for m in names]
            for segmentor, region, logits, mask in _targets(output, ensemble):
                explained, score = _mask_and_score(logits, mask)
                grads = torch.autograd.grad(score, activations, retain_graph=True, allow_unused=True)
                cams = zip(names, activations, grads, strict=True)
                maps = {m: CAMS[cam](a.detach(), g) for m, a, g in cams}
                found.append((segmentor, region, maps, mask, explained))
            output = _detached(output)  # frees the graph before the ablations
        del activations, features  # nor the encoders' part

        def run(stage: nn.Module | None = None) -> SegmentationOutput:
            with _flattened(stage) if stage is not None else contextlib.nullcontext():
                return model(x, present=present)

        ablations = {m: functools.partial(run, stages[m]) for m in names}
        effects = _effects([f[4] for f in found], ensemble, run, ablations)
    contributions = [_contribution(*f, e) for f, e in zip(found, effects, strict=True)]
    return GradCamResult(cam, level, contributions, _ciml_notes(model, level, cam), output)


def _ciml_notes(model: SegmentationNetwork, level: int, cam: str) -> list[str]:
    name = {GRADCAM: "Grad-CAM", HIRESCAM: "HiResCAM"}[cam]
    notes = [
        f"{name} on each modality's encoder features at level {level} (1/{2**level} resolution) of the "
        "sum of the region's logits inside the segmentor's predicted mask. A modality's share is how much "
        "that sum changes when its features there are replaced by their spatial mean (its size, "
        "normalised over the modalities), not its map's mass."
    ]
    if cam == GRADCAM:
        notes.append(
            "Grad-CAM weighs each channel by its gradient averaged over the whole grid, where the gradient "
            "around a region often has the other sign: a modality's map can be clipped to zero although it "
            "carries the region (its share says so). HiResCAM (cam hirescam) follows the gradient voxel "
            "by voxel."
        )
    if model.is_ensemble:
        notes.append(
            "Ensemble: every member sees only its own modality and there are no messages, so each region "
            "is explained for the members' averaged logits inside the ensemble's mask, with Grad-CAM on "
            "each member's own encoder."
        )
    elif not model.message_levels:
        notes.append(
            "No messages between segmentors: each segmentor's contribution is its own modality's alone."
        )
    elif level > min(model.message_levels):
        shallower = [lv for lv in model.message_levels if lv < level]
        notes.append(
            f"Messages at level(s) {', '.join(map(str, shallower))} bypass level {level}: other modalities' "
            "shares leave them out."
        )
    return notes


def input_gradient_contributions(
    model: nn.Module, x: torch.Tensor, modalities: Iterable[str]
) -> GradCamResult:
    """The fallback for networks on stacked channels: relu(input x d score / d input) per channel.

    Shares ablate each input channel (replaced by its spatial mean), as CIML's ablate each encoder.
    """
    x = _check_input(x)
    names = list(modalities)
    found = []
    with torch.enable_grad():
        output = model(x)
        for segmentor, region, logits, mask in _targets(output):
            explained, score = _mask_and_score(logits, mask)
            (gradient,) = torch.autograd.grad(score, x, retain_graph=True)
            saliency = F.relu(gradient * x).detach()
            maps = {m: saliency[:, i : i + 1] for i, m in enumerate(names)}
            found.append((segmentor, region, maps, mask, explained))
    plain = x.detach()

    def run(channel: int | None = None) -> SegmentationOutput:
        if channel is None:
            return model(plain)
        flat = plain.clone()
        flat[:, channel] = spatial_mean(plain[:, channel : channel + 1])[:, 0]
        return model(flat)

    ablations = {m: functools.partial(run, i) for i, m in enumerate(names)}
    effects = _effects([f[4] for f in found], False, run, ablations)
    contributions = [_contribution(*f, e) for f, e in zip(found, effects, strict=True)]
    note = (
        "One network sees all modalities stacked as channels, so Grad-CAM on its shared features cannot "
        "separate them; maps are input-gradient x input per channel (positive part), and a modality's "
        "share is how much the score changes when its input channel is replaced by its spatial mean."
    )
    return GradCamResult(INPUT_GRADIENT, None, contributions, [note], _detached(output))


def explain_contributions(
    model: nn.Module,
    x: torch.Tensor,
    *,
    level: int | None = None,
    present: Iterable[str] | None = None,
    cam: str = GRADCAM,
    return_maps: bool = False,
) -> GradCamResult:
    """Contributions of each modality to every segmentor's regions, by the best method the network allows.

    Args:
        model: any ciml network, in eval mode.
        x: one case [1, M, *spatial].
        level: encoder level (CIML networks only; default :func:`default_level`).
        present: modalities available (CIML networks only; default all).
        cam: ``gradcam`` or ``hirescam`` (CIML networks only).
        return_maps: keep the gates' maps in ``result.output`` (CIML networks).
    """
    if model.private_encoders:
        return gradcam_contributions(model, x, level, present, cam, return_maps)
    if present is not None and set(present) != set(model.modalities):
        raise CimlError("a network on stacked modalities can only be explained with every modality present")
    return input_gradient_contributions(model, x, model.modalities)
