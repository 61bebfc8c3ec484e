"""Task specs: which modalities a dataset has, which regions it segments, who owns what.

A task spec is data (a YAML file), so a new dataset needs a file, not a code path. Presets ship in
``ciml/tasks/presets``; :func:`load_task` accepts a preset name or a path to the user's own YAML.

Example:
    >>> spec = load_task("brats2020")
    >>> spec.owners("TC")
    ('t1', 't1ce', 't2')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ciml.errors import CimlError

MODALITY_TYPES = ("mri", "ct", "pet", "synthetic")
#: A voxel belongs to a region when the region's probability exceeds this (training, prediction, explanation).
REGION_THRESHOLD = 0.5
_REQUIRED_KEYS = ("name", "modalities", "regions", "decomposition", "assembly")
_OPTIONAL_KEYS = ("fallback_owners", "description", "training", "labels")
_TRAINING_KEYS = {"patch_size": int, "batch_size": int, "widths": int, "target_spacing": float}
#: Checked here for its shape only; ciml.data.augmentation checks the names and parameters.
_AUGMENTATION_KEY = "augmentation"


class TaskSpecError(CimlError, ValueError):
    """A task spec is malformed; the message names the offending key."""


@dataclass(frozen=True)
class AssemblyStep:
    """Paint ``label`` where every region in ``regions`` is on (one region in the usual case)."""

    regions: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """A validated task spec. Build it with :func:`load_task` or :meth:`from_dict`.

    Attributes:
        name: dataset name.
        modalities: modality name -> modality type (mri, ct, pet, synthetic), in channel order.
        regions: region name -> label values that make up the region (regions may overlap).
        decomposition: primary modality -> regions its segmentor owns.
        assembly: painting order that turns regions back into a label map; later steps override.
        fallback_owners: region -> modalities whose segmentors may stand in when every owner is missing.
        training: default training sizes for this dataset (patch_size, batch_size, widths, target_spacing)
            and its augmentation (a selection or a mapping; see :mod:`ciml.data.augmentation`).
        label_names: label value -> what it means (``labels:`` in YAML). Datasets that name their labels
            (MSD and nnU-Net ``dataset.json``) are refused when their names disagree: BraTS 2020, BraTS
            2023 and MSD use the same small integers for different tissues.
    """

    name: str
    modalities: dict[str, str]
    regions: dict[str, tuple[int, ...]]
    decomposition: dict[str, tuple[str, ...]]
    assembly: tuple[AssemblyStep, ...]
    fallback_owners: dict[str, tuple[str, ...]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.modalities)

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(self.regions)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every label value the dataset uses, background 0 included."""
        values = {0} | {v for labels in self.regions.values() for v in labels}
        return tuple(sorted(values))

    def owners(self, region: str) -> tuple[str, ...]:
        """Modalities whose segmentors predict ``region``, in modality order."""
        return tuple(m for m in self.modalities if region in self.decomposition.get(m, ()))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back (stored in checkpoints and run folders)."""
        assembly = [[list(s.regions) if len(s.regions) > 1 else s.regions[0], s.label] for s in self.assembly]
        out: dict[str, Any] = {
            "name": self.name,
            "modalities": dict(self.modalities),
            "regions": {k: list(v) for k, v in self.regions.items()},
            "decomposition": {k: list(v) for k, v in self.decomposition.items()},
            "assembly": assembly,
        }
        if self.fallback_owners:
            out["fallback_owners"] = {k: list(v) for k, v in self.fallback_owners.items()}
        if self.training:
            out["training"] = dict(self.training)
        if self.label_names:
            out["labels"] = {str(v): n for v, n in self.label_names.items()}  # JSON keys are strings
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "task spec") -> TaskSpec:
        """Validate ``data`` and build a spec; errors name ``source`` and the offending key."""
        return _parse(data, source)

    def regions_to_labels(self, region_masks: np.ndarray) -> np.ndarray:
        """Assemble binary region masks ``[R, *spatial]`` (in ``region_names`` order) into a label map."""
        return assemble_labels(self, region_masks)

    def labels_to_regions(self, label_map: np.ndarray) -> np.ndarray:
        """Binary region masks ``[R, *spatial]`` (bool) from a label map in the dataset's label values."""
        label_map = np.asarray(label_map)
        return np.stack([np.isin(label_map, values) for values in self.regions.values()])


def _fail(source: str, key: str, message: str) -> TaskSpecError:
    return TaskSpecError(f"{source}: '{key}': {message}")


def _parse(data: Mapping[str, Any], source: str) -> TaskSpec:
    if not isinstance(data, Mapping):
        raise TaskSpecError(f"{source}: expected a mapping with keys {', '.join(_REQUIRED_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise _fail(source, key, "missing required key")
    unknown = set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS)
    if unknown:
        raise _fail(
            source, sorted(unknown)[0], f"unknown key (allowed: {', '.join(_REQUIRED_KEYS + _OPTIONAL_KEYS)})"
        )

    modalities = _parse_modalities(data["modalities"], source)
    regions = _parse_regions(data["regions"], source)
    decomposition = _parse_decomposition(data["decomposition"], modalities, regions, source)
    assembly = _parse_assembly(data["assembly"], regions, source)
    fallback = _parse_fallback(data.get("fallback_owners") or {}, modalities, regions, source)
    training = _parse_training(data.get("training") or {}, source)
    names = _parse_label_names(data.get("labels") or {}, regions, source)
    spec = TaskSpec(
        str(data["name"]), modalities, regions, decomposition, assembly, fallback, training, names
    )
    _check_assembly_round_trip(spec, source)
    return spec


def _parse_modalities(raw: Any, source: str) -> dict[str, str]:
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        raw = {name: "mri" for name in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(source, "modalities", "must be a non-empty mapping of modality name -> type")
    out = {}
    for name, kind in raw.items():
        if kind not in MODALITY_TYPES:
            raise _fail(
                source, f"modalities.{name}", f"type {kind!r} is not one of {', '.join(MODALITY_TYPES)}"
            )
        out[str(name)] = str(kind)
    return out


def _parse_regions(raw: Any, source: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(source, "regions", "must be a non-empty mapping of region name -> label values")
    out: dict[str, tuple[int, ...]] = {}
    seen: dict[tuple[int, ...], str] = {}
    for name, labels in raw.items():
        key = f"regions.{name}"
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels]
        if not isinstance(labels, Sequence) or not labels:
            raise _fail(source, key, "must list at least one label value")
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in labels):
            raise _fail(source, key, "label values must be positive integers (0 is background)")
        if len(set(labels)) != len(labels):
            raise _fail(source, key, f"duplicate label values in {list(labels)}")
        values = tuple(sorted(labels))
        if values in seen:
            raise _fail(source, key, f"same label values as region '{seen[values]}'")
        seen[values] = str(name)
        out[str(name)] = values
    return out


def _parse_decomposition(
    raw: Any, modalities: dict[str, str], regions: dict[str, tuple[int, ...]], source: str
) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(source, "decomposition", "must map primary modalities to the regions they own")
    out = {}
    for modality, owned in raw.items():
        key = f"decomposition.{modality}"
        if modality not in modalities:
            raise _fail(source, key, f"unknown modality (known: {', '.join(modalities)})")
        if isinstance(owned, str):
            owned = [owned]
        if not isinstance(owned, Sequence) or not owned:
            raise _fail(source, key, "must list at least one region")
        for region in owned:
            if region not in regions:
                raise _fail(source, key, f"unknown region {region!r} (known: {', '.join(regions)})")
        if len(set(owned)) != len(owned):
            raise _fail(source, key, f"lists a region twice: {list(owned)}")
        out[str(modality)] = tuple(r for r in regions if r in owned)
    for modality in modalities:
        out.setdefault(modality, ())
    for region in regions:
        if not any(region in owned for owned in out.values()):
            raise _fail(
                source, f"regions.{region}", "no segmentor owns this region (add it to the decomposition)"
            )
    return {m: out[m] for m in modalities}


def _parse_assembly(raw: Any, regions: dict[str, tuple[int, ...]], source: str) -> tuple[AssemblyStep, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise _fail(source, "assembly", "must be a list of [region, label] steps")
    steps = []
    for i, step in enumerate(raw):
        key = f"assembly[{i}]"
        if not isinstance(step, Sequence) or isinstance(step, str) or len(step) != 2:
            raise _fail(source, key, "each step is [region, label] or [[region, ...], label]")
        names, label = step
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in regions:
                raise _fail(source, key, f"unknown region {name!r} (known: {', '.join(regions)})")
        all_labels = {v for values in regions.values() for v in values}
        if not isinstance(label, int) or label not in all_labels:
            raise _fail(source, key, f"label {label!r} is not a label value of any region")
        steps.append(AssemblyStep(tuple(names), int(label)))
    painted = {r for s in steps for r in s.regions}
    for region in regions:
        if region not in painted:
            raise _fail(source, "assembly", f"does not cover region '{region}'")
    return tuple(steps)


def _parse_fallback(
    raw: Any, modalities: dict[str, str], regions: dict[str, tuple[int, ...]], source: str
) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise _fail(source, "fallback_owners", "must map regions to lists of modalities")
    out = {}
    for region, mods in raw.items():
        key = f"fallback_owners.{region}"
        if region not in regions:
            raise _fail(source, key, "unknown region")
        mods = [mods] if isinstance(mods, str) else list(mods)
        for m in mods:
            if m not in modalities:
                raise _fail(source, key, f"unknown modality {m!r}")
        out[str(region)] = tuple(mods)
    return out


def _parse_training(raw: Any, source: str) -> dict[str, Any]:
    allowed = ", ".join([*_TRAINING_KEYS, _AUGMENTATION_KEY])
    if not isinstance(raw, Mapping):
        raise _fail(source, "training", f"must map {allowed} to values")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == _AUGMENTATION_KEY:
            out[key] = _parse_augmentation(value, source)
            continue
        if key not in _TRAINING_KEYS:
            raise _fail(source, f"training.{key}", f"unknown setting (allowed: {allowed})")
        kind = _TRAINING_KEYS[key]
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in values):
            raise _fail(source, f"training.{key}", f"must be positive numbers, got {value!r}")
        if kind is int and any(not isinstance(v, int) for v in values):
            raise _fail(source, f"training.{key}", f"must be whole numbers, got {value!r}")
        out[str(key)] = [kind(v) for v in values] if isinstance(value, list) else kind(value)
    return out


def _parse_label_names(raw: Any, regions: dict[str, tuple[int, ...]], source: str) -> dict[int, str]:
    if not isinstance(raw, Mapping):
        raise _fail(source, "labels", "must map label values to their names, e.g. {1: NCR, 2: SNFH, 3: ET}")
    known = {0} | {v for values in regions.values() for v in values}
    out = {}
    for value, name in raw.items():
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise _fail(source, f"labels.{value}", "keys must be label values (integers)") from None
        if number not in known:
            raise _fail(source, f"labels.{value}", f"not a label value of any region ({sorted(known)})")
        out[number] = str(name)
    return dict(sorted(out.items()))


def _parse_augmentation(raw: Any, source: str) -> Any:
    """A selection (string, list of names, true/false) or a mapping of names to parameters, as plain data."""
    key = f"training.{_AUGMENTATION_KEY}"
    if isinstance(raw, str | bool):
        return raw
    if isinstance(raw, Sequence) and all(isinstance(v, str) for v in raw):
        return list(raw)
    if isinstance(raw, Mapping) and all(isinstance(k, str) for k in raw):
        return {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else
                dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}  # fmt: skip
    raise _fail(
        source, key, f"must be a selection (default, none, or a list of names) or a mapping, got {raw!r}"
    )


def _check_assembly_round_trip(spec: TaskSpec, source: str) -> None:
    """Every label value must come back from its own region masks as a label with the same regions."""
    values = np.array([v for v in spec.label_values if v != 0])
    masks = spec.labels_to_regions(values)
    assembled = assemble_labels(spec, masks)
    back = spec.labels_to_regions(assembled)
    for i, value in enumerate(values):
        if not np.array_equal(masks[:, i], back[:, i]):
            raise _fail(
                source,
                "assembly",
                f"label {value} is painted as {assembled[i]}, which belongs to other regions; "
                "reorder the steps",
            )


def assemble_labels(spec: TaskSpec, region_masks: np.ndarray) -> np.ndarray:
    """Paint binary region masks ``[R, *spatial]`` into a label map in the dataset's label values.

    Steps run in the spec's assembly order; a later step overrides an earlier one (nnU-Net's
    ``regions_class_order``). A step naming several regions paints where all of them are on.

    Example:
        >>> spec = load_task("brats2020")
        >>> wt, tc, et = np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
        >>> assemble_labels(spec, np.stack([wt, tc, et])).tolist()
        [4, 1, 2, 0]
    """
    region_masks = np.asarray(region_masks).astype(bool)
    if region_masks.shape[0] != len(spec.regions):
        raise ValueError(
            f"expected {len(spec.regions)} region masks ({', '.join(spec.regions)}), "
            f"got {region_masks.shape[0]}"
        )
    index = {name: i for i, name in enumerate(spec.regions)}
    dtype = np.uint8 if max(spec.label_values) < 256 else np.uint16
    labels = np.zeros(region_masks.shape[1:], dtype=dtype)
    for step in spec.assembly:
        where = np.logical_and.reduce([region_masks[index[r]] for r in step.regions])
        labels[where] = step.label
    return labels


def preset_names() -> list[str]:
    """Names of the task specs that ship with ciml."""
    folder = resources.files("ciml.tasks") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_task(name_or_path: str | Path | TaskSpec | Mapping[str, Any]) -> TaskSpec:
    """Load a preset by name (``brats2020``), a user's YAML file, or a dict; validated on load."""
    if isinstance(name_or_path, TaskSpec):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return TaskSpec.from_dict(name_or_path)
    text_name = str(name_or_path)
    if text_name in preset_names():
        resource = resources.files("ciml.tasks") / "presets" / f"{text_name}.yaml"
        return TaskSpec.from_dict(
            yaml.safe_load(resource.read_text(encoding="utf-8")), source=f"preset {text_name}"
        )
    path = Path(name_or_path)
    if not path.is_file():
        raise TaskSpecError(f"{text_name}: not a preset ({', '.join(preset_names())}) and not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskSpecError(f"{path}: not valid YAML: {exc}") from None
    return TaskSpec.from_dict(data, source=str(path))
