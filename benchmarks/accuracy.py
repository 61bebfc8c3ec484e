"""Accuracy of CIML against its baselines on the brain tumour phantom at equal budget (issue 7).

Every model (ciml, joint, ensemble, ciml-nomsg, ciml-beta0, segresnet) trains on the same phantom
training cases (fold 0 of the same 5-fold split) with the same iterations, patch, batch, optimizer and
seed, through the API ``ciml demo`` uses; each then predicts the same held-out test phantoms, scored by
the code ``ciml evaluate`` runs (BraTS conventions: Dice and HD95 per region WT, TC, ET). The table also
gives parameters, forward FLOPs of one training patch, training and inference wall time. Equal budget
means equal data and iterations, not equal FLOPs: CIML's and the ensemble's four segmentors use the joint
U-Net's widths each, so they cost about four times its arithmetic (the FLOPs column shows it).

Then the 15-subset missing-modality table (``ciml robustness``) with its subset average per region. With
``--modality-dropout P`` every model trains with modality dropout (CIML-family models skip the dropped
segmentors, joint and segresnet see zero-filled channels and then run zero-filled on any subset), so the
15-subset comparison is like for like; without it joint and segresnet need every modality and their
incomplete subsets are n/a, with the reason. Last comes the
ShapeComposition table: the committed benchmarks/results/shapecomposition/results.json, or a fresh run
with ``--shapes``.

    python benchmarks/accuracy.py --setting cpu    # 2 CPU cores, 1 torch thread: under one hour
    python benchmarks/accuracy.py --setting gpu    # a lent H100/H200: a few minutes
    python benchmarks/accuracy.py --quick --out /tmp/accuracy   # smoke test, well under a minute
    python benchmarks/accuracy.py --setting cpu --models ciml,joint --out /tmp/accuracy_two

Writes ``results.json`` (environment, settings, per-model rows, robustness, shapes) and ``results.md``
to ``--out`` (default benchmarks/results/accuracy_<setting>/), atomically, refusing to replace them
without ``--overwrite``; they are rewritten after every model, so a crash keeps the finished models.
Phantoms, runs and predictions go to ``--work`` (default: a temporary folder, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import speed  # benchmarks/speed.py, beside this script: its FLOP counter and environment record
from ciml.errors import CimlError
from ciml.evaluation.evaluate import evaluate_folders
from ciml.evaluation.robustness import (
    RobustnessResult,
    evaluate_robustness,
    modality_subsets,
    subset_name,
)
from ciml.experiments.brain_demo import (
    TASK,
    BrainDemoConfig,
    check_phantoms,
    inference_settings,
    train_settings,
    write_phantoms,
)
from ciml.experiments.shapecomposition import ShapeExperimentConfig, results_table, run_experiment
from ciml.files import write_json_atomic, write_text_atomic
from ciml.inference.predict import predict_folder
from ciml.models import build_model
from ciml.models.registry import MODELS
from ciml.tasks import load_task
from ciml.training.engine import train

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
SHAPES_RESULTS = RESULTS_DIR / "shapecomposition" / "results.json"
ALL_MODELS = ("ciml", "joint", "ensemble", "ciml-nomsg", "ciml-beta0", "segresnet")
OUTPUT_NAMES = ("results.json", "results.md")
METRICS = ("dice", "hd95")


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers; stored in the JSON next to them.

    ``widths`` serve every U-Net-based model (each CIML/ensemble segmentor has them); SegResNet gets
    ``segresnet_widths`` (only the first width, its init filters, and the number of levels matter).
    """

    setting: str
    device: str
    train_cases: int
    test_cases: int
    iterations: int
    patch: int
    batch: int
    widths: tuple[int, ...]
    segresnet_widths: tuple[int, ...]
    inference_patch: int
    robustness_models: tuple[str, ...]
    threads: int | None
    seed: int = 0
    target_spacing_mm: float | None = None  # None: train and predict at the phantoms' 2 mm
    modality_dropout: float = 0.0  # share of batches that hide a random proper subset of modalities
    note: str = ""

    def demo_config(self, model: str) -> BrainDemoConfig:
        """The brain demo's config for one model (the demo's functions train and predict it)."""
        cube = (self.patch,) * 3
        return BrainDemoConfig(
            train_cases=self.train_cases,
            test_cases=self.test_cases,
            iterations=self.iterations,
            patch_size=cube,
            widths=self.segresnet_widths if model == "segresnet" else self.widths,
            batch_size=self.batch,
            inference_patch=(self.inference_patch,) * 3,
            model=model,
            seed=self.seed,
            device=self.device,
        )


ROBUSTNESS_DEFAULT = ("ciml", "ensemble", "ciml-nomsg", "joint", "segresnet")

PRESETS: dict[str, Settings] = {
    # Measured on the 2-core AMD EPYC box, 1 thread (--models ciml): ciml trains 500 iterations of
    # 2x4x32^3 (widths 8..64) in 402 s, predicts a test case in 11.5 s, its 15-subset table takes 244 s
    # for 4 cases. Per training step, relative to ciml: ciml-beta0 1, ensemble and ciml-nomsg 0.53,
    # segresnet 0.20, joint 0.16. So all six train in ~23 min; with predictions and robustness ~35 min.
    "cpu": Settings(
        setting="cpu",
        device="cpu",
        train_cases=12,
        test_cases=4,
        iterations=500,
        patch=32,
        batch=2,
        widths=(8, 16, 32, 64),
        segresnet_widths=(8, 16, 32, 64),  # MONAI's default SegResNet: init_filters 8, blocks (1, 2, 2, 4)
        inference_patch=64,
        robustness_models=ROBUSTNESS_DEFAULT,
        threads=1,
        note="2 CPU cores, 1 torch thread; about 35 minutes for all six models (estimated)",
    ),
    # Estimated, not measured (no GPU was lent): eager ciml runs ~12k aten ops per training step, so it
    # is launch-bound at <= ~100 ms/step (243 GFLOP forward at 2x4x64^3); ensemble/ciml-nomsg ~4.5k ops,
    # joint/segresnet ~1.5k. 1000 iterations: ~5.5 min of training for all six, plus ~2 min of
    # phantoms, preprocessing, prediction (one 96^3 tile covers a cropped 2 mm case) and robustness.
    "gpu": Settings(
        setting="gpu",
        device="cuda",
        train_cases=24,
        test_cases=8,
        iterations=1000,
        patch=64,
        batch=2,
        widths=(16, 32, 64, 128),
        segresnet_widths=(16, 32, 64, 128),  # MONAI's BraTS tutorial SegResNet: init_filters 16
        inference_patch=96,
        robustness_models=("ciml", "joint", "segresnet"),  # --robustness adds ensemble, ciml-nomsg
        threads=None,
        note="one H100/H200, bf16 autocast; estimated at most 8 minutes for all six models",
    ),
    "quick": Settings(
        setting="quick",
        device="cpu",
        train_cases=2,
        test_cases=1,
        iterations=3,
        patch=16,
        batch=1,
        widths=(4, 8),
        segresnet_widths=(4, 8),
        inference_patch=32,
        robustness_models=ROBUSTNESS_DEFAULT,
        threads=1,
        target_spacing_mm=4.0,  # 8x fewer voxels to predict than at 2 mm
        note="smoke test (--quick): numbers mean nothing",
    ),
}

#: ShapeComposition for ``--quick --shapes``: seconds, not minutes.
QUICK_SHAPES = ShapeExperimentConfig(
    size=(32, 32), widths=(4, 8), batch_size=2, iterations=3, validation_samples=4
)


def check_settings(settings: Settings, models: Sequence[str]) -> None:
    """Fail before any work on settings no model can run.

    Raises:
        CimlError: unknown model, CUDA missing, a patch not divisible by a model's downsampling.
    """
    unknown = [m for m in (*models, *settings.robustness_models) if m not in MODELS]
    if unknown:
        raise CimlError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if not models:
        raise CimlError("--models: name at least one model")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise CimlError("--setting gpu needs CUDA, which is not available here (use --setting cpu)")
    if settings.train_cases < 2 or settings.test_cases < 1:
        raise CimlError("need at least 2 training cases (the run splits them) and 1 test case")
    for widths in {settings.demo_config(m).widths for m in models}:
        divisor = 2 ** (len(widths) - 1)
        for name, size in (("patch", settings.patch), ("inference patch", settings.inference_patch)):
            if size % divisor:
                raise CimlError(f"{name} {size} must be a multiple of {divisor} for widths {widths}")


# ------------------------------------------------------------------------------------------ results


@dataclass
class ModelRow:
    """One model's scores on the held-out phantoms and its costs.

    Attributes:
        dice, dice_std, hd95, hd95_std: region -> mean (std) over the test cases (HD95 in mm).
        mean_dice: mean of the regions' mean Dice.
        fwd_gflops: forward GFLOPs of one 4-channel training patch (batch 1).
        train_s: wall time of ``train`` (incl. preprocessing the training cases, a few seconds).
        inference_s: wall time of ``predict_folder`` over all test cases (incl. loading the model).
        robustness_s: wall time of the 15-subset table (None: not run for this model).
        cases: case -> region -> {dice, hd95}.
    """

    model: str
    widths: list[int]
    params: int
    fwd_gflops: float
    dice: dict[str, float]
    dice_std: dict[str, float]
    hd95: dict[str, float]
    hd95_std: dict[str, float]
    mean_dice: float
    train_s: float
    inference_s: float
    inference_s_per_case: float
    n_train_cases: int
    robustness_s: float | None = None
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def cost(model: str, widths: Sequence[int], patch: int) -> tuple[int, float]:
    """Parameters and forward GFLOPs of one 1x4xpatch^3 input, counted on the meta device."""
    spec = load_task(TASK)

    def build() -> torch.nn.Module:
        return build_model(model, spec, widths=widths)

    with torch.device("meta"):
        params = sum(p.numel() for p in build().parameters())
    flops = speed.forward_flops(build, (1, len(spec.modality_names), patch, patch, patch))
    return params, flops / 1e9


def robustness_summary(result: RobustnessResult, seconds: float) -> dict[str, Any]:
    """A robustness result without its per-case metrics (those stay in the work folder)."""
    data = result.to_dict()
    for subset in data["subsets"].values():
        subset.pop("cases", None)
    data["seconds"] = round(seconds, 1)
    return data


def run_model(
    model: str, settings: Settings, data: tuple[Path, Path], work: Path, progress: bool
) -> tuple[ModelRow, dict[str, Any] | None]:
    """Train, predict, evaluate (and the robustness table) for one model; its row and robustness."""
    train_dir, test_dir = data
    config = settings.demo_config(model)
    spec = load_task(TASK)
    started = time.perf_counter()
    # no validation: the fold's validation cases are unused, every model is scored on the test set
    training = train_settings(config, train_dir, work / "runs" / model, progress, validation_cases=0)
    if settings.target_spacing_mm is not None:
        training = replace(training, target_spacing=(settings.target_spacing_mm,) * 3)
    training = replace(training, modality_dropout=settings.modality_dropout)
    run = train(training)
    train_s = time.perf_counter() - started

    predictions = work / "predictions" / model
    started = time.perf_counter()
    cases = predict_folder(run, test_dir, predictions, settings=inference_settings(config), progress=progress)
    inference_s = time.perf_counter() - started

    evaluation = evaluate_folders(predictions, test_dir, spec)
    evaluation.write(work / "metrics" / f"{model}.json", work / "metrics" / f"{model}.csv")
    regions = evaluation.summary["regions"]
    params, gflops = cost(model, config.widths, settings.patch)
    split = json.loads(run.splits_path.read_text(encoding="utf-8"))[0]
    row = ModelRow(
        model=model,
        widths=list(config.widths),
        params=params,
        fwd_gflops=round(gflops, 4),
        dice={r: regions[r]["dice"]["mean"] for r in spec.region_names},
        dice_std={r: regions[r]["dice"]["std"] for r in spec.region_names},
        hd95={r: regions[r]["hd95"]["mean"] for r in spec.region_names},
        hd95_std={r: regions[r]["hd95"]["std"] for r in spec.region_names},
        mean_dice=float(sum(regions[r]["dice"]["mean"] for r in spec.region_names) / len(spec.region_names)),
        train_s=round(train_s, 1),
        inference_s=round(inference_s, 1),
        inference_s_per_case=round(sum(c.seconds for c in cases) / max(1, len(cases)), 2),
        n_train_cases=len(split["train"]),
        cases={
            case: {r: {m: values[r][m] for m in METRICS} for r in spec.region_names}
            for case, values in evaluation.cases.items()
        },
    )
    robustness = None
    if model in settings.robustness_models:
        started = time.perf_counter()
        result = evaluate_robustness(run, test_dir, settings=inference_settings(config), progress=progress)
        row.robustness_s = round(time.perf_counter() - started, 1)
        result.write(work / "robustness" / model)
        robustness = robustness_summary(result, row.robustness_s)
    return row, robustness


def shapes_table(settings: Settings, run_shapes: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """ShapeComposition results: the committed JSON, or a fresh ``run_experiment`` with ``--shapes``."""
    if not run_shapes:
        if not SHAPES_RESULTS.is_file():
            return {"source": f"{SHAPES_RESULTS.relative_to(BENCHMARKS.parent)} is missing; pass --shapes"}
        data = json.loads(SHAPES_RESULTS.read_text(encoding="utf-8"))
        source = f"{SHAPES_RESULTS.relative_to(BENCHMARKS.parent)} (committed `ciml shapes` run, not rerun)"
        return {"source": source, "config": data["config"], "methods": data["methods"]}
    config = QUICK_SHAPES if settings.setting == "quick" else ShapeExperimentConfig()
    config = replace(config, device=settings.device)
    started = time.perf_counter()
    data = run_experiment(config, progress=False, log=log, jobs=1)
    source = f"run by this script (--shapes, {time.perf_counter() - started:.0f} s, 1 process)"
    return {"source": source, "config": data["config"], "methods": data["methods"]}


# ----------------------------------------------------------------------------------------- markdown


def _num(value: float | None, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def main_table(rows: Sequence[dict[str, Any]], regions: Sequence[str], patch: int) -> str:
    """Markdown: Dice and HD95 per region, mean Dice, parameters, FLOPs and wall times per model."""
    header = (
        ["model", "widths", "params", f"GFLOP fwd 1x4x{patch}^3"]
        + [f"Dice {r}" for r in regions]
        + ["mean Dice"]
        + [f"HD95 {r} (mm)" for r in regions]
        + ["train s", "inference s/case"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (
            [
                row["model"],
                "/".join(map(str, row["widths"])),
                f"{row['params']:,}",
                f"{row['fwd_gflops']:.3f}",
            ]
            + [_num(row["dice"][r]) for r in regions]
            + [f"**{_num(row['mean_dice'])}**"]
            + [_num(row["hd95"][r], 1) for r in regions]
            + [f"{row['train_s']:.0f}", f"{row['inference_s_per_case']:.1f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_table(robustness: dict[str, dict[str, Any]], regions: Sequence[str]) -> str:
    """Markdown: one row per modality subset, per model the Dice of each region (n/a: not predictable)."""
    models = list(robustness)
    subsets = [subset_name(s) for s in modality_subsets(load_task(TASK).modality_names)]
    header = ["modalities", *(f"{m} ({'/'.join(regions)})" for m in models)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in subsets:
        cells = [name]
        for model in models:
            row = robustness[model]["subsets"].get(name)
            cells.append("-" if row is None else " / ".join(_num(row["dice"][r]) for r in regions))
        lines.append("| " + " | ".join(cells) + " |")
    averages = [robustness[m].get("average") for m in models]
    if any(averages):  # the mean over the subsets of each subset's Dice (DeMoSeg/mmFormer protocol)
        cells = [" / ".join(_num(a[r]["estimate"]) for r in regions) if a else "-" for a in averages]
        lines.append("| **subset average** | " + " | ".join(cells) + " |")
    notes = []
    for model in models:
        reasons = [row["note"] for row in robustness[model]["subsets"].values() if row["note"]]
        if reasons:
            notes.append(
                f"- {model}: n/a on {len(reasons)} subsets, it cannot run on them (e.g. {reasons[-1]})"
            )
    return "\n".join(lines + ([""] + notes if notes else []))


def render_markdown(result: dict[str, Any]) -> str:
    """results.md: environment, settings, the main table, the robustness table and ShapeComposition's."""
    env, settings = result["environment"], result["settings"]
    regions = result["regions"]
    patch = settings["patch"]
    spacing = settings["target_spacing_mm"]
    resampled = "" if spacing is None else f", resampled to {spacing:g} mm for training and prediction"
    text = [
        f"# Accuracy at equal budget on the brain phantom ({settings['setting']} setting)",
        "",
        f"{hardware(env, settings['device'])}, torch {env['torch']}, "
        f"{env['torch_threads']} torch thread(s), device {settings['device']}; {env['date']}, "
        f"commit {env['git_commit']}. Status: {result['status']}, total {result['total_s']:.0f} s.",
        "",
        f"Same data and budget for every model: {settings['train_cases']} training phantoms (2 mm, "
        f"MNI152 anatomy{resampled}; fold 0 of a 5-fold split trains, no validation, last checkpoint), "
        f"{settings['iterations']} iterations of batch {settings['batch']} at {patch}^3, seed "
        f"{settings['seed']}, modality dropout {settings.get('modality_dropout', 0.0):g}; "
        f"{settings['test_cases']} held-out test phantoms predicted with "
        f"{settings['inference_patch']}^3 tiles and scored by `ciml evaluate` (BraTS conventions). "
        "Dice and HD95 are means over the test cases. FLOPs: one forward pass of one training patch "
        "(convolutions and matrix products). Train s includes "
        "preprocessing the training cases; inference s/case excludes loading the model.",
        "",
        main_table(result["models"], regions, patch),
    ]
    if result["robustness"]:
        text += [
            "",
            "## Missing modalities (`ciml robustness`)",
            "",
            f"Dice per region on the {settings['test_cases']} test case(s) for every subset of the "
            "modalities (absent channels zeroed, their segmentors skipped).",
            "",
            robustness_table(result["robustness"], regions),
        ]
    shapes = result.get("shapes")
    if shapes:
        text += ["", "## ShapeComposition", "", f"Source: {shapes['source']}."]
        if "methods" in shapes:
            text += ["", results_table(shapes)]
    return "\n".join(text) + "\n"


# -------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(env: dict[str, Any], device: str) -> str:
    """One line naming the machine: the GPU (on CUDA) and the CPU model with its count."""
    cpu = f"{env['cpu_model']} ({env['cpu_count']} CPUs)"
    return f"{env['hardware']} + {cpu}" if device == "cuda" else cpu


def environment(device: str) -> dict[str, Any]:
    """speed.py's record (hardware, torch, date, commit) plus the CPU model and the OS."""
    env = speed.environment(device)
    env.update(cpu_model=cpu_model(), cpu_count=os.cpu_count(), os=platform.platform())
    return env


# ---------------------------------------------------------------------------------------------- API


def run_benchmark(
    settings: Settings,
    models: Sequence[str],
    out: Path,
    work: Path,
    run_shapes: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every model into ``work``; (re)write ``out/results.json`` and ``results.md`` after each.

    Returns:
        The JSON-ready result.
    """
    started = time.perf_counter()
    spec = load_task(TASK)

    def elapsed() -> str:
        return f"[{time.perf_counter() - started:7.1f} s]"

    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "task": TASK,
        "status": "running",
        "environment": environment(settings.device),
        "settings": asdict(settings),
        "models_requested": list(models),
        "regions": list(spec.region_names),
        "models": [],
        "robustness": {},
        "shapes": None,
        "total_s": 0.0,
    }

    def save(status: str) -> None:
        result["status"] = status
        result["total_s"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out / "results.json", result)
        write_text_atomic(out / "results.md", render_markdown(result))

    log(f"{elapsed()} writing {settings.train_cases}+{settings.test_cases} brain phantoms into {work}")
    data = write_phantoms(work / "data", settings.demo_config(models[0]), progress=progress)
    check_phantoms(data, spec, log=log)
    result["shapes"] = shapes_table(settings, run_shapes, log)
    log(f"{elapsed()} shapes: {result['shapes']['source']}")
    for index, model in enumerate(models, start=1):
        widths = settings.demo_config(model).widths
        log(
            f"{elapsed()} {index}/{len(models)} {model} {widths}: training {settings.iterations} iterations "
            f"of {settings.batch}x4x{settings.patch}^3, predicting {settings.test_cases} case(s)"
            + (", robustness" if model in settings.robustness_models else "")
        )
        row, robustness = run_model(model, settings, data, work, progress)
        result["models"].append(asdict(row))
        if robustness is not None:
            result["robustness"][model] = robustness
        dice = ", ".join(f"{r} {_num(row.dice[r])}" for r in spec.region_names)
        log(
            f"{elapsed()} {index}/{len(models)} {model}: mean Dice {_num(row.mean_dice)} ({dice}); "
            f"train {row.train_s:.0f} s, inference {row.inference_s:.0f} s"
            + (f", robustness {row.robustness_s:.0f} s" if row.robustness_s is not None else "")
        )
        save(f"partial: {index} of {len(models)} models" if index < len(models) else "complete")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--setting",
        choices=("cpu", "gpu"),
        default="gpu" if torch.cuda.is_available() else "cpu",
        help="preset sizes (default: gpu when CUDA is available, else cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, widths and iterations: a smoke test")
    parser.add_argument(
        "--models",
        default=",".join(ALL_MODELS),
        help=f"comma-separated models (default: {','.join(ALL_MODELS)})",
    )
    parser.add_argument(
        "--robustness",
        default=None,
        help="comma-separated models that get the 15-subset table, or 'none' (default: of the trained "
        f"models, cpu: {','.join(PRESETS['cpu'].robustness_models)}; "
        f"gpu: {','.join(PRESETS['gpu'].robustness_models)})",
    )
    parser.add_argument("--shapes", action="store_true", help="rerun ShapeComposition instead of reading it")
    parser.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=None,
        metavar="P",
        help="train every model with modality dropout P (joint, segresnet: zero-filled; default 0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results/accuracy_<setting>/)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="phantoms, runs, predictions (default: a temporary folder)"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the default temporary --work folder")
    parser.add_argument("--overwrite", action="store_true", help="replace results.json/results.md in --out")
    parser.add_argument("--progress", action="store_true", help="progress bars of every step")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    """The preset with the command line's overrides, and the models to run."""
    settings = PRESETS["quick" if args.quick else args.setting]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.robustness is None:
        robustness = tuple(m for m in settings.robustness_models if m in models)
    elif args.robustness.strip() == "none":
        robustness = ()
    else:
        robustness = tuple(m.strip() for m in args.robustness.split(",") if m.strip())
        if missing := [m for m in robustness if m not in models]:
            raise CimlError(f"--robustness {','.join(missing)}: not among --models")
    overrides: dict[str, Any] = {"robustness_models": robustness}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.modality_dropout is not None:
        overrides["modality_dropout"] = args.modality_dropout
    return replace(settings, **overrides), models


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temporary: Path | None = None
    try:
        settings, models = settings_from_args(args)
        check_settings(settings, models)
        out = args.out or RESULTS_DIR / f"accuracy_{settings.setting}"
        existing = [str(out / name) for name in OUTPUT_NAMES if (out / name).exists()]
        if existing and not args.overwrite:  # fail before an hour of training, not after
            raise CimlError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
        if args.work is not None and args.work.exists() and any(args.work.iterdir()):
            raise CimlError(f"--work {args.work} is not empty; choose a new folder (nothing is deleted)")
        if settings.threads:
            torch.set_num_threads(settings.threads)
        work = args.work or (temporary := Path(tempfile.mkdtemp(prefix="ciml-accuracy-")))
        print(f"settings: {settings}\nmodels: {', '.join(models)}", flush=True)
        result = run_benchmark(
            settings, models, out, work, args.shapes, args.progress, lambda line: print(line, flush=True)
        )
    except CimlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if temporary is not None and not args.keep_work:
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary is not None:
            print(f"kept the work folder {temporary}")
    env = result["environment"]
    print(
        f"\n{hardware(env, settings.device)}, torch {env['torch']}, {env['torch_threads']} thread(s), "
        f"commit {env['git_commit']}; {result['total_s']:.0f} s in all; wrote {out}\n"
    )
    print(main_table(result["models"], result["regions"], settings.patch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
