"""Training-time augmentation of patches with MONAI's dictionary transforms, nnU-Net's recipe by default.

A patch is a dict ``{"image": [M, *spatial], "target": [C, *spatial]}``. Spatial transforms move both
(the image with linear interpolation, the target with nearest, so region masks stay binary); intensity
transforms see only ``"image"``, so labels are never touched by them. Every transform is MONAI's; this
module only names them, holds nnU-Net's defaults and seeds them: each patch re-seeds the whole chain
from the sampler's :class:`numpy.random.Generator`, so a batch is a function of the generator's seed.

The catalog (:data:`AUGMENTATIONS`), in the order the transforms run (nnU-Net v2's order):

==============  ====  =========================================================  ==========================
name            p     parameters (defaults)                                      MONAI
==============  ====  =========================================================  ==========================
rotation        0.2   degrees 30 (each axis uniform in ±degrees)                 RandRotated
scaling         0.2   range [0.7, 1.4] (isotropic zoom)                          RandZoomd
elastic         0.2   sigma [9, 13], magnitude [0, 200]; not in ``default``      Rand3DElasticd
noise           0.1   std 0.1 (std uniform in [0, std])                          RandGaussianNoised
blur            0.2   sigma [0.5, 1.0]                                           RandGaussianSmoothd
brightness      0.15  range [0.75, 1.25] (multiplicative, per modality)          RandScaleIntensityd
contrast        0.15  range [0.75, 1.25] (about the mean, range kept, per mod.)  RandScaleIntensityFixedMeand
low_resolution  0.25  zoom [0.5, 1.0] (nearest down, linear up)                  RandSimulateLowResolutiond
gamma_inverted  0.1   range [0.7, 1.5] (gamma of the inverted image, stats kept) RandAdjustContrastd
gamma           0.3   range [0.7, 1.5] (stats kept)                              RandAdjustContrastd
mirror          0.5   per spatial axis                                           RandFlipd
==============  ====  =========================================================  ==========================

Where nnU-Net differs: it rotates and scales a larger crop in one resampling (here each patch is
resampled per transform and corners that leave the patch are zero), and it draws blur, noise, gamma and
low resolution per modality, where MONAI draws one value for all channels of a patch.

Choosing transforms (:func:`augmentation_config`): a *selection* (``"default"``, ``"none"``, or names,
``"default,elastic"`` adds to the default) picks the set; *parameters* tune them (``p`` is the
probability; ``p: 0`` switches one off). A task spec may carry either form under
``training: {augmentation: ...}``::

    training:
      augmentation: default,elastic            # a selection (string or list of names)
    training:
      augmentation:
        transforms: default                    # the selection (default: default)
        rotation: {p: 0.3, degrees: 15}        # parameters of selected transforms
        gamma: 0.5                             # a number is the probability
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.utils import MAX_SEED

from ciml.errors import ParameterError
from ciml.tasks import TaskSpec, TaskSpecError

IMAGE, TARGET = "image", "target"
BOTH = (IMAGE, TARGET)
DEFAULT, NONE = "default", "none"
#: The settings key under a task spec's ``training`` block.
SPEC_KEY = "augmentation"
#: torch's "nearest" resize picks floor(i * scale), shifting labels up to a voxel off the linearly
#: resized image; "nearest-exact" picks the voxel whose centre is nearest (as nnU-Net v2 does).
NEAREST_EXACT = "nearest-exact"


@dataclass(frozen=True)
class Transform:
    """One named augmentation: nnU-Net's probability, tunable parameters and the MONAI builder."""

    p: float
    params: Mapping[str, float | tuple[float, float]]
    build: Callable[[dict[str, Any], int], list[mt.MapTransform]]
    in_default: bool = True


def _linear(ndim: int) -> str:
    return "trilinear" if ndim == 3 else "bilinear"


def _rotation(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    r = math.radians(c["degrees"])
    ranges = {"range_x": r, "range_y": r, "range_z": r} if ndim == 3 else {"range_x": r}
    return [mt.RandRotated(BOTH, **ranges, prob=c["p"], mode=("bilinear", "nearest"), padding_mode="zeros")]


def _scaling(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    low, high = c["range"]
    return [
        mt.RandZoomd(
            BOTH,
            prob=c["p"],
            min_zoom=low,
            max_zoom=high,
            mode=(_linear(ndim), NEAREST_EXACT),
            padding_mode="constant",
            keep_size=True,
        )
    ]


def _elastic(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    if ndim != 3:
        raise ParameterError("augment", "elastic needs 3D patches (MONAI's Rand3DElasticd)")
    return [
        mt.Rand3DElasticd(
            BOTH,
            sigma_range=tuple(c["sigma"]),
            magnitude_range=tuple(c["magnitude"]),
            prob=c["p"],
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        )
    ]


def _noise(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    return [mt.RandGaussianNoised(IMAGE, prob=c["p"], mean=0.0, std=c["std"], sample_std=True)]


def _blur(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    sigma = tuple(c["sigma"])
    return [mt.RandGaussianSmoothd(IMAGE, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=c["p"])]


def _factors(c: dict[str, Any]) -> tuple[float, float]:
    """MONAI's scale factors f for v * (1 + f) from a range of multipliers."""
    low, high = c["range"]
    return (low - 1.0, high - 1.0)


def _brightness(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    return [mt.RandScaleIntensityd(IMAGE, factors=_factors(c), prob=c["p"], channel_wise=True)]


def _contrast(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    return [
        mt.RandScaleIntensityFixedMeand(
            IMAGE, factors=_factors(c), fixed_mean=True, preserve_range=True, prob=c["p"], channel_wise=True
        )
    ]


def _low_resolution(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    return [
        mt.RandSimulateLowResolutiond(
            IMAGE,
            prob=c["p"],
            zoom_range=tuple(c["zoom"]),
            downsample_mode=NEAREST_EXACT,
            upsample_mode=_linear(ndim),
        )
    ]


def _gamma(invert: bool) -> Callable[[dict[str, Any], int], list[mt.MapTransform]]:
    def build(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
        return [
            mt.RandAdjustContrastd(
                IMAGE, prob=c["p"], gamma=tuple(c["range"]), invert_image=invert, retain_stats=True
            )
        ]

    return build


def _mirror(c: dict[str, Any], ndim: int) -> list[mt.MapTransform]:
    return [mt.RandFlipd(BOTH, prob=c["p"], spatial_axis=axis) for axis in range(ndim)]


#: Every augmentation by name, in the order they run; ``p`` and ``params`` are nnU-Net's defaults.
AUGMENTATIONS: dict[str, Transform] = {
    "rotation": Transform(0.2, {"degrees": 30.0}, _rotation),
    "scaling": Transform(0.2, {"range": (0.7, 1.4)}, _scaling),
    "elastic": Transform(0.2, {"sigma": (9.0, 13.0), "magnitude": (0.0, 200.0)}, _elastic, in_default=False),
    "noise": Transform(0.1, {"std": 0.1}, _noise),
    "blur": Transform(0.2, {"sigma": (0.5, 1.0)}, _blur),
    "brightness": Transform(0.15, {"range": (0.75, 1.25)}, _brightness),
    "contrast": Transform(0.15, {"range": (0.75, 1.25)}, _contrast),
    "low_resolution": Transform(0.25, {"zoom": (0.5, 1.0)}, _low_resolution),
    "gamma_inverted": Transform(0.1, {"range": (0.7, 1.5)}, _gamma(invert=True)),
    "gamma": Transform(0.3, {"range": (0.7, 1.5)}, _gamma(invert=False)),
    "mirror": Transform(0.5, {}, _mirror),
}
SPATIAL = ("rotation", "scaling", "elastic", "mirror")
DEFAULT_AUGMENTATIONS = tuple(n for n, t in AUGMENTATIONS.items() if t.in_default)


def augmentation_names() -> list[str]:
    """Names a selection may use: the transforms and the groups ``default`` and ``none``."""
    return [DEFAULT, NONE, *AUGMENTATIONS]


class _Refusal(ValueError):
    """A bad selection or parameter; re-raised as the caller's error type with its own key."""


def parse_selection(selection: str | Sequence[str] | bool | None) -> tuple[str, ...]:
    """The transform names a selection picks, in run order (``"default,elastic"``, ``["mirror"]``).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or ``none`` mixed with others.
    """
    if selection is None or selection is True:
        return DEFAULT_AUGMENTATIONS
    if selection is False:
        return ()
    items = selection.split(",") if isinstance(selection, str) else list(selection)
    names = [str(i).strip().lower() for i in items if str(i).strip()]
    unknown = [n for n in names if n not in augmentation_names()]
    if unknown:
        raise _Refusal(f"unknown augmentation {unknown[0]!r}; valid: {', '.join(augmentation_names())}")
    if NONE in names:
        if len(names) > 1:
            raise _Refusal("'none' cannot be combined with other augmentations")
        return ()
    if not names:
        raise _Refusal(f"empty selection; valid: {', '.join(augmentation_names())}")
    chosen = set(names) | (set(DEFAULT_AUGMENTATIONS) if DEFAULT in names else set())
    return tuple(n for n in AUGMENTATIONS if n in chosen)


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _Refusal(f"{name}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _parameters(name: str, given: Any) -> dict[str, Any]:
    """``given`` (a probability or a mapping of parameters) checked against the catalog entry."""
    entry = AUGMENTATIONS[name]
    if not isinstance(given, Mapping):
        given = {"p": given}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == "p":
            p = _number(name, "p", value)
            if p > 1:
                raise _Refusal(f"{name}.p must be a probability in [0, 1], got {value!r}")
            out["p"] = p
        elif key not in entry.params:
            allowed = ", ".join(["p", *entry.params])
            raise _Refusal(f"{name}: unknown parameter {key!r} (allowed: {allowed})")
        elif isinstance(entry.params[key], tuple):
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
                raise _Refusal(f"{name}.{key} must be [low, high], got {value!r}")
            low, high = (_number(name, key, v) for v in value)
            if low > high:
                raise _Refusal(f"{name}.{key} must be [low, high] with low <= high, got {list(value)}")
            out[key] = (low, high)
        else:
            out[key] = _number(name, key, value)
    return out


def _split_spec_block(block: Any) -> tuple[Any, dict[str, Any]]:
    """A spec's ``training.augmentation`` as (selection, parameters by name)."""
    if block is None or isinstance(block, str | bool | Sequence):
        return block, {}
    if not isinstance(block, Mapping):
        raise _Refusal(
            "must be a selection (default, none or names) or a mapping of transforms and parameters"
        )
    params = {str(k): v for k, v in block.items() if k != "transforms"}
    for name in params:
        if name not in AUGMENTATIONS:
            raise _Refusal(
                f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)} (or transforms)"
            )
    return block.get("transforms"), params


def augmentation_config(
    selection: str | Sequence[str] | None = None,
    probabilities: Mapping[str, float] | Sequence[tuple[str, float]] = (),
    spec: TaskSpec | None = None,
) -> dict[str, dict[str, Any]]:
    """The augmentation a run uses: selected transform -> its parameters (``p`` first), in run order.

    Args:
        selection: ``"default"``, ``"none"``, names (``"default,elastic"``); None takes the task spec's
            ``training.augmentation`` selection, and without one the default.
        probabilities: probability overrides by name, applied last; each must name a selected transform.
        spec: the task, whose ``training.augmentation`` parameters tune the selected transforms.

    Raises:
        ParameterError: a bad ``selection`` (``augment``) or ``probabilities`` (``augment_probability``).
        TaskSpecError: a bad ``training.augmentation`` block in the task spec.
    """
    block = spec.training.get(SPEC_KEY) if spec is not None else None
    source = f"task {spec.name}" if spec is not None else "task"
    try:
        spec_selection, spec_params = _split_spec_block(block)
        spec_names = parse_selection(spec_selection)
        tuned = {name: _parameters(name, given) for name, given in spec_params.items()}
    except _Refusal as exc:
        raise TaskSpecError(f"{source}: 'training.{SPEC_KEY}': {exc}") from None
    spec_unselected = sorted(set(tuned) - set(spec_names))
    if spec_unselected:
        raise TaskSpecError(
            f"{source}: 'training.{SPEC_KEY}': {spec_unselected[0]} has parameters but is not selected "
            f"(transforms: {', '.join(spec_names) or 'none'})"
        )
    try:
        names = spec_names if selection is None else parse_selection(selection)
    except _Refusal as exc:
        raise ParameterError("augment", str(exc)) from None
    config = {
        name: {"p": AUGMENTATIONS[name].p, **AUGMENTATIONS[name].params, **tuned.get(name, {})}
        for name in names
    }
    pairs = probabilities.items() if isinstance(probabilities, Mapping) else probabilities
    for name, p in pairs:
        if name not in config:
            known = name in AUGMENTATIONS
            why = "is not selected" if known else "is not an augmentation"
            raise ParameterError(
                "augment_probability",
                f"{name!r} {why}; selected: {', '.join(config) or 'none'}"
                + (f" (add it to augment, e.g. default,{name})" if known else ""),
            )
        try:
            config[name].update(_parameters(name, {"p": p}))
        except _Refusal as exc:
            raise ParameterError("augment_probability", str(exc)) from None
    return {
        name: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()} for name, c in config.items()
    }


class Augmentation:
    """Callable ``(image, target, rng) -> (image, target)`` applying ``config`` to one patch.

    ``image`` is ``[M, *spatial]`` float, ``target`` ``[C, *spatial]`` or ``[*spatial]`` (any dtype: it
    comes back in its own dtype, moved only by the spatial transforms, with nearest interpolation). One
    draw from ``rng`` seeds every transform, so equal generators give equal patches.
    """

    def __init__(self, config: Mapping[str, Mapping[str, Any]], spatial_dims: int = 3) -> None:
        self.config = {name: dict(c) for name, c in config.items()}
        chain = [
            t
            for name, c in self.config.items()
            if c["p"] > 0
            for t in AUGMENTATIONS[name].build(c, spatial_dims)
        ]
        self.compose = mt.Compose(chain) if chain else None

    def __call__(
        self, image: np.ndarray, target: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.compose is None:
            return image, target
        self.compose.set_random_state(seed=int(rng.integers(MAX_SEED)))
        channel = target.ndim == image.ndim - 1
        data = {
            IMAGE: torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            TARGET: torch.from_numpy(np.asarray(target[None] if channel else target, dtype=np.float32)),
        }
        out = self.compose(data)
        moved = _numpy(out[TARGET])
        return _numpy(out[IMAGE]), (moved[0] if channel else moved).astype(target.dtype, copy=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(c) for name, c in self.config.items()}


def _numpy(value: Any) -> np.ndarray:
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return np.ascontiguousarray(tensor.detach().cpu().numpy())
