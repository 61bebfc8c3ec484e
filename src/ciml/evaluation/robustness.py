"""Dice for every subset of the modalities (``ciml robustness``): how a run copes with missing inputs.

Missing-modality papers (RFNet, mmFormer, M2FTrans; ANCHORS C) report one Dice row per subset of the
BraTS modalities (15 rows). Here every non-empty subset of the task's modalities predicts the labelled
cases of a folder, and each prediction is scored with the task's challenge convention by the same
per-case functions as ``ciml evaluate``.

Each case is preprocessed once with all its modalities; a subset then zeroes the absent channels and runs
the network with ``present=subset``, so the absent modalities' segmentors are skipped and their messages
are silent. The crop box thus comes from all modalities, where ``ciml predict --modalities`` would crop
to the present ones: the same voxels are predicted unless a modality's body extends beyond the others'.
A region none of whose owners or fallback owners is present is "n/a" (not predictable), never scored as
an empty mask; the default presets name fallback owners, so with them no cell is n/a.
Networks on stacked modalities (joint, segresnet) run on incomplete subsets with the absent channels
zero-filled when they were trained with modality dropout; otherwise their incomplete rows are "n/a",
with the reason.

Below the rows come the two summaries the missing-modality literature compares on:

* the **subset average** per region, in the protocol of DeMoSeg and mmFormer (ANCHORS H.2): the mean over
  the subsets of each subset's Dice (the mean over cases, or HECKTOR's aggregated Dice). It is n/a for a
  region that some subset cannot predict, since a mean over fewer subsets would not be the same number;
* each modality's **marginal contribution** (as BrainchMark reports it): the mean, over every subset S
  that lacks the modality, of Dice(S + modality) - Dice(S); for BraTS 7 pairs per modality.

Both come with patient-level bootstrap 95 % intervals: cases are drawn with replacement (one seeded
generator), every subset's Dice is recomputed on the drawn cases, and the 2.5th and 97.5th percentiles of
the statistic over the draws bound it. Drawing whole cases keeps a case's 15 predictions together, so
the interval reflects how much the numbers depend on which patients were scored.

Example:
    >>> result = evaluate_robustness("runs/brats", "BraTS2020_TrainingData")  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> result.write("runs/brats/robustness")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import PreprocessedCase, invert_to_original, preprocess_case
from ciml.evaluation.evaluate import (
    AFFINE_TOLERANCE,
    Convention,
    EvaluationError,
    _label_array,
    _load,
    case_metrics,
    check_outputs,
    resolve_convention,
    summarize,
)
from ciml.files import write_json_atomic, write_text_atomic
from ciml.inference.predict import InferenceSettings, Predictor
from ciml.runs import RunFolder
from ciml.tasks import REGION_THRESHOLD, TaskSpec

OUTPUT_NAMES = ("robustness.json", "robustness.csv", "robustness.md", "robustness_contributions.csv")
NOT_AVAILABLE = "n/a"
AVERAGE_ROW = "subset average"
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, largest first, each in channel order (15 for BraTS's 4 modalities)."""
    modalities = tuple(modalities)
    return [
        subset
        for size in range(len(modalities), 0, -1)
        for subset in itertools.combinations(modalities, size)
    ]


def subset_name(subset: Iterable[str]) -> str:
    return "+".join(subset)


@dataclass
class SubsetScores:
    """One row of the table: the Dice per region with one modality subset.

    Attributes:
        modalities: the present modalities.
        dice: region -> Dice (NaN: not predictable, or the network cannot run on this subset).
        predictable: regions predicted with this subset.
        cases: case id -> region -> metric -> value (unpredictable regions NaN).
        note: why nothing was predicted, for networks that need every modality.
        orphaned: region -> its owners and fallback owners, all absent from this subset (why it is n/a).
    """

    modalities: tuple[str, ...]
    dice: dict[str, float]
    predictable: tuple[str, ...]
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    note: str = ""
    orphaned: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        """Why cells of this row are n/a: the network cannot run, or regions have no present owner."""
        if self.note:
            return [f"{self.name}: {self.note}"]
        return [
            f"{self.name}: {region} n/a, its owners and fallback owners ({', '.join(owners)}) are all missing"
            for region, owners in self.orphaned.items()
        ]

    @property
    def name(self) -> str:
        return subset_name(self.modalities)

    @property
    def mean(self) -> float:
        """Mean Dice over regions; NaN unless every region is predictable."""
        values = list(self.dice.values())
        return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval (NaN throughout when it is not defined).

    Attributes:
        estimate: the statistic on the scored cases.
        low, high: the percentile bootstrap interval (``CONFIDENCE``) over case resamples.
        pairs: subset pairs it averages (contributions only; 0 for subset averages).
    """

    estimate: float
    low: float
    high: float
    pairs: int = 0

    def cell(self) -> str:
        if math.isnan(self.estimate):
            return NOT_AVAILABLE
        if math.isnan(self.low):
            return f"{self.estimate:.4f}"
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _ratio_parts(
    rows: Sequence[SubsetScores], regions: Sequence[str], case_ids: Sequence[str], aggregated: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator ``[subset, case, region]`` whose sums over cases give each subset's Dice.

    Mean Dice over cases: numerator the case's Dice, denominator 1 (both 0 where the case's Dice is
    undefined, as the summaries skip it). HECKTOR's aggregated Dice: 2 * intersection and the sum of
    both volumes (mm^3). A region a subset cannot predict is NaN in both, so every statistic using it is NaN.
    """
    shape = (len(rows), len(case_ids), len(regions))
    numerator, denominator = np.full(shape, np.nan), np.full(shape, np.nan)
    for s, row in enumerate(rows):
        for r, region in enumerate(regions):
            if region not in row.predictable or not row.cases:
                continue
            for c, case_id in enumerate(case_ids):
                metrics = row.cases[case_id][region]
                if aggregated:
                    numerator[s, c, r] = 2.0 * metrics["intersection_mm3"]
                    denominator[s, c, r] = metrics["pred_mm3"] + metrics["ref_mm3"]
                else:
                    defined = not math.isnan(metrics["dice"])
                    numerator[s, c, r] = metrics["dice"] if defined else 0.0
                    denominator[s, c, r] = 1.0 if defined else 0.0
    return numerator, denominator


def _subset_dice(weights: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``[draw, subset, region]`` Dice of each subset on each resample (``weights[draw, case]``: counts)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bc,scr->bsr", weights, numerator) / np.einsum("bc,scr->bsr", weights, denominator)


def _with_overall(dice: np.ndarray) -> np.ndarray:
    """Append the mean over regions as a last region column (NaN when any region is)."""
    return np.concatenate([dice, dice.mean(axis=-1, keepdims=True)], axis=-1)


def resample_weights(cases: int, samples: int, seed: int) -> np.ndarray:
    """Case weights ``[1 + samples, cases]`` of a patient-level bootstrap: row 0 is the scored cases
    (all 1), each further row how often a draw with replacement (one seeded generator) took each case.

    A statistic that is a weighted mean over cases is then one matrix product for every draw at once.
    """
    if samples < 0:
        raise EvaluationError(f"bootstrap samples must be >= 0, got {samples}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, cases, size=(samples, cases))
    return np.stack([np.ones(cases), *(np.bincount(d, minlength=cases) for d in draws)])


def percentile_interval(estimate: float, draws: np.ndarray, pairs: int = 0) -> Interval:
    """``estimate`` with the percentile interval (``CONFIDENCE``) of its bootstrap ``draws`` (NaN skipped)."""
    if math.isnan(estimate):
        return Interval(math.nan, math.nan, math.nan, pairs)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return Interval(float(estimate), math.nan, math.nan, pairs)
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high), pairs)


def contribution_pairs(subsets: Sequence[tuple[str, ...]], modality: str) -> list[tuple[int, int]]:
    """(index of S + modality, index of S) for every listed subset S that lacks ``modality``."""
    index = {frozenset(s): i for i, s in enumerate(subsets)}
    return [
        (index[frozenset(s) | {modality}], i)
        for i, s in enumerate(subsets)
        if modality not in s and frozenset(s) | {modality} in index
    ]


@dataclass(frozen=True)
class SubsetSummary:
    """The subset average per region and each modality's marginal contribution, with intervals.

    Attributes:
        average: region (and ``mean``, over regions) -> mean over subsets of the subset's Dice.
        contributions: modality -> region (and ``mean``) -> mean of Dice(S + modality) - Dice(S).
        samples: bootstrap resamples of the cases; seed: their generator's seed.
    """

    average: dict[str, Interval]
    contributions: dict[str, dict[str, Interval]]
    samples: int
    seed: int


def summarize_subsets(
    rows: Sequence[SubsetScores],
    regions: Sequence[str],
    modalities: Sequence[str],
    *,
    aggregated: bool = False,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> SubsetSummary:
    """Subset averages and marginal contributions of a robustness table, with patient-level bootstrap.

    Args:
        rows: the table's rows, each with its per-case metrics (rows without cases count as n/a).
        regions: the regions, in order.
        modalities: the task's modalities (one contribution each).
        aggregated: rows hold HECKTOR's aggregated Dice (from per-case overlap counts), not mean Dice.
        samples: bootstrap resamples (0: point estimates only).
        seed: the resampling generator's seed, so an interval repeats exactly.
    """
    if samples < 0:
        raise EvaluationError(f"bootstrap samples must be >= 0, got {samples}")
    case_ids = sorted({c for row in rows for c in row.cases})
    keys = [*regions, "mean"]
    if not rows or not case_ids:
        nan = Interval(math.nan, math.nan, math.nan)
        return SubsetSummary(
            {k: nan for k in keys}, {m: {k: nan for k in keys} for m in modalities}, samples, seed
        )
    numerator, denominator = _ratio_parts(rows, regions, case_ids, aggregated)
    weights = resample_weights(len(case_ids), samples, seed)
    dice = _with_overall(_subset_dice(weights, numerator, denominator))  # [1 + samples, subset, key]
    average = dice.mean(axis=1)
    summary = {k: percentile_interval(average[0, i], average[1:, i]) for i, k in enumerate(keys)}
    subsets = [row.modalities for row in rows]
    contributions = {}
    for modality in modalities:
        pairs = contribution_pairs(subsets, modality)
        per_key = {}
        for i, key in enumerate(keys):
            usable = [(w, wo) for w, wo in pairs if not np.isnan(dice[0, w, i] - dice[0, wo, i])]
            if not usable:
                per_key[key] = Interval(math.nan, math.nan, math.nan, 0)
                continue
            with_m, without = (list(t) for t in zip(*usable, strict=True))
            delta = (dice[:, with_m, i] - dice[:, without, i]).mean(axis=1)
            per_key[key] = percentile_interval(delta[0], delta[1:], len(usable))
        contributions[modality] = per_key
    return SubsetSummary(summary, contributions, samples, seed)


@dataclass
class RobustnessResult:
    """The per-subset Dice table and its summaries, with writers for JSON, CSV and markdown.

    Attributes:
        task: task spec name.
        convention: brats, autopet or hecktor.
        dice_kind: what the Dice cells are (mean over cases, or HECKTOR's aggregated Dice).
        regions: the task's regions, in spec order.
        rows: one per subset, largest subsets first.
        n_cases: labelled cases scored.
        modalities: the task's modalities (one marginal contribution each).
        samples, seed: the patient-level bootstrap behind the summary's intervals.
        summary: subset averages and contributions (computed from the rows when not given).
    """

    task: str
    convention: str
    dice_kind: str
    regions: tuple[str, ...]
    rows: list[SubsetScores]
    n_cases: int
    modalities: tuple[str, ...] = ()
    samples: int = BOOTSTRAP_SAMPLES
    seed: int = 0
    summary: SubsetSummary | None = None

    def __post_init__(self) -> None:
        if not self.modalities:
            self.modalities = tuple(dict.fromkeys(m for row in self.rows for m in row.modalities))
        if self.summary is None:
            self.summary = summarize_subsets(
                self.rows,
                self.regions,
                self.modalities,
                aggregated=self.convention == "hecktor",
                samples=self.samples,
                seed=self.seed,
            )

    @property
    def average(self) -> dict[str, Interval]:
        """Region (and ``mean``) -> the mean over the table's subsets of their Dice (DeMoSeg's protocol)."""
        assert self.summary is not None
        return self.summary.average

    @property
    def contributions(self) -> dict[str, dict[str, Interval]]:
        """Modality -> region (and ``mean``) -> mean Dice gained by adding it to a subset that lacks it."""
        assert self.summary is not None
        return self.summary.contributions

    def grid(self) -> list[list[str]]:
        """Header, one row of cells per subset (modalities, each region's Dice, their mean), then the
        subset average over all rows."""
        header = ["modalities", *self.regions, "mean"]
        cells = [
            [row.name, *(_cell(row.dice[r]) for r in self.regions), _cell(row.mean)] for row in self.rows
        ]
        average = [AVERAGE_ROW, *(_cell(self.average[k].estimate) for k in (*self.regions, "mean"))]
        return [header, *cells, average]

    def contribution_grid(self) -> list[list[str]]:
        """Header and one row per modality: its contribution per region and on the mean, with intervals,
        and the most subset pairs any of them averages (fewer where a region is n/a without it)."""
        header = ["modality", *self.regions, "mean", "pairs"]
        rows = [
            [m, *(self.contributions[m][k].cell() for k in (*self.regions, "mean")),
             str(max(v.pairs for v in self.contributions[m].values()))]
            for m in self.modalities
        ]  # fmt: skip
        return [header, *rows]

    def _explanations(self) -> list[str]:
        """What the summary rows mean, and why any of them is n/a."""
        n = len(self.rows)
        text = [
            f"{AVERAGE_ROW}: mean over the {n} subsets of each subset's Dice (DeMoSeg/mmFormer protocol); "
            f"95 % patient-level bootstrap intervals ({self.samples} resamples, seed {self.seed}): "
            + ", ".join(f"{k} {self.average[k].cell()}" for k in (*self.regions, "mean")),
        ]
        lacking = {
            r: [row.name for row in self.rows if math.isnan(row.dice[r])]
            for r in self.regions
            if math.isnan(self.average[r].estimate)
        }
        for region, names in lacking.items():
            text.append(f"{region} average n/a: not predictable from {', '.join(names)}")
        return text

    def table(self) -> str:
        """Plain-text tables for the terminal, with the notes of subsets that could not run."""
        text = [f"task {self.task}, {self.convention} convention, {self.dice_kind}, {self.n_cases} case(s)"]
        text += _aligned(self.grid())
        text += [reason for row in self.rows for reason in row.reasons()]
        text += self._explanations()
        text += ["", "marginal contribution: mean over subsets S lacking the modality of Dice(S+m) - Dice(S)"]
        text += _aligned(self.contribution_grid())
        return "\n".join(text)

    def to_markdown(self) -> str:
        lines = [
            f"Dice per modality subset: task {self.task}, {self.convention} convention, {self.dice_kind}, "
            f"{self.n_cases} case(s); {NOT_AVAILABLE}: not predictable with that subset.",
            "",
            *_markdown(self.grid()),
            "",
            *(f"- {line}" for line in self._explanations()),
            *(f"- {reason}" for row in self.rows for reason in row.reasons()),
            "",
            "Marginal contribution of each modality: the mean, over the subsets S that lack it, of "
            "Dice(S + modality) - Dice(S), with 95 % patient-level bootstrap intervals; pairs: subsets "
            "averaged.",
            "",
            *_markdown(self.contribution_grid()),
        ]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        return _csv(self.grid())

    def contributions_csv(self) -> str:
        """Long format: modality, region, estimate, low, high, pairs."""
        rows = [["modality", "region", "estimate", "low", "high", "pairs"]]
        for m in self.modalities:
            for key, value in self.contributions[m].items():
                rows.append(
                    [m, key, *(_number(v) for v in (value.estimate, value.low, value.high)), str(value.pairs)]
                )
        return _csv(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN marks n/a; the JSON file holds null): per subset its Dice row and case metrics,
        the subset average and the contributions with their intervals."""
        return {
            "task": self.task,
            "convention": self.convention,
            "dice": self.dice_kind,
            "n_cases": self.n_cases,
            "regions": list(self.regions),
            "modalities": list(self.modalities),
            "subsets": {
                row.name: {
                    "modalities": list(row.modalities),
                    "dice": row.dice,
                    "mean": row.mean,
                    "predictable": list(row.predictable),
                    "note": row.note,
                    "not_predictable": {r: list(o) for r, o in row.orphaned.items()},
                    "cases": row.cases,
                }
                for row in self.rows
            },
            "average": {k: v.to_dict() for k, v in self.average.items()},
            "contributions": {
                m: {k: v.to_dict() for k, v in c.items()} for m, c in self.contributions.items()
            },
            "bootstrap": {
                "samples": self.samples,
                "seed": self.seed,
                "confidence": CONFIDENCE,
                "unit": "case",
            },
        }

    def write(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """``robustness.json``, ``.csv``, ``.md`` and ``robustness_contributions.csv`` in ``folder``, each
        atomically; existing files are kept unless ``overwrite``."""
        json_path, csv_path, markdown_path, contributions_path = paths = output_paths(folder)
        check_outputs(paths, overwrite)
        write_json_atomic(json_path, self.to_dict())
        write_text_atomic(csv_path, self.to_csv())
        write_text_atomic(markdown_path, self.to_markdown())
        write_text_atomic(contributions_path, self.contributions_csv())
        return paths


def _aligned(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def _markdown(lines: list[list[str]]) -> list[str]:
    header, *rows = lines
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _cell(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{value:.4f}"


def output_paths(folder: str | Path) -> list[Path]:
    return [Path(folder) / name for name in OUTPUT_NAMES]


# ------------------------------------------------------------------------------------------- scoring


def _reference(
    case_label: Path, pre: PreprocessedCase, spec: TaskSpec
) -> tuple[np.ndarray, tuple[float, ...]]:
    """The case's reference labels and spacing; they must lie on the reference modality's grid."""
    data, header = _load(case_label)
    labels = _label_array(data, case_label, spec)
    shape, affine = tuple(pre.meta["original_shape"]), np.asarray(pre.meta["original_affine"])
    if labels.shape != shape or not np.allclose(header.affine, affine, rtol=0, atol=AFFINE_TOLERANCE):
        source = pre.meta["sources"][pre.meta["reference_modality"]]
        raise EvaluationError(
            f"{case_label}: label grid (shape {labels.shape}) differs from the image {source} "
            f"(shape {shape}) it is scored on; resample the label onto that image"
        )
    return labels, header.spacing[:3]


def _score_subset(
    predictor: Predictor,
    pre: PreprocessedCase,
    subset: tuple[str, ...],
    reference: tuple[np.ndarray, tuple[float, ...]],
    convention: Convention,
) -> dict[str, dict[str, float]]:
    """Region -> metric -> value for one case predicted from ``subset`` (unpredictable regions NaN)."""
    spec = predictor.spec
    unpredictable = predictor.unpredictable_regions(subset)
    keep = [i for i, r in enumerate(spec.region_names) if r not in unpredictable]
    labels, spacing = reference
    masks = np.zeros((len(spec.region_names), *labels.shape), dtype=bool)
    if keep:
        probabilities = predictor.probabilities(pre.image, subset, partial=True)
        masks[keep] = invert_to_original(probabilities[keep], pre.meta, mode="linear") > REGION_THRESHOLD
    metrics = case_metrics(spec.regions_to_labels(masks), labels, spec, spacing, convention.name, "legacy")
    for region in unpredictable:
        metrics[region] = {k: math.nan for k in metrics[region]}
    return metrics


def _row(
    subset: tuple[str, ...],
    cases: dict[str, dict[str, dict[str, float]]],
    predictable: tuple[str, ...],
    spec: TaskSpec,
    convention: Convention,
) -> SubsetScores:
    dice = {r: math.nan for r in spec.region_names}
    if cases and predictable:
        summary = summarize(cases, predictable, convention, convention.metric_names("legacy"))
        for region in predictable:
            if convention.aggregated_dice:
                dice[region] = summary["aggregated_dice"][region]
            else:
                dice[region] = summary["regions"][region]["dice"]["mean"]
    return SubsetScores(subset, dice, predictable, cases)


def evaluate_robustness(
    run: RunFolder | str | Path,
    data: str | Path,
    *,
    layout: str = "auto",
    settings: InferenceSettings | None = None,
    subsets: Iterable[Iterable[str]] | None = None,
    convention: str | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> RobustnessResult:
    """Predict the labelled cases of ``data`` with every modality subset and score each with Dice.

    Args:
        run: the run folder.
        data: labelled cases in any layout :func:`~ciml.data.layouts.read_dataset` reads.
        layout: the data's layout, or ``auto``.
        settings: checkpoint, folds, TTA, step, device (one loaded model serves every subset); masks are
            scored without the run's postprocessing (chosen on predictions from every modality).
        subsets: the subsets to score (default: every non-empty subset, largest first).
        convention: brats, autopet or hecktor; default from the task name.
        samples: bootstrap resamples of the cases for the summary's intervals (0: none).
        seed: the bootstrap's seed.
        progress: progress bar over cases and subsets.

    Raises:
        EvaluationError: no labelled case, or a label not on its image's grid.
        CimlError: unreadable run or inputs.
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    spec = run.spec()
    conv = resolve_convention(spec, convention)
    cases = [c for c in read_dataset(data, spec, layout) if c.label is not None]
    if not cases:
        raise EvaluationError(f"{data}: no labelled cases to score")
    # masks are scored as the network gives them: postprocessing was chosen on full-modality predictions
    predictor = Predictor.from_run(
        run, dataclasses.replace(settings or InferenceSettings(), postprocessing=False)
    )
    chosen = modality_subsets(spec.modality_names) if subsets is None else subsets
    subsets = list(dict.fromkeys(predictor.present_modalities(s) for s in chosen))
    notes = {s: str(e) for s in subsets if (e := predictor.missing_modality_error(s)) is not None}
    runnable = [s for s in subsets if s not in notes]
    scores: dict[tuple[str, ...], dict[str, dict[str, dict[str, float]]]] = {s: {} for s in runnable}
    with tqdm(
        total=len(cases) * len(runnable), desc="robustness", unit="prediction", disable=not progress
    ) as bar:
        for case in cases:
            pre = preprocess_case(dataclasses.replace(case, label=None), spec, predictor.plan)
            reference = _reference(case.label, pre, spec)
            for subset in runnable:
                bar.set_postfix_str(f"{case.case_id} {subset_name(subset)}")
                scores[subset][case.case_id] = _score_subset(predictor, pre, subset, reference, conv)
                bar.update()
    rows = []
    for subset in subsets:
        if subset in notes:
            rows.append(
                SubsetScores(subset, {r: math.nan for r in spec.region_names}, (), note=notes[subset])
            )
            continue
        unpredictable = predictor.unpredictable_regions(subset)
        predictable = tuple(r for r in spec.region_names if r not in unpredictable)
        row = _row(subset, scores[subset], predictable, spec, conv)
        fallback = predictor.fallback_owners()
        row.orphaned = {r: (*o, *fallback.get(r, ())) for r, o in unpredictable.items()}
        rows.append(row)
    dice_kind = "aggregated Dice over cases" if conv.aggregated_dice else "mean Dice over cases"
    return RobustnessResult(
        spec.name,
        conv.name,
        dice_kind,
        spec.region_names,
        rows,
        len(cases),
        spec.modality_names,
        samples,
        seed,
    )
