"""One registry that builds any network from a name, a task spec and width/depth settings.

Example:
    >>> from ciml.tasks import load_task
    >>> model = build_model("ciml", load_task("brats2020"), widths=(4, 8), spatial_dims=3)
    >>> sorted(model.config)
    ['format_version', 'message_channels', 'message_levels', 'name', 'spatial_dims', 'task', 'widths']
    >>> model.owners["TC"]
    ('t1', 't1ce', 't2')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ciml.errors import CimlError
from ciml.models.baselines import JointUNet, SegResNetPeer
from ciml.models.ciml import CIMLNet
from ciml.models.interface import SegmentationNetwork
from ciml.tasks import TaskSpec, load_task

DEFAULT_WIDTHS = (32, 64, 128, 256, 320)
#: Version of ``model.config`` and of the checkpoints written with it. 1: before message_channels (read
#: as full-width messages, the same architecture); 2: adds ``message_channels`` and this key.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class ModelEntry:
    """How to build one named model, and the facts the registry knows about it.

    Attributes:
        fixed_beta: the bottleneck weight its loss always uses (None: the requested one).
        zero_fill: it can be built to run on a modality subset with the absent channels zeroed (the
            standard missing-modality baseline for networks on stacked modalities).
    """

    build: Callable[..., SegmentationNetwork]
    description: str
    fixed_beta: float | None = None
    zero_fill: bool = False


def _fallback_by_modality(spec: TaskSpec) -> dict[str, tuple[str, ...]]:
    """The spec's ``fallback_owners`` (region -> modalities) as modality -> regions it stands in for."""
    out: dict[str, list[str]] = {}
    for region, modalities in spec.fallback_owners.items():
        for modality in modalities:
            out.setdefault(modality, []).append(region)
    return {m: tuple(regions) for m, regions in out.items()}


@dataclass(frozen=True)
class _Architecture:
    """What every builder needs: the task and the backbone's shape."""

    spec: TaskSpec
    widths: tuple[int, ...]
    spatial_dims: int
    message_levels: Sequence[int] | None = None
    message_channels: int | Sequence[int] | None = None


def _ciml(a: _Architecture, **interface: Any) -> SegmentationNetwork:
    return CIMLNet(
        a.spec.modality_names,
        a.spec.decomposition,
        a.widths,
        a.spatial_dims,
        a.message_levels,
        fallback=_fallback_by_modality(a.spec),
        message_channels=a.message_channels,
        **interface,
    )


def _ciml_nomsg(a: _Architecture, **interface: Any) -> SegmentationNetwork:
    fallback = _fallback_by_modality(a.spec)
    return CIMLNet(
        a.spec.modality_names, a.spec.decomposition, a.widths, a.spatial_dims, (), fallback, **interface
    )


def _ensemble(a: _Architecture, **interface: Any) -> SegmentationNetwork:
    every_region = {m: a.spec.region_names for m in a.spec.modality_names}
    return CIMLNet(a.spec.modality_names, every_region, a.widths, a.spatial_dims, (), **interface)


def _joint(a: _Architecture, **interface: Any) -> SegmentationNetwork:
    return JointUNet(a.spec.modality_names, a.spec.region_names, a.widths, a.spatial_dims, **interface)


def _segresnet(a: _Architecture, **interface: Any) -> SegmentationNetwork:
    return SegResNetPeer(a.spec.modality_names, a.spec.region_names, a.widths, a.spatial_dims, **interface)


MODELS: dict[str, ModelEntry] = {
    "ciml": ModelEntry(_ciml, "CIML: decomposed segmentors with gated, bottlenecked messages"),
    "ciml-beta0": ModelEntry(
        _ciml, "CIML with the bottleneck off (beta = 0): attention only", fixed_beta=0.0
    ),
    "ciml-nomsg": ModelEntry(_ciml_nomsg, "task decomposition only, no messages"),
    "joint": ModelEntry(_joint, "one U-Net on all modalities stacked as channels", zero_fill=True),
    "ensemble": ModelEntry(_ensemble, "one U-Net per modality, each predicting every region, averaged"),
    "segresnet": ModelEntry(
        _segresnet, "MONAI SegResNet on stacked modalities (external peer)", zero_fill=True
    ),
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(
    name: str,
    task: TaskSpec | str | dict[str, Any],
    widths: Sequence[int] = DEFAULT_WIDTHS,
    spatial_dims: int = 3,
    message_levels: Sequence[int] | None = None,
    zero_fill_missing: bool = False,
    message_channels: int | Sequence[int] | None = None,
    deep_supervision: bool = False,
) -> SegmentationNetwork:
    """Build a named network for ``task``.

    The network declares its facts (:class:`~ciml.models.interface.SegmentationNetwork`); its
    ``config`` holds what rebuilds it (see :func:`model_from_config`). ``zero_fill_missing`` lets a
    network on stacked modalities (entries with ``zero_fill``) run without some modalities, their channels
    zeroed, for models trained with modality dropout; CIML-family networks skip a missing modality's
    segmentor anyway and ignore it. ``message_channels``: channels of the gates' value and latent z, one
    for all levels or one per level (capped at each level's width; default: the width itself); ignored
    by networks without gates. ``deep_supervision``: auxiliary decoder heads at the coarser scales for
    nnU-Net's weighted multi-scale loss (training only; networks without ``supports_deep_supervision``,
    such as segresnet, refuse it); recorded in the config only when on, so older configs rebuild
    without it.

    Raises:
        CimlError: unknown model name or invalid settings (a ParameterError for ``deep_supervision``
            on a network that does not support it).
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
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": spec.to_dict(),
        "widths": list(widths),
        "spatial_dims": spatial_dims,
        "message_levels": None if message_levels is None else list(message_levels),
        "message_channels": message_channels,
    }
    entry = MODELS[name]
    options = {}
    if zero_fill_missing and entry.zero_fill:
        config["zero_fill_missing"] = True  # absent from older configs: they refuse missing inputs
        options["zero_fill_missing"] = True
    if deep_supervision:
        config["deep_supervision"] = True  # absent from older configs: no auxiliary heads
        options["deep_supervision"] = True
    try:
        architecture = _Architecture(spec, widths, spatial_dims, message_levels, message_channels)
        return entry.build(architecture, config=config, fixed_beta=entry.fixed_beta, **options)
    except ValueError as error:
        raise CimlError(str(error)) from error


def model_from_config(config: dict[str, Any]) -> SegmentationNetwork:
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
        zero_fill_missing=bool(config.get("zero_fill_missing", False)),
        message_channels=config.get("message_channels"),
        deep_supervision=bool(config.get("deep_supervision", False)),
    )


def check_state_dict(model: SegmentationNetwork, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not fit ``model``, naming the format versions involved.

    Raises:
        CimlError: a missing or unexpected parameter, or one of a different shape.
    """
    own = model.state_dict()
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        first = (mismatched or missing or unexpected)[0]
        version = model.config.get("format_version", 1)
        raise CimlError(
            f"weights do not fit the model (config format version {version}, this ciml writes "
            f"{FORMAT_VERSION}): {len(mismatched)} tensors of another shape, {len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {first!r}"
        )
