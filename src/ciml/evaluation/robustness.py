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
an empty mask.
Networks on stacked modalities (joint, segresnet) get "n/a" rows for every incomplete subset, with
their reason.

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
from ciml.inference.predict import THRESHOLD, InferenceSettings, Predictor
from ciml.runs import RunFolder
from ciml.tasks import TaskSpec

OUTPUT_NAMES = ("robustness.json", "robustness.csv", "robustness.md")
NOT_AVAILABLE = "n/a"


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
    """

    modalities: tuple[str, ...]
    dice: dict[str, float]
    predictable: tuple[str, ...]
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    note: str = ""

    @property
    def name(self) -> str:
        return subset_name(self.modalities)

    @property
    def mean(self) -> float:
        """Mean Dice over regions; NaN unless every region is predictable."""
        values = list(self.dice.values())
        return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


@dataclass
class RobustnessResult:
    """The per-subset Dice table, with writers for JSON, CSV and markdown.

    Attributes:
        task: task spec name.
        convention: brats, autopet or hecktor.
        dice_kind: what the Dice cells are (mean over cases, or HECKTOR's aggregated Dice).
        regions: the task's regions, in spec order.
        rows: one per subset, largest subsets first.
        n_cases: labelled cases scored.
    """

    task: str
    convention: str
    dice_kind: str
    regions: tuple[str, ...]
    rows: list[SubsetScores]
    n_cases: int

    def grid(self) -> list[list[str]]:
        """Header and one row of cells per subset: modalities, each region's Dice, their mean."""
        header = ["modalities", *self.regions, "mean"]
        cells = [
            [row.name, *(_cell(row.dice[r]) for r in self.regions), _cell(row.mean)] for row in self.rows
        ]
        return [header, *cells]

    def table(self) -> str:
        """Plain-text table for the terminal, with the notes of subsets that could not run."""
        lines = self.grid()
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        text = [f"task {self.task}, {self.convention} convention, {self.dice_kind}, {self.n_cases} case(s)"]
        text += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        text += [f"{row.name}: {row.note}" for row in self.rows if row.note]
        return "\n".join(text)

    def to_markdown(self) -> str:
        header, *rows = self.grid()
        lines = [
            f"Dice per modality subset: task {self.task}, {self.convention} convention, {self.dice_kind}, "
            f"{self.n_cases} case(s); {NOT_AVAILABLE}: not predictable with that subset.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        notes = [f"- {row.name}: {row.note}" for row in self.rows if row.note]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(self.grid())
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN marks n/a; the JSON file holds null): per subset its Dice row and case metrics."""
        return {
            "task": self.task,
            "convention": self.convention,
            "dice": self.dice_kind,
            "n_cases": self.n_cases,
            "regions": list(self.regions),
            "subsets": {
                row.name: {
                    "modalities": list(row.modalities),
                    "dice": row.dice,
                    "mean": row.mean,
                    "predictable": list(row.predictable),
                    "note": row.note,
                    "cases": row.cases,
                }
                for row in self.rows
            },
        }

    def write(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """``robustness.json``, ``.csv`` and ``.md`` in ``folder``, each atomically; existing files are
        kept unless ``overwrite``."""
        json_path, csv_path, markdown_path = paths = output_paths(folder)
        check_outputs(paths, overwrite)
        write_json_atomic(json_path, self.to_dict())
        write_text_atomic(csv_path, self.to_csv())
        write_text_atomic(markdown_path, self.to_markdown())
        return paths


def _cell(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{value:.4f}"


def output_paths(folder: str | Path) -> list[Path]:
    return [Path(folder) / name for name in OUTPUT_NAMES]


# ------------------------------------------------------------------------------------------- scoring


def _reference(
    case_label: Path, pre: PreprocessedCase, spec: TaskSpec
) -> tuple[np.ndarray, tuple[float, ...]]:
    """The case's reference labels and spacing; they must lie on the reference modality's grid."""
    image = _load(case_label)
    labels = _label_array(image, case_label, spec)
    shape, affine = tuple(pre.meta["original_shape"]), np.asarray(pre.meta["original_affine"])
    if labels.shape != shape or not np.allclose(image.affine, affine, rtol=0, atol=AFFINE_TOLERANCE):
        source = pre.meta["sources"][pre.meta["reference_modality"]]
        raise EvaluationError(
            f"{case_label}: label grid (shape {labels.shape}) differs from the image {source} "
            f"(shape {shape}) it is scored on; resample the label onto that image"
        )
    return labels, tuple(float(z) for z in image.header.get_zooms()[:3])


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
        masks[keep] = invert_to_original(probabilities[keep], pre.meta, mode="linear") > THRESHOLD
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
    progress: bool = True,
) -> RobustnessResult:
    """Predict the labelled cases of ``data`` with every modality subset and score each with Dice.

    Args:
        run: the run folder.
        data: labelled cases in any layout :func:`~ciml.data.layouts.read_dataset` reads.
        layout: the data's layout, or ``auto``.
        settings: checkpoint, folds, TTA, step, device (one loaded model serves every subset).
        subsets: the subsets to score (default: every non-empty subset, largest first).
        convention: brats, autopet or hecktor; default from the task name.
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
    predictor = Predictor.from_run(run, settings)
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
        rows.append(_row(subset, scores[subset], predictable, spec, conv))
    dice_kind = "aggregated Dice over cases" if conv.aggregated_dice else "mean Dice over cases"
    return RobustnessResult(spec.name, conv.name, dice_kind, spec.region_names, rows, len(cases))
