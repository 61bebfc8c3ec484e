"""What the run report shows, section by section, as plain data (rendered by :mod:`ciml.report.html`).

Sections, in order: the evaluation table (``--pred`` and ``--ref``), per-case overlays (input modalities,
reference, prediction, errors), the explanations (Grad-CAM shares and information maps, from a folder
written by ``ciml explain`` or computed on the spot), the robustness table (``RUN/robustness`` when
``ciml robustness`` wrote it), the training curves of every fold and the run's configuration with its
task decomposition. A section without its inputs says what would fill it. Images are PNGs embedded as
``data:`` URIs, styles are inline, there is no script and no link outside the page: it opens from disk
in any browser with no server and no network.

Example:
    >>> page = report_page("runs/brats", pred_dir="preds", ref_dir="data")  # doctest: +SKIP
    >>> page["evaluation"]  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Orientation

from ciml import __version__
from ciml.data.cases import Case
from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import load_volume
from ciml.errors import CimlError, ParameterError
from ciml.evaluation.evaluate import (
    CONVENTIONS,
    EvaluationResult,
    evaluate_folders,
    nifti_files,
    reference_files,
)
from ciml.explain import Explainer
from ciml.explain.figures import case_overlay_png, tumour_slice
from ciml.inference import InferenceSettings
from ciml.models import model_from_config
from ciml.runs import RunFolder
from ciml.runs.log import LOG_FILE, PLOT_FILE, plot_progress, read_log
from ciml.tasks import TaskSpec

SECTIONS = (
    ("evaluation", "Evaluation"),
    ("cases", "Cases"),
    ("explanations", "Explanations"),
    ("robustness", "Robustness"),
    ("training", "Training"),
    ("configuration", "Configuration"),
)
EXPLANATION_FIGURES = ("gradcam.png", "information.png", "contributions.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


@dataclass(frozen=True)
class EmbeddedImage:
    """A PNG as a data URI with its natural size (shown 1:1) and a caption."""

    uri: str
    width: int
    height: int
    caption: str


def embed_png(png: bytes, caption: str) -> EmbeddedImage:
    """``png`` as a ``data:image/png;base64`` URI; its size comes from the PNG header."""
    if png[:8] != _PNG_SIGNATURE or len(png) < 24:
        raise CimlError(f"{caption}: not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return EmbeddedImage(
        f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}", width, height, caption
    )


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value) if value else "none"
    return "n/a" if value is None else str(value)


# -------------------------------------------------------------------------------------- configuration


def run_network(info: Mapping[str, Any]) -> dict[str, Any]:
    """The facts the run's network declares (run.json's ``network``; rebuilt for runs that predate it)."""
    if "network" in info:
        return dict(info["network"])
    return model_from_config(info["model"]).describe()


def _owners(network: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Segmentor -> regions it predicts in this network."""
    return {
        segmentor: tuple(r for r, owners in network["owners"].items() if segmentor in owners)
        for segmentor in network["primary_inputs"]
    }


def config_section(run: RunFolder, info: Mapping[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """Tables of the decomposition, the regions, the run, its preprocessing and training settings."""
    model = info["model"]
    network = run_network(info)
    owners = _owners(network)
    levels = list(network["message_levels"])
    decomposition = [["segmentor", "primary input", "regions it owns", "messages from (levels)"]]
    for segmentor, regions in owners.items():
        inputs = network["primary_inputs"][segmentor]
        primary = (
            "all modalities, stacked" if len(inputs) > 1 else f"{inputs[0]} ({spec.modalities[inputs[0]]})"
        )
        senders = [m for m in spec.modality_names if m != segmentor] if levels else []
        messages = f"{', '.join(senders)} (levels {', '.join(map(str, levels))})" if senders else "none"
        decomposition.append([segmentor, primary, ", ".join(regions), messages])
    if levels:
        caption = (
            "Each segmentor sees only its primary modality and owns the regions experts read from it; it "
            "receives gated, information-bottlenecked messages from the other modalities' segmentors."
        )
    else:
        caption = f"Model {model.get('name')}: no messages between networks."
    regions = [["region", "label values", "predicted by"]]
    for region, labels in spec.regions.items():
        regions.append([region, _text(list(labels)), ", ".join(s for s, r in owners.items() if region in r)])
    plan = info.get("preprocessing") or {}
    data = info.get("data") or {}
    run_rows = [
        ["setting", "value"],
        ["run folder", str(run.path)],
        ["task", spec.name],
        ["model", _text(model.get("name"))],
        ["widths", _text(model.get("widths"))],
        ["message levels", _text(levels)],
        ["patch size", _text(info.get("patch_size"))],
        ["target spacing (mm)", _text(plan.get("target_spacing"))],
        ["folds trained", _text(run.folds())],
        ["data", f"{_text(data.get('path'))} ({_text(data.get('layout'))} layout)"],
        ["ciml version", _text(info.get("ciml_version"))],
        ["created", _text(info.get("created"))],
    ]
    preprocessing = [["modality", "type", "normalisation", "parameters"]]
    for modality, kind in spec.modalities.items():
        norm = (plan.get("normalization") or {}).get(modality, {})
        params = ", ".join(f"{k} {v:.4g}" for k, v in (norm.get("params") or {}).items()) or "per case"
        preprocessing.append([modality, kind, _text(norm.get("scheme")), params])
    settings = dict(info.get("train") or {})
    if settings and network.get("fixed_beta") is not None:  # runs before run.json recorded the loss's beta
        settings["beta"] = network["fixed_beta"]
    train = [["setting", "value"]] + [[k, _text(v)] for k, v in settings.items()]
    return {
        "decomposition": decomposition,
        "decomposition_caption": caption,
        "regions": regions,
        "run": run_rows,
        "preprocessing": preprocessing,
        "train": train if len(train) > 1 else None,
    }


# ------------------------------------------------------------------------------------------- training


def training_section(run: RunFolder) -> dict[str, Any]:
    """Per fold: the curves redrawn from ``log.jsonl`` (else its ``progress.png``) and the final numbers."""
    grid = [
        ["fold", "iterations", "final loss", "final KL (nats/voxel)", "best validation Dice", "at iteration"]
    ]
    images, folds = [], []
    for fold in run.folds():
        folder = run.fold_dir(fold)
        records = read_log(folder / LOG_FILE) if (folder / LOG_FILE).is_file() else []
        steps = [r for r in records if "loss" in r]
        validated = [r for r in steps if "val/dice/mean" in r]
        best = max(validated, key=lambda r: r["val/dice/mean"], default={})
        last = steps[-1] if steps else {}
        grid.append([
            str(fold), _text(last.get("iteration")), _number(last.get("loss")), _number(last.get("kl")),
            _number(best.get("val/dice/mean")), _text(best.get("iteration")),
        ])  # fmt: skip
        png = _progress_png(steps, folder / PLOT_FILE)
        if png is not None:
            images.append(embed_png(png, f"fold {fold}: losses, information sent and validation Dice"))
        folds.append(fold)
    missing = f"{run.path}: no trained fold (no fold_K/checkpoint_last.pt)"
    return {"folds": folds, "grid": grid, "images": images, "missing": missing}


def _progress_png(steps: list[dict[str, Any]], saved: Path) -> bytes | None:
    if steps:
        with tempfile.TemporaryDirectory() as folder:
            return plot_progress(steps, Path(folder) / PLOT_FILE).read_bytes()
    return saved.read_bytes() if saved.is_file() else None


# ----------------------------------------------------------------------------------------- evaluation


def evaluation_section(result: EvaluationResult | None, reason: str) -> dict[str, Any]:
    """The summary table (mean ± std per region and metric) and Dice per case."""
    if result is None:
        return {"grid": None, "missing": reason}
    metrics = result.metrics or CONVENTIONS[result.convention].summarized
    aggregated = result.summary.get("aggregated_dice")
    grid = [["region", *metrics] + (["aggregated Dice"] if aggregated else [])]
    for region in result.regions:
        stats = result.summary["regions"][region]
        cells = [f"{_number(stats[m]['mean'])} ± {_number(stats[m]['std'])}" for m in metrics]
        grid.append([region, *cells] + ([_number(aggregated[region])] if aggregated else []))
    cases = [["case", *(f"{r} Dice" for r in result.regions)]]
    for case_id, metrics_of in result.cases.items():
        cases.append([case_id, *(_number(metrics_of[r].get("dice")) for r in result.regions)])
    n = len(result.cases)
    caption = (
        f"Task {result.task}, {result.convention} conventions, {n} case{'' if n == 1 else 's'}: mean ± std."
    )
    return {"grid": grid, "cases": cases, "caption": caption}


def _ras(path: Path) -> np.ndarray:
    """A volume in RAS orientation, the way the figures show it."""
    return _RAS(load_volume(path)).as_tensor()[0].numpy()


def cases_section(
    result: EvaluationResult | None,
    pred_dir: Path | None,
    ref_dir: Path | None,
    cases: Mapping[str, Case],
    spec: TaskSpec,
    max_cases: int,
    reason: str,
) -> dict[str, Any]:
    """Overlays of the first ``max_cases`` evaluated cases, on the slice with the most reference tumour."""
    if result is None or pred_dir is None or ref_dir is None:
        return {"images": [], "missing": reason}
    predictions = nifti_files(pred_dir)
    references = reference_files(ref_dir, spec, predicted=predictions)
    label_values = [v for v in spec.label_values if v != 0]
    images = []
    for case_id in list(result.cases)[:max_cases]:
        reference = np.rint(_ras(references[case_id])).astype(np.int64)
        prediction = np.rint(_ras(predictions[case_id])).astype(np.int64)
        case = cases.get(case_id)
        modalities = {m: _ras(p) for m, p in case.images.items()} if case is not None else {}
        index = tumour_slice(reference > 0) if reference.any() else tumour_slice(prediction > 0)
        dice = ", ".join(f"{r} {_number(result.cases[case_id][r].get('dice'), 3)}" for r in result.regions)
        png = case_overlay_png(
            modalities, reference, prediction, index, label_values, f"{case_id}, slice {index}"
        )
        images.append(embed_png(png, f"{case_id}: axial slice {index}; Dice {dice}"))
    caption = (
        "Axial slice with the most reference tumour per case (anterior up, patient's right on the right); "
        "errors: correct, false positive, false negative, wrong label."
    )
    if not cases:
        caption += f" The input modalities were not found next to the references in {ref_dir}."
    return {"images": images, "caption": caption}


# ------------------------------------------------------------------------------------- explanations


def _explanation_case(summary: Mapping[str, Any], figures: Mapping[str, bytes], modalities: Sequence[str]):
    """One case's explanation block from its ``explanation.json`` content and PNG figures."""
    fractions = [["segmentor:region", *modalities]]
    for c in summary.get("contributions", []):
        shares = c.get("fractions", {})
        fractions.append(
            [f"{c['segmentor']}:{c['region']}", *(_number(100 * shares.get(m, 0.0), 1) for m in modalities)]
        )
    totals = summary.get("information_nats_per_voxel") or {}
    information = None
    if totals:
        receivers = list(dict.fromkeys(k.split("<-")[0] for k in totals))
        information = [["receiver", *modalities]]
        for receiver in receivers:
            cells = [_number(totals.get(f"{receiver}<-{m}"), 3) if m != receiver else "-" for m in modalities]
            information.append([receiver, *cells])
    captions = {
        "gradcam.png": "Maps per segmentor:region (rows) and modality (columns); cyan: explained mask.",
        "information.png": "Information each message carried, nats per voxel (title: mean over the case).",
        "contributions.png": "Share of each modality in each segmentor's region.",
    }
    images = [embed_png(figures[name], captions[name]) for name in EXPLANATION_FIGURES if name in figures]
    return {
        "case_id": summary.get("case_id", "?"),
        "notes": summary.get("notes", []),
        "fractions": fractions,
        "information": information,
        "images": images,
    }


def explanations_from_folder(folder: Path, modalities: Sequence[str], max_cases: int) -> list[dict[str, Any]]:
    """Cases explained by ``ciml explain`` in ``folder`` (one subfolder per case with explanation.json)."""
    if not folder.is_dir():
        raise ParameterError("explanations", f"{folder}: no such folder of explanations (from ciml explain)")
    blocks = []
    for summary_path in sorted(folder.glob("*/explanation.json"))[:max_cases]:
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CimlError(f"{summary_path}: not valid JSON ({exc})") from None
        figures = {n: (summary_path.parent / n).read_bytes() for n in EXPLANATION_FIGURES
                   if (summary_path.parent / n).is_file()}  # fmt: skip
        blocks.append(_explanation_case(summary, figures, modalities))
    if not blocks:
        raise ParameterError(
            "explanations", f"{folder}: holds no <case>/explanation.json (from ciml explain)"
        )
    return blocks


def explanations_computed(
    run: RunFolder, cases: Sequence[Case], spec: TaskSpec, settings: InferenceSettings | None = None
) -> list[dict[str, Any]]:
    """Explain ``cases`` now, in memory (nothing is written but the report)."""
    explainer = Explainer.from_run(run, settings)
    blocks = []
    for case in cases:
        explanation = explainer.explain(case)
        blocks.append(_explanation_case(explanation.summary(), explanation.figures(), spec.modality_names))
    return blocks


# --------------------------------------------------------------------------------------- robustness


def robustness_section(path: Path | None) -> dict[str, Any]:
    """The per-subset Dice table written by ``ciml robustness`` (robustness.json)."""
    if path is None or not path.is_file():
        where = f" (looked for {path})" if path is not None else ""
        return {"grid": None, "missing": f"Not computed{where}: run `ciml robustness --run RUN --data DATA`."}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        regions = list(data["regions"])
        grid = [["modalities", *regions, "mean"]]
        notes = []
        for name, row in data["subsets"].items():
            dice = row["dice"]
            grid.append([name, *(_number(dice.get(r)) for r in regions), _number(row.get("mean"))])
            if row.get("note"):
                notes.append(f"{name}: {row['note']}")
        contributions = None
        if "average" in data:  # tables written before the summaries have only the rows
            average = data["average"]
            grid.append(["subset average", *(_interval(average[k]) for k in (*regions, "mean"))])
            contributions = [["modality", *regions, "mean", "pairs"]]
            for modality, values in data["contributions"].items():
                cells = [_interval(values[k]) for k in (*regions, "mean")]
                contributions.append([modality, *cells, _text(values["mean"].get("pairs"))])
            boot = data.get("bootstrap", {})
            notes.append(
                f"subset average: mean over the {len(data['subsets'])} subsets of each subset's Dice "
                f"(DeMoSeg/mmFormer protocol); brackets: 95 % patient-level bootstrap intervals "
                f"({boot.get('samples')} resamples, seed {boot.get('seed')})."
            )
        caption = (
            f"Dice per modality subset: task {data.get('task')}, {data.get('convention')} conventions, "
            f"{data.get('dice')}, {data.get('n_cases')} case(s); n/a: not predictable with that subset."
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CimlError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise CimlError(
            f"{path}: not a robustness table written by `ciml robustness` (bad key {exc})"
        ) from None
    return {"grid": grid, "notes": notes, "caption": caption, "contributions": contributions}


def _interval(value: Mapping[str, Any]) -> str:
    """``estimate [low, high]`` from a robustness.json interval (null: n/a)."""
    estimate, low, high = value.get("estimate"), value.get("low"), value.get("high")
    if estimate is None:
        return "n/a"
    return _number(estimate) if low is None else f"{_number(estimate)} [{_number(low)}, {_number(high)}]"


# ------------------------------------------------------------------------------------------- the page


def _cases_with_images(folder: Path | None, spec: TaskSpec, layout: str) -> dict[str, Case]:
    """Cases (with modality files) of a dataset folder, or none when it is not one (flat label folders)."""
    if folder is None:
        return {}
    try:
        return {c.case_id: c for c in read_dataset(folder, spec, layout)}
    except CimlError:
        return {}


def report_page(
    run: RunFolder | str | Path,
    *,
    pred_dir: str | Path | None = None,
    ref_dir: str | Path | None = None,
    explanations: str | Path | None = None,
    robustness: str | Path | None = None,
    explain_cases: int = 1,
    max_cases: int = 3,
    layout: str = "auto",
    settings: InferenceSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the report shows, as plain data for the template (see :func:`ciml.report.write_report`)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    info = run.read_info()
    spec = run.spec()
    if (pred_dir is None) != (ref_dir is None):
        raise ParameterError("pred_dir", "predictions and references go together (give both or neither)")
    pred_dir = None if pred_dir is None else Path(pred_dir)
    ref_dir = None if ref_dir is None else Path(ref_dir)
    result = evaluate_folders(pred_dir, ref_dir, spec, progress=progress) if pred_dir is not None else None
    no_eval = "Not evaluated: pass --pred PREDICTIONS --ref REFERENCES (pred_dir= and ref_dir=)."
    cases = _cases_with_images(ref_dir, spec, layout)
    if explanations is not None:
        explained = explanations_from_folder(Path(explanations), spec.modality_names, max_cases)
    elif explain_cases > 0:
        chosen = _cases_to_explain(result, cases, run, info, spec, explain_cases)
        explained = explanations_computed(run, chosen, spec, settings)
    else:
        explained = []
    robustness_path = (
        Path(robustness) if robustness is not None else run.path / "robustness" / "robustness.json"
    )
    page = {
        "title": f"{spec.name}, {info['model'].get('name')} ({run.path.name})",
        "subtitle": f"Run {run.path}: task {spec.name}, model {info['model'].get('name')}, "
        f"modalities {', '.join(spec.modality_names)}, regions {', '.join(spec.region_names)}.",
        "sections": SECTIONS,
        "evaluation": evaluation_section(result, no_eval),
        "cases": cases_section(result, pred_dir, ref_dir, cases, spec, max_cases, no_eval),
        "explanations": {
            "cases": explained,
            "caption": "Which modality contributed where (Grad-CAM) and what each message carried (KL).",
            "missing": "No explanation: pass --explanations DIR (from `ciml explain`) or --explain-cases N "
            "with cases to explain.",
        },
        "robustness": robustness_section(robustness_path),
        "training": training_section(run),
        "config": config_section(run, info, spec),
        "version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    return page


def _cases_to_explain(
    result: EvaluationResult | None,
    cases: Mapping[str, Case],
    run: RunFolder,
    info: Mapping[str, Any],
    spec: TaskSpec,
    count: int,
) -> list[Case]:
    """The first evaluated cases that have their images; without an evaluation, the run's own data."""
    if result is not None and cases:
        return [cases[c] for c in result.cases if c in cases][:count]
    source = info.get("data") or {}
    if "path" in source and Path(source["path"]).exists():
        return read_dataset(source["path"], spec, source.get("layout", "auto"))[:count]
    return []
