"""Postprocessing of predicted region masks: the rule a run chose on its validation fold, applied by predict.

As in nnU-Net, a rule is kept only where it raised the validation Dice (:mod:`ciml.training.postprocessing`
chooses it). Per region it may keep only the largest connected component (26-connected in 3D) and remove
the region when its total predicted volume is under ``min_volume`` voxels. Removing a region clears its
mask, so after assembly its voxels take the label of the enclosing regions: a small predicted BraTS ET
(likely noise; any ET voxel in a case without ET scores Dice 0) becomes TC's label, necrosis.

After the per-region steps the regions are nested again: a region whose label set is a subset of
another's (BraTS: ET of TC, TC of WT) is intersected with it, so dropping a WT component drops the TC
and ET inside it too. The identity rule (the default) returns the masks unchanged.

Example:
    >>> from ciml.tasks import load_task
    >>> spec = load_task("brats2020")
    >>> rule = Postprocessing({"ET": RegionRule(min_volume=3)})
    >>> masks = spec.labels_to_regions(np.array([2, 1, 4, 4, 0]))
    >>> spec.regions_to_labels(rule.apply(masks, spec)).tolist()
    [2, 1, 1, 1, 0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from ciml.errors import CimlError, ParameterError
from ciml.tasks import TaskSpec


@dataclass(frozen=True)
class RegionRule:
    """What happens to one region's predicted mask (the default changes nothing).

    Attributes:
        min_volume: voxels; a region whose total predicted volume is below it is removed (0: never).
        largest_component_only: keep only the largest connected component (full connectivity: 26 in 3D).
    """

    min_volume: int = 0
    largest_component_only: bool = False

    @property
    def is_identity(self) -> bool:
        return self.min_volume <= 0 and not self.largest_component_only

    def to_dict(self) -> dict[str, Any]:
        return {"min_volume": self.min_volume, "largest_component_only": self.largest_component_only}

    def describe(self, voxel_mm3: float | None = None) -> str:
        """``largest component only, removed under 12 voxels (96 mm^3)``; ``unchanged`` for the identity."""
        parts = ["largest component only"] if self.largest_component_only else []
        if self.min_volume > 0:
            physical = f" ({self.min_volume * voxel_mm3:.4g} mm^3)" if voxel_mm3 is not None else ""
            unit = "voxel" if self.min_volume == 1 else "voxels"
            parts.append(f"removed under {self.min_volume} {unit}{physical}")
        return ", ".join(parts) or "unchanged"


@dataclass(frozen=True)
class Postprocessing:
    """Per-region rules, in voxels of the grid they were chosen on.

    Attributes:
        rules: region name -> its rule; regions not named are left as predicted.
        spacing: voxel size in mm of the grid ``min_volume`` counts (the preprocessed grid of the run);
            :meth:`apply` rescales the counts to another grid given its spacing. None: counts are used
            as they are on any grid.
    """

    rules: Mapping[str, RegionRule] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        """Identity rules are dropped and the spacing made a tuple, so equal rules compare equal."""
        object.__setattr__(self, "rules", {r: v for r, v in self.rules.items() if not v.is_identity})
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @property
    def is_identity(self) -> bool:
        return not self.rules

    def rule(self, region: str) -> RegionRule:
        return self.rules.get(region, RegionRule())

    def with_rule(self, region: str, rule: RegionRule) -> Postprocessing:
        """A new value with ``region``'s rule replaced (an identity rule drops the entry)."""
        return replace(self, rules={**self.rules, region: rule})

    def same_as(self, other: Postprocessing) -> bool:
        """Whether both apply the same way on any grid (identities agree whatever their spacing)."""
        return self.rules == other.rules and (not self.rules or self.spacing == other.spacing)

    @property
    def voxel_mm3(self) -> float | None:
        return None if self.spacing is None else float(np.prod(self.spacing))

    def apply(self, masks: np.ndarray, spec: TaskSpec, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Postprocessed boolean masks ``[R, *spatial]`` (regions in the spec's order), as a new array.

        Args:
            masks: predicted region masks (thresholded probabilities) in the spec's region order.
            spec: the run's task spec; its label sets say which regions nest in which.
            spacing: voxel size in mm of ``masks``' grid when it is not the rule's (prediction writes on
                the input's own grid); ``min_volume`` is rescaled to the same physical volume.

        Raises:
            ParameterError: masks that do not have one channel per region, or a rule for a region the
                spec does not have.
        """
        masks = np.array(masks, dtype=bool, copy=True)
        regions = spec.region_names
        if masks.ndim < 2 or masks.shape[0] != len(regions):
            raise ParameterError(
                "masks",
                f"expected [R, *spatial] with R = {len(regions)} ({', '.join(regions)}), got {masks.shape}",
            )
        unknown = sorted(set(self.rules) - set(regions))
        if unknown:
            raise ParameterError(
                "postprocessing", f"rules for {', '.join(unknown)}, not regions of task {spec.name}"
            )
        if self.is_identity:
            return masks
        scale = self._voxel_scale(spacing)
        for i, region in enumerate(regions):
            masks[i] = _apply_rule(masks[i], self.rule(region), scale)
        return enforce_nesting(masks, spec)

    def _voxel_scale(self, spacing: Sequence[float] | None) -> float:
        """Voxels of the target grid per voxel of the rule's grid."""
        if spacing is None or self.spacing is None:
            return 1.0
        return float(np.prod(self.spacing) / np.prod([float(s) for s in spacing]))

    def describe(self) -> str:
        """One line per region with a rule, e.g. ``ET: removed under 12 voxels (96 mm^3)``."""
        if self.is_identity:
            return "none"
        return "; ".join(f"{r}: {rule.describe(self.voxel_mm3)}" for r, rule in self.rules.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data that :meth:`from_dict` reads back to an equal value."""
        return {
            "spacing": None if self.spacing is None else list(self.spacing),
            "regions": {r: rule.to_dict() for r, rule in self.rules.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "postprocessing") -> Postprocessing:
        """Validate and read :meth:`to_dict`'s data; errors name ``source`` and the key."""
        if not isinstance(data, Mapping) or not isinstance(data.get("regions", {}), Mapping):
            raise CimlError(f"{source}: expected a mapping with 'regions' (region -> rule) and 'spacing'")
        rules = {
            str(r): _rule_from_dict(v, f"{source}: 'regions.{r}'") for r, v in data.get("regions", {}).items()
        }
        spacing = _spacing_from_dict(data.get("spacing"), f"{source}: 'spacing'")
        return cls(rules, spacing)


def _rule_from_dict(data: Any, where: str) -> RegionRule:
    if not isinstance(data, Mapping) or set(data) - {"min_volume", "largest_component_only"}:
        raise CimlError(f"{where}: expected a mapping with min_volume and largest_component_only")
    volume = data.get("min_volume", 0)
    largest = data.get("largest_component_only", False)
    if isinstance(volume, bool) or not isinstance(volume, int) or volume < 0:
        raise CimlError(f"{where}: min_volume must be a whole number of voxels >= 0, got {volume!r}")
    if not isinstance(largest, bool):
        raise CimlError(f"{where}: largest_component_only must be true or false, got {largest!r}")
    return RegionRule(volume, largest)


def _spacing_from_dict(spacing: Any, where: str) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    if (
        not isinstance(spacing, list | tuple)
        or not spacing
        or any(isinstance(s, bool) or not isinstance(s, int | float) or s <= 0 for s in spacing)
    ):
        raise CimlError(f"{where}: must be positive voxel sizes in mm or null, got {spacing!r}")
    return tuple(float(s) for s in spacing)


def _apply_rule(mask: np.ndarray, rule: RegionRule, scale: float) -> np.ndarray:
    """Largest component first, then the volume test on what is left."""
    if rule.largest_component_only:
        mask = largest_component(mask)
    if rule.min_volume > 0 and int(mask.sum()) < rule.min_volume * scale:
        mask = np.zeros_like(mask)
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (full connectivity: 26 in 3D); empty stays empty.

    Ties go to the component scipy numbers first (the first in C order), so the result is deterministic.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def nesting(spec: TaskSpec) -> dict[str, tuple[str, ...]]:
    """Region -> the regions it nests in (whose label sets strictly contain its own), from the spec."""
    labels = {r: set(v) for r, v in spec.regions.items()}
    return {r: tuple(o for o in spec.regions if labels[r] < labels[o]) for r in spec.regions}


def enforce_nesting(masks: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """Each region intersected with every region it nests in (BraTS: ET within TC within WT), a new array."""
    masks = np.asarray(masks, dtype=bool)
    index = {r: i for i, r in enumerate(spec.region_names)}
    out = masks.copy()
    for region, outer in nesting(spec).items():
        for other in outer:
            out[index[region]] &= masks[index[other]]
    return out
