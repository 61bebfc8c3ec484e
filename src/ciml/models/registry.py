"""One registry that builds any network from a name, a task spec and width/depth settings.

Example:
    >>> from ciml.tasks import load_task
    >>> model = build_model("ciml", load_task("brats2020"), widths=(4, 8), spatial_dims=3)
    >>> sorted(model.config)
    ['format_version', 'message_channels', 'message_levels', 'name', 'spatial_dims', 'task', 'widths']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ciml.errors import CimlError
from ciml.models.baselines import JointUNet, SegResNetPeer
from ciml.models.ciml import CIMLNet
from ciml.tasks import TaskSpec, load_task

DEFAULT_WIDTHS = (32, 64, 128, 256, 320)
#: Version of ``model.config`` and of the checkpoints written with it. 1: before message_channels (read
#: as full-width messages, the same architecture); 2: adds ``message_channels`` and this key.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class ModelEntry:
    """How to build one named model, and whether its loss ignores the bottleneck weight."""

    build: Callable[..., nn.Module]
    description: str
    fixed_beta: float | None = None


def _fallback_by_modality(spec: TaskSpec) -> dict[str, tuple[str, ...]]:
    """The spec's ``fallback_owners`` (region -> modalities) as modality -> regions it stands in for."""
    out: dict[str, list[str]] = {}
    for region, modalities in spec.fallback_owners.items():
        for modality in modalities:
            out.setdefault(modality, []).append(region)
    return {m: tuple(regions) for m, regions in out.items()}


def _ciml(
    spec: TaskSpec, widths: Sequence[int], spatial_dims: int, message_levels=None, message_channels=None
) -> nn.Module:
    return CIMLNet(
        spec.modality_names,
        spec.decomposition,
        widths,
        spatial_dims,
        message_levels,
        fallback=_fallback_by_modality(spec),
        message_channels=message_channels,
    )


def _ciml_nomsg(
    spec: TaskSpec, widths: Sequence[int], spatial_dims: int, message_levels=None, message_channels=None
) -> nn.Module:
    return CIMLNet(
        spec.modality_names,
        spec.decomposition,
        widths,
        spatial_dims,
        message_levels=(),
        fallback=_fallback_by_modality(spec),
    )


def _ensemble(
    spec: TaskSpec, widths: Sequence[int], spatial_dims: int, message_levels=None, message_channels=None
) -> nn.Module:
    every_region = {m: spec.region_names for m in spec.modality_names}
    return CIMLNet(spec.modality_names, every_region, widths, spatial_dims, message_levels=())


def _joint(
    spec: TaskSpec, widths: Sequence[int], spatial_dims: int, message_levels=None, message_channels=None
) -> nn.Module:
    return JointUNet(spec.modality_names, spec.region_names, widths, spatial_dims)


def _segresnet(
    spec: TaskSpec, widths: Sequence[int], spatial_dims: int, message_levels=None, message_channels=None
) -> nn.Module:
    return SegResNetPeer(spec.modality_names, spec.region_names, widths, spatial_dims)


MODELS: dict[str, ModelEntry] = {
    "ciml": ModelEntry(_ciml, "CIML: decomposed segmentors with gated, bottlenecked messages"),
    "ciml-beta0": ModelEntry(
        _ciml, "CIML with the bottleneck off (beta = 0): attention only", fixed_beta=0.0
    ),
    "ciml-nomsg": ModelEntry(_ciml_nomsg, "task decomposition only, no messages"),
    "joint": ModelEntry(_joint, "one U-Net on all modalities stacked as channels"),
    "ensemble": ModelEntry(_ensemble, "one U-Net per modality, each predicting every region, averaged"),
    "segresnet": ModelEntry(_segresnet, "MONAI SegResNet on stacked modalities (external peer)"),
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(
    name: str,
    task: TaskSpec | str | dict[str, Any],
    widths: Sequence[int] = DEFAULT_WIDTHS,
    spatial_dims: int = 3,
    message_levels: Sequence[int] | None = None,
    message_channels: int | Sequence[int] | None = None,
) -> nn.Module:
    """Build a named network for ``task``.

    ``model.config`` holds what rebuilds it (see :func:`model_from_config`).
    ``message_channels``: channels of the gates' value and latent z, one for all levels or one per
    level (capped at each level's width; default: the width itself). Ignored by networks without gates.

    Raises:
        CimlError: unknown model name or invalid settings.
    """
    if name not in MODELS:
        raise CimlError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = load_task(task)
    widths = tuple(int(w) for w in widths)
    if not widths or any(w <= 0 for w in widths):
        raise CimlError(f"widths must be positive integers, got {widths}")
    if spatial_dims not in (2, 3):
        raise CimlError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if message_channels is not None and not isinstance(message_channels, int):
        message_channels = [int(c) for c in message_channels]
    try:
        model = MODELS[name].build(spec, widths, spatial_dims, message_levels, message_channels)
    except ValueError as error:
        raise CimlError(str(error)) from error
    model.config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": spec.to_dict(),
        "widths": list(widths),
        "spatial_dims": spatial_dims,
        "message_levels": None if message_levels is None else list(message_levels),
        "message_channels": message_channels,
    }
    model.fixed_beta = MODELS[name].fixed_beta
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``model.config`` (as stored in checkpoints).

    A config without ``format_version`` is version 1 (full-width messages, the same architecture).

    Raises:
        CimlError: the config comes from a newer ciml (a format this version cannot build).
    """
    version = int(config.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise CimlError(
            f"checkpoint model format version {version} is newer than this ciml's ({FORMAT_VERSION}); "
            "upgrade ciml to load it"
        )
    return build_model(
        config["name"],
        config["task"],
        config["widths"],
        config["spatial_dims"],
        config.get("message_levels"),
        config.get("message_channels"),
    )


def check_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not fit ``model``, naming the format versions involved.

    Raises:
        CimlError: a missing or unexpected parameter, or one of a different shape.
    """
    own = model.state_dict()
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        first = (mismatched or missing or unexpected)[0]
        version = model.config.get("format_version", 1) if hasattr(model, "config") else "?"
        raise CimlError(
            f"checkpoint does not fit the model (config format version {version}, this ciml writes "
            f"{FORMAT_VERSION}): {len(mismatched)} tensors of another shape, {len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {first!r}"
        )


def size_divisor(model: nn.Module) -> int:
    """Input sizes must be divisible by this (2 ** downsamplings)."""
    return 2 ** (len(model.config["widths"]) - 1)
