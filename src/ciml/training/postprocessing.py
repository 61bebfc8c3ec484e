"""Choosing a run's postprocessing on its validation fold, greedily as nnU-Net does.

The final validation of a fold (the last checkpoint's thresholded masks, kept by
:func:`~ciml.training.engine.validation_dice` so no second inference pass is needed) is scored with and
without each candidate, one region at a time, regions that enclose others first. Per region:

1. keep only the largest connected component;
2. then remove the region when its volume is under a threshold, the best of :data:`MIN_VOLUMES_MM3`
   (50 to 1000 mm^3) converted to voxels at the preprocessed spacing.

A candidate is kept only when it raises that region's mean validation Dice by more than :data:`MARGIN`
(nnU-Net keeps a change that does not hurt; a strict margin avoids choosing on ties) and lowers no other
region's mean Dice by more than it (nesting can reach other regions). Every trial goes into the
comparison that training stores beside the rule (``fold_K/postprocessing.json``).

Example:
    >>> choice = choose_postprocessing(validation_masks, spec, spacing=(1.0, 1.0, 1.0))  # doctest: +SKIP
    >>> choice.rule.describe()  # doctest: +SKIP
    'ET: removed under 200 voxels (200 mm^3)'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ciml.inferers import Postprocessing, RegionRule, nesting
from ciml.metrics import dice
from ciml.tasks import TaskSpec

#: Physical volumes tried as ``min_volume`` (nnU-Net-style BraTS ET thresholds are in this range).
MIN_VOLUMES_MM3 = (50.0, 100.0, 200.0, 500.0, 1000.0)
#: A candidate must raise its region's mean validation Dice by more than this to be kept.
MARGIN = 1e-4


@dataclass(frozen=True)
class ValidationMasks:
    """One validation case's predicted and reference region masks ``[R, *spatial]`` (bool).

    :meth:`cropped` keeps only the box around both masks: Dice, volumes and connected components are
    the same there as on the whole volume, at a fraction of the memory.
    """

    predicted: np.ndarray
    reference: np.ndarray

    @classmethod
    def cropped(cls, predicted: np.ndarray, reference: np.ndarray) -> ValidationMasks:
        predicted, reference = np.asarray(predicted, bool), np.asarray(reference, bool)
        if predicted.shape != reference.shape:
            raise ValueError(
                f"predicted and reference masks differ in shape: {predicted.shape} vs {reference.shape}"
            )
        where = np.argwhere((predicted | reference).any(axis=0))
        if where.size == 0:
            box = tuple(slice(0, 0) for _ in predicted.shape[1:])
        else:
            box = tuple(
                slice(lo, hi + 1) for lo, hi in zip(where.min(axis=0), where.max(axis=0), strict=True)
            )
        return cls(predicted[(slice(None), *box)].copy(), reference[(slice(None), *box)].copy())


@dataclass(frozen=True)
class Trial:
    """One candidate for one region, on top of the rule chosen so far, and its mean Dice per region."""

    region: str
    candidate: RegionRule
    dice: dict[str, float]
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "candidate": self.candidate.to_dict(),
            "dice": self.dice,
            "kept": self.kept,
        }


@dataclass(frozen=True)
class PostprocessingChoice:
    """The chosen rule and the comparison it was chosen from (what ``fold_K/postprocessing.json`` holds).

    Attributes:
        rule: the postprocessing to apply (the identity when nothing helped or nothing was validated).
        cases: number of validation cases it was chosen on.
        baseline: mean validation Dice per region without postprocessing.
        chosen: mean validation Dice per region with ``rule``.
        trials: every candidate tried, in order.
        note: why the identity was stored without trying anything (no validation cases), else None.
    """

    rule: Postprocessing
    cases: int
    baseline: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, float] = field(default_factory=dict)
    trials: tuple[Trial, ...] = ()
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule.to_dict(),
            "description": self.rule.describe(),
            "validation_cases": self.cases,
            "margin": MARGIN,
            "dice_without": self.baseline,
            "dice_with": self.chosen,
            "trials": [t.to_dict() for t in self.trials],
        }
        if self.note:
            out["note"] = self.note
        return out

    def table(self) -> str:
        """The comparison as text: one line per trial, mean Dice of its region before and with it."""
        if self.note:
            return f"postprocessing: {self.rule.describe()} ({self.note})"
        lines = [f"postprocessing on {self.cases} validation case(s): {self.rule.describe()}"]
        lines.append(f"  {'region':<8}{'candidate':<48}{'Dice':>8}  kept")
        for t in self.trials:
            text = t.candidate.describe(self.rule.voxel_mm3)
            lines.append(f"  {t.region:<8}{text:<48}{t.dice[t.region]:>8.4f}  {'yes' if t.kept else 'no'}")
        without = ", ".join(f"{r} {v:.4f}" for r, v in self.baseline.items())
        with_ = ", ".join(f"{r} {v:.4f}" for r, v in self.chosen.items())
        lines += [f"  without: {without}", f"  with:    {with_}"]
        return "\n".join(lines)


def min_volume_candidates(spacing: Sequence[float] | None) -> tuple[int, ...]:
    """:data:`MIN_VOLUMES_MM3` in voxels of ``spacing`` (mm); without a spacing the same numbers as voxels."""
    voxel = 1.0 if spacing is None else float(np.prod(spacing))
    return tuple(sorted({max(1, round(v / voxel)) for v in MIN_VOLUMES_MM3}))


def mean_dice(cases: Sequence[ValidationMasks], spec: TaskSpec, rule: Postprocessing) -> dict[str, float]:
    """Mean Dice per region over ``cases`` with ``rule`` applied (BraTS convention: both empty is 1)."""
    scores = np.zeros(len(spec.region_names))
    for case in cases:
        predicted = rule.apply(case.predicted, spec)
        scores += [dice(predicted[i], case.reference[i]) for i in range(len(scores))]
    return {r: float(s / len(cases)) for r, s in zip(spec.region_names, scores, strict=True)}


def choose_postprocessing(
    cases: Sequence[ValidationMasks], spec: TaskSpec, spacing: Sequence[float] | None = None
) -> PostprocessingChoice:
    """Greedy choice per region (see the module docstring); the identity without validation cases.

    Args:
        cases: the validation cases' predicted and reference masks, regions in the spec's order.
        spec: the run's task spec.
        spacing: voxel size in mm of the masks' grid (the preprocessed spacing); None: a plain voxel grid.
    """
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    rule = Postprocessing(spacing=spacing)
    if not cases:
        return PostprocessingChoice(rule, 0, note="no validation cases: nothing applied")
    score = functools.partial(mean_dice, cases, spec)
    baseline = current = score(rule)
    trials: list[Trial] = []
    for region in _outer_first(spec):
        largest = [RegionRule(largest_component_only=True)]
        rule, current = _keep_best(score, rule, current, region, largest, trials)
        kept = rule.rule(region).largest_component_only
        volumes = [RegionRule(v, kept) for v in min_volume_candidates(spacing)]
        rule, current = _keep_best(score, rule, current, region, volumes, trials)
    return PostprocessingChoice(rule, len(cases), baseline, current, tuple(trials))


def _outer_first(spec: TaskSpec) -> list[str]:
    """Regions that enclose others first (WT, TC, ET): their changes reach the inner ones through nesting."""
    inside = nesting(spec)
    return sorted(spec.region_names, key=lambda r: len(inside[r]))


def _keep_best(
    score: Callable[[Postprocessing], dict[str, float]],
    rule: Postprocessing,
    current: dict[str, float],
    region: str,
    variants: Sequence[RegionRule],
    trials: list[Trial],
) -> tuple[Postprocessing, dict[str, float]]:
    """Try each variant of ``region``'s rule (recorded in ``trials``); keep the best one that helps."""
    scored = [(v, score(rule.with_rule(region, v))) for v in variants]
    helpful = [(v, s) for v, s in scored if _helps(s, current, region)]
    best = max(helpful, key=lambda vs: vs[1][region], default=None)
    trials += [Trial(region, v, s, best is not None and v is best[0]) for v, s in scored]
    if best is None:
        return rule, current
    return rule.with_rule(region, best[0]), best[1]


def _helps(scores: dict[str, float], current: dict[str, float], region: str) -> bool:
    """Raises ``region``'s Dice by more than the margin and lowers no other region's by more than it."""
    return scores[region] > current[region] + MARGIN and all(
        scores[r] >= current[r] - MARGIN for r in scores if r != region
    )
