"""Score a folder of predicted label maps against reference labels with a challenge's conventions.

Predictions are one label NIfTI per case, ``<case_id>.nii.gz`` (or ``.nii``), in the dataset's own label
values. References may be laid out the same way, as ``labelsTr``/``labelsTs`` folders, or be any dataset
the readers of :mod:`ciml.data.layouts` read labels from (BraTS case folders, autoPET studies, MSD,
nnU-Net, HECKTOR). Spacing comes from the reference header.

Each challenge scores by its own rules (:data:`CONVENTIONS`): BraTS 2020/2021 per region; BraTS
2023/2024 lesion-wise plus legacy per tissue with the area-weighted surface HD95
(:mod:`ciml.metrics.lesionwise`); autoPET by connected components; HECKTOR 2022 by Dice aggregated
in mm^3. ``metrics=`` and ``hd95=`` override the challenge's defaults where it defines them.

Example:
    >>> result = evaluate_folders("preds/", "BraTS2020_TrainingData/", "brats2020")  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> result.write("metrics.json", "metrics.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ciml.data.io import ImageHeader, ImageReadError, load_image
from ciml.data.layouts import DatasetLayoutError, read_dataset, resolve_task
from ciml.errors import CimlError, ParameterError
from ciml.files import refuse_existing, write_text_atomic
from ciml.metrics import (
    AUTOPET_METRICS,
    BRATS_METRICS,
    HD95_EMPTY_PENALTY,
    HECKTOR_METRICS,
    LEGACY_METRICS,
    LESIONWISE_METRICS,
    LESIONWISE_RULES,
    AggregatedDice,
    HD95Function,
    LesionwiseRules,
    autopet_case_metrics,
    brats_region_metrics,
    hd95,
    hd95_surface,
    lesionwise_case_metrics,
    overlap_counts,
    per_region,
)
from ciml.tasks import TaskSpec, load_task

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE = 1e-3  # mm; headers store affines in float32


class EvaluationError(CimlError):
    """Predictions and references cannot be compared; the message names the files and the mismatch."""


#: What ``metrics=`` selects: the per-region metrics of every challenge, BraTS 2023+ lesion-wise
#: scores, or both.
METRIC_SETS = ("legacy", "lesionwise", "all")
HD95_VARIANTS = ("voxel", "surface")

RegionMetrics = Callable[[np.ndarray, np.ndarray, Sequence[float] | None], dict[str, float]]


@dataclass(frozen=True)
class Convention:
    """How one challenge scores a case and what its summary reports.

    Attributes:
        name: brats, brats2023, brats2024, autopet, hecktor, ...
        region_metrics: ``(pred_mask, ref_mask, spacing) -> {metric: value}`` for one region of one
            case (conventions without lesion-wise rules).
        summarized: per-case metrics given mean, median and std in the summary.
        aggregated_dice: also report HECKTOR's Dice aggregated over the whole set.
        lesionwise: BraTS 2023+ rules; their tissues are the scored regions, legacy metrics included.
        default_metrics: the challenge's own choice among :data:`METRIC_SETS`.
        hd95: the challenge's HD95 (``voxel``: MONAI's voxel-centre definition; ``surface``: the
            area-weighted BraTS 2023+ one), or None where the convention has no HD95.
        hd95_penalty: HD95 when exactly one mask is empty.
    """

    name: str
    region_metrics: RegionMetrics | None
    summarized: tuple[str, ...]
    aggregated_dice: bool = False
    lesionwise: LesionwiseRules | None = None
    default_metrics: str = "legacy"
    hd95: str | None = None
    hd95_penalty: float = HD95_EMPTY_PENALTY

    def metric_names(self, metrics: str) -> tuple[str, ...]:
        """The per-case metrics that ``metrics`` (legacy, lesionwise, all) selects."""
        if self.lesionwise is None:
            return self.summarized
        return {"legacy": LEGACY_METRICS, "lesionwise": LESIONWISE_METRICS}.get(
            metrics, LESIONWISE_METRICS + LEGACY_METRICS
        )

    def regions(self, spec: TaskSpec) -> tuple[str, ...]:
        """Scored regions: the challenge's tissues for lesion-wise conventions, else the spec's."""
        if self.lesionwise is not None:
            return tuple(t.name for t in self.lesionwise.tissues)
        return spec.region_names


def _lesionwise_convention(rules: LesionwiseRules) -> Convention:
    return Convention(
        rules.name,
        None,
        LESIONWISE_METRICS + LEGACY_METRICS,
        lesionwise=rules,
        default_metrics="all",
        hd95="surface",
        hd95_penalty=rules.hd95_penalty,
    )


CONVENTIONS: dict[str, Convention] = {
    "brats": Convention("brats", brats_region_metrics, BRATS_METRICS, hd95="voxel"),
    **{name: _lesionwise_convention(rules) for name, rules in LESIONWISE_RULES.items()},
    "autopet": Convention("autopet", autopet_case_metrics, AUTOPET_METRICS),
    "hecktor": Convention("hecktor", overlap_counts, HECKTOR_METRICS[:1], True),
}

#: Task spec name -> convention; any other task is scored brats-style per region.
CONVENTION_FOR_TASK = {
    "brats2020": "brats",
    "brats2021": "brats",
    **{name: name for name in LESIONWISE_RULES},
    "msd_braintumour": "brats",
    "autopet": "autopet",
    "hecktor2022": "hecktor",
}
DEFAULT_CONVENTION = "brats"


def resolve_convention(spec: TaskSpec, convention: str | None = None) -> Convention:
    """The named convention, or the one the task's spec name implies.

    Lesion-wise conventions define their tissues by label values, so the task's labels must be
    exactly the challenge's: a BraTS 2020 label map (ET = 4) scored with BraTS 2023 rules (ET = 3)
    would silently score an empty ET.
    """
    name = convention or CONVENTION_FOR_TASK.get(spec.name, DEFAULT_CONVENTION)
    if name not in CONVENTIONS:
        raise ParameterError("convention", f"{name!r} is not one of {', '.join(CONVENTIONS)}")
    conv = CONVENTIONS[name]
    if conv.lesionwise is not None:
        expected = set(conv.lesionwise.label_values)
        labels = set(spec.label_values) - {0}
        if labels != expected:
            tissues = ", ".join(f"{t.name}={list(t.labels)}" for t in conv.lesionwise.tissues)
            raise ParameterError(
                "convention",
                f"{name!r} scores label values {sorted(expected)} ({tissues}), but task "
                f"{spec.name!r} has labels {sorted(labels)}; use the convention of the task's challenge",
            )
    return conv


def _hd95_for(variant: str, penalty: float) -> HD95Function:
    if variant == "surface":
        return lambda pred, ref, spacing: hd95_surface(pred, ref, spacing, penalty=penalty)
    return lambda pred, ref, spacing: hd95(pred, ref, spacing, penalty=penalty)


@dataclass(frozen=True)
class Scoring:
    """A convention with the user's choice of metric set and HD95 definition, ready to score cases.

    Build it with :func:`scoring`; ``score(pred_labels, ref_labels, spec, spacing)`` gives region ->
    metric -> value for one case.
    """

    convention: Convention
    metrics: str
    hd95: str | None

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.convention.metric_names(self.metrics)

    def score(
        self, pred: np.ndarray, ref: np.ndarray, spec: TaskSpec, spacing: Sequence[float] | None
    ) -> dict[str, dict[str, float]]:
        conv = self.convention
        hd = _hd95_for(self.hd95, conv.hd95_penalty) if self.hd95 else None
        if conv.lesionwise is not None:
            return lesionwise_case_metrics(pred, ref, conv.lesionwise, spacing, self.metrics, hd95_fn=hd)
        region_metrics = conv.region_metrics
        if conv.name == "brats" and hd is not None:
            region_metrics = lambda p, r, s: brats_region_metrics(p, r, s, hd95_fn=hd)  # noqa: E731
        assert region_metrics is not None
        return per_region(region_metrics, pred, ref, spec, spacing)


def scoring(
    spec: TaskSpec, convention: str | None = None, metrics: str | None = None, hd95: str | None = None
) -> Scoring:
    """Resolve the convention and check ``metrics`` / ``hd95`` against what it defines.

    Args:
        spec: the task; its name picks the default convention.
        convention: a name from :data:`CONVENTIONS`, or None for the task's.
        metrics: legacy, lesionwise or all; None for the challenge's default.
        hd95: voxel or surface; None for the challenge's.
    """
    conv = resolve_convention(spec, convention)
    metrics = metrics or conv.default_metrics
    if metrics not in METRIC_SETS:
        raise ParameterError("metrics", f"{metrics!r} is not one of {', '.join(METRIC_SETS)}")
    if metrics != "legacy" and conv.lesionwise is None:
        with_rules = ", ".join(n for n, c in CONVENTIONS.items() if c.lesionwise is not None)
        raise ParameterError(
            "metrics",
            f"{metrics!r}: convention {conv.name!r} has no lesion-wise rules (those are BraTS 2023+: "
            f"{with_rules})",
        )
    if hd95 is not None and hd95 not in HD95_VARIANTS:
        raise ParameterError("hd95", f"{hd95!r} is not one of {', '.join(HD95_VARIANTS)}")
    if hd95 is not None and conv.hd95 is None:
        raise ParameterError("hd95", f"{hd95!r}: convention {conv.name!r} reports no HD95")
    return Scoring(conv, metrics, hd95 or conv.hd95)


# --------------------------------------------------------------------------------------- finding files


def _case_id(path: Path) -> str | None:
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)


def nifti_files(folder: str | Path) -> dict[str, Path]:
    """Case id -> file for every ``<case_id>.nii.gz`` / ``<case_id>.nii`` directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case_id = _case_id(path)
        if case_id is None or not path.is_file() or path.name.startswith("."):
            continue  # hidden: a temporary file left by a killed writer
        if case_id in found:
            raise EvaluationError(
                f"{folder}: case {case_id!r} has two files: {found[case_id].name} and {path.name}"
            )
        found[case_id] = path
    return found


def reference_files(
    folder: str | Path,
    spec: TaskSpec | str | None = None,
    *,
    predicted: Iterable[str] | None = None,
    layout: str = "auto",
) -> dict[str, Path]:
    """Case id -> reference label file, wherever the dataset readers find labels.

    Tried in order: ``<case_id>.nii.gz`` files in ``folder`` (e.g. an nnU-Net ``labelsTr`` or ``labelsTs``
    folder itself); ``folder/labelsTs`` or ``folder/labelsTr`` (the one holding every ``predicted`` case,
    else labelsTr); then the labels of ``folder`` read as a dataset in any layout with ``spec``
    (BraTS ``<case>/<case>_seg.nii.gz`` or ``-seg``, autoPET ``PATIENT/STUDY/SEG.nii.gz``, MSD, ...).
    Hidden files (macOS ``._*``) are never references.
    """
    folder = Path(folder)
    found = nifti_files(folder)
    if not found:
        found = _labels_folder_files(folder, set(predicted) if predicted is not None else None)
    if not found and spec is not None:
        found = _dataset_labels(folder, load_task(spec), layout)
    if not found:
        raise EvaluationError(
            f"{folder}: no reference labels found (expected <case>.nii.gz files, a labelsTr/labelsTs "
            "folder, or a dataset whose cases have labels, e.g. BraTS case folders <case>/<case>_seg.nii.gz "
            "or autoPET study folders with SEG.nii.gz)"
        )
    return found


def _labels_folder_files(folder: Path, predicted: set[str] | None) -> dict[str, Path]:
    candidates = [nifti_files(folder / n) for n in ("labelsTr", "labelsTs") if (folder / n).is_dir()]
    candidates = [c for c in candidates if c]
    if predicted is not None:
        covering = [c for c in candidates if predicted <= set(c)]
        candidates = covering + [c for c in candidates if c not in covering]
    return candidates[0] if candidates else {}


def _dataset_labels(folder: Path, spec: TaskSpec, layout: str) -> dict[str, Path]:
    try:
        cases = read_dataset(folder, spec, layout)
    except DatasetLayoutError as exc:
        where = "" if exc.path == folder else f"{exc.path}: "
        raise EvaluationError(f"{folder}: no reference labels found: {where}{exc.reason}") from None
    return {c.case_id: c.label for c in cases if c.label is not None and c.label.is_file()}


def _listing(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} case(s): {', '.join(names[:limit])}{more}"


def check_same_cases(
    preds: Mapping[str, Path], refs: Mapping[str, Path], pred_dir: Path, ref_dir: Path
) -> None:
    """Every reference case needs a prediction and every prediction a reference."""
    missing, extra = set(refs) - set(preds), set(preds) - set(refs)
    if not preds:
        raise EvaluationError(f"{pred_dir}: no prediction files <case_id>.nii.gz found")
    problems = []
    if missing:
        problems.append(f"no prediction in {pred_dir} for {_listing(missing)}")
    if extra:
        problems.append(f"no reference in {ref_dir} for {_listing(extra)}")
    if problems:
        raise EvaluationError("case lists differ: " + "; ".join(problems))


# --------------------------------------------------------------------------------------- reading cases


def _load(path: Path) -> tuple[np.ndarray, ImageHeader]:
    """Voxels and header through ciml's one reader, its refusal as an EvaluationError with its words."""
    try:
        return load_image(path)
    except ImageReadError as exc:
        raise EvaluationError(str(exc)) from None


def _label_array(data: np.ndarray, path: Path, spec: TaskSpec) -> np.ndarray:
    """Voxel labels as integers, checked against the task's label values."""
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if not np.issubdtype(data.dtype, np.integer):
        if not np.array_equal(data, np.round(data)):
            raise EvaluationError(f"{path}: label map has non-integer values (is it a probability map?)")
        data = data.astype(np.int64)
    values = _present_values(data)
    unknown = sorted(set(values) - set(spec.label_values))
    if unknown:
        allowed = ", ".join(map(str, spec.label_values))
        raise EvaluationError(
            f"{path}: label values {unknown} are not labels of task {spec.name} (allowed: {allowed})"
        )
    return data


def _present_values(data: np.ndarray) -> list[int]:
    """Distinct values; a histogram is much faster than ``np.unique`` for small non-negative labels."""
    if data.size == 0:
        return []
    low, high = int(data.min()), int(data.max())
    if low >= 0 and high < 1 << 16:
        return np.flatnonzero(np.bincount(data.ravel(), minlength=high + 1)).tolist()
    return np.unique(data).tolist()


def _format_affine(affine: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(affine)[:3]) + "]"


def load_case_pair(
    pred_path: Path, ref_path: Path, spec: TaskSpec
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prediction and reference label arrays on the same grid, and the reference's spacing in mm."""
    (pred_data, pred_header), (ref_data, ref_header) = _load(pred_path), _load(ref_path)
    pred, ref = _label_array(pred_data, pred_path, spec), _label_array(ref_data, ref_path, spec)
    if pred.shape != ref.shape:
        raise EvaluationError(
            f"{pred_path}: shape {pred.shape} differs from the reference {ref_path}: {ref.shape}"
        )
    if not np.allclose(pred_header.affine, ref_header.affine, rtol=0, atol=AFFINE_TOLERANCE):
        raise EvaluationError(
            f"{pred_path}: affine {_format_affine(pred_header.affine)} differs from the reference "
            f"{ref_path}: {_format_affine(ref_header.affine)} (resample the prediction to the reference grid)"
        )
    return pred, ref, ref_header.spacing[: ref.ndim]


# --------------------------------------------------------------------------------------- scoring


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spec: TaskSpec,
    spacing: Sequence[float] | None,
    convention: str | None = None,
    metrics: str | None = None,
    hd95: str | None = None,
) -> dict[str, dict[str, float]]:
    """Region -> metric -> value for one case, under ``convention`` (default: from the task name)."""
    return scoring(spec, convention, metrics, hd95).score(pred_labels, ref_labels, spec, spacing)


def _stats(values: Iterable[float]) -> dict[str, float]:
    """Mean, median and population std over the values that are defined (NaN marks 'not scored')."""
    kept = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if kept.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": float(kept.mean()),
        "median": float(np.median(kept)),
        "std": float(kept.std()),
        "n": int(kept.size),
    }


def summarize(
    cases: Mapping[str, Mapping[str, Mapping[str, float]]],
    regions: Sequence[str],
    convention: Convention,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per region and metric: mean, median, std, n; HECKTOR: aggregated Dice per region and its mean.

    ``metrics`` are the summarized per-case metrics (default: the convention's). A HECKTOR class
    with no voxel in any case is listed under ``aggregated_dice.not_computable`` and makes the mean
    null, as in the official evaluation.
    """
    names = tuple(metrics) if metrics is not None else convention.summarized
    summary: dict[str, Any] = {
        "regions": {
            region: {m: _stats(case[region][m] for case in cases.values()) for m in names}
            for region in regions
        }
    }
    if convention.aggregated_dice:
        agg = AggregatedDice()
        for case in cases.values():
            for region in regions:
                row = case[region]
                agg.add_volumes(region, row["intersection_mm3"], row["pred_mm3"], row["ref_mm3"])
        summary["aggregated_dice"] = {
            **agg.per_class(),
            "mean": agg.mean(),
            "not_computable": agg.not_computable(),
        }
    return summary


@dataclass
class EvaluationResult:
    """Per-case metrics and their summary, with writers for JSON and CSV.

    Attributes:
        task: task spec name.
        convention: the convention used (brats, brats2023, brats2024, autopet, hecktor, ...).
        regions: scored regions, in spec order (lesion-wise conventions: the challenge's tissues).
        cases: case id -> region -> metric -> value (NaN where the convention does not score it).
        summary: see :func:`summarize`.
        metrics: the summarized per-case metrics, in table order.
        metric_set: legacy, lesionwise or all.
        hd95: the HD95 definition used (voxel, surface), or None.
    """

    task: str
    convention: str
    regions: tuple[str, ...]
    cases: dict[str, dict[str, dict[str, float]]]
    summary: dict[str, Any]
    metrics: tuple[str, ...] = ()
    metric_set: str = "legacy"
    hd95: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per case and region (the CSV)."""
        return [
            {"case": c, "region": r, **metrics[r]} for c, metrics in self.cases.items() for r in self.regions
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; NaN becomes null."""
        data = {
            "task": self.task,
            "convention": self.convention,
            "metrics": self.metric_set,
            "hd95": self.hd95,
            "n_cases": len(self.cases),
            "summary": self.summary,
            "cases": self.cases,
        }
        return _nan_to_none(data)

    def to_csv(self) -> str:
        rows = self.rows()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def table(self) -> str:
        """Human-readable summary: mean ± std per region and metric (HECKTOR: plus aggregated Dice)."""
        metrics = self.metrics or CONVENTIONS[self.convention].summarized
        header = ["region", *metrics]
        agg = self.summary.get("aggregated_dice")
        if agg is not None:
            header.append("dice_agg")
        lines = [header]
        for region in self.regions:
            stats = self.summary["regions"][region]
            cells = [region] + [f"{_num(stats[m]['mean'])} ± {_num(stats[m]['std'])}" for m in metrics]
            lines.append(cells + ([_num(agg[region])] if agg is not None else []))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        n = len(self.cases)
        text = [f"task {self.task}, {self.convention} convention, {n} case{'' if n == 1 else 's'}"]
        text += [
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
        ]
        if agg is not None:
            text.append(f"aggregated Dice, mean over classes: {_num(agg['mean'])}")
            for cls in agg.get("not_computable", []):
                text.append(f"aggregated Dice {cls}: not computable (no voxel in any case)")
        return "\n".join(text)

    def write(
        self, json_path: str | Path, csv_path: str | Path | None = None, overwrite: bool = False
    ) -> None:
        """Write the JSON (and CSV) atomically; existing files are kept unless ``overwrite``."""
        paths = [Path(json_path)] + ([Path(csv_path)] if csv_path is not None else [])
        check_outputs(paths, overwrite)
        write_text_atomic(paths[0], json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        if csv_path is not None:
            write_text_atomic(paths[1], self.to_csv())


def _num(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4g}"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def check_outputs(paths: Iterable[str | Path], overwrite: bool = False) -> None:
    """Refuse to replace existing files unless ``overwrite``; call before long work to fail early."""
    refuse_existing(paths, overwrite)


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    spec: TaskSpec | str | None = None,
    convention: str | None = None,
    progress: bool = False,
    layout: str = "auto",
    metrics: str | None = None,
    hd95: str | None = None,
) -> EvaluationResult:
    """Score every predicted case against its reference.

    Args:
        pred_dir: folder of ``<case_id>.nii.gz`` (or ``.nii``) label maps in the dataset's label values.
        ref_dir: references: same layout, or any dataset whose labels :func:`reference_files` finds.
        spec: task spec or its name; its regions are scored and its label values checked. None: the
            spec built from the nnU-Net ``dataset.json`` of ``ref_dir``.
        layout: layout of ``ref_dir`` when it is read as a dataset (default: detected).
        convention: a name from :data:`CONVENTIONS`; default from the task name (other tasks: brats).
        progress: show a progress bar over cases.
        metrics: legacy, lesionwise (BraTS 2023+) or all; default: the challenge's.
        hd95: voxel (MONAI's definition) or surface (BraTS 2023+); default: the challenge's.

    Raises:
        EvaluationError: case lists differ, a file is unreadable, grids differ, or labels are unknown.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    try:
        spec = resolve_task(spec, ref_dir, layout)
    except DatasetLayoutError as exc:
        raise EvaluationError(str(exc)) from None
    how = scoring(spec, convention, metrics, hd95)
    preds = nifti_files(pred_dir)
    refs = reference_files(ref_dir, spec, predicted=preds, layout=layout)
    check_same_cases(preds, refs, pred_dir, ref_dir)
    cases = {}
    for case_id in tqdm(sorted(preds), desc="evaluate", unit="case", disable=not progress):
        pred, ref, spacing = load_case_pair(preds[case_id], refs[case_id], spec)
        cases[case_id] = how.score(pred, ref, spec, spacing)
    conv, names = how.convention, how.metric_names
    regions = conv.regions(spec)
    summary = summarize(cases, regions, conv, names)
    return EvaluationResult(spec.name, conv.name, regions, cases, summary, names, how.metrics, how.hd95)
