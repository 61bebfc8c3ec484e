"""A converged, equal-budget accuracy study of CIML against its baselines on the brain phantom (issue 14).

Every model (ciml, ciml-beta0, ciml-nomsg, joint, ensemble, segresnet, and ``ciml-flops``: CIML with its
segmentor widths matched to the joint U-Net's forward FLOPs) trains on the same phantom training cases
(fold 0 of one 5-fold split, made with the data seed, so the same cases for every model and seed) with
the same iterations, patch, batch, augmentation, optimizer and learning rate (AdamW, lr 1e-2 with poly
decay: with the library's former 1e-3 no model converged in a CPU budget), once per training seed (the
seed sets the weights and the patch sampling; the phantoms are the same for every seed and model).

Convergence: each run validates ``validations`` times, evenly spaced, on the fold's validation cases
(whole cases, sliding window, as ``ciml train`` validates). A run has converged when its validation
mean Dice, smoothed by a trailing mean of ``PLATEAU_WINDOW`` validations, has plateaued: the last
``PLATEAU_TAIL`` of training raised the smoothed best by less than ``PLATEAU_GAIN``, and the last
smoothed value is within ``PLATEAU_DROP`` of the smoothed best (:func:`plateau`). The table marks a model
converged only when every seed has.

Scores: each run predicts the same held-out test phantoms (its last checkpoint, the run's
postprocessing), scored by the code ``ciml evaluate`` runs (BraTS conventions: Dice and HD95 per region
WT, TC, ET). Per model the table gives, per region and for the mean over regions, the mean +- std over
seeds of each seed's mean over the test cases; then paired bootstrap 95 % intervals of the Dice
difference CIML - ensemble, CIML - joint (and the equal-FLOPs CIML against both, and the ablations):
per test case the difference is averaged over the seeds both models ran, cases are drawn with
replacement (:func:`ciml.evaluation.robustness.resample_weights`, seeded) and the percentile interval of
the mean difference is reported. "wins" when the interval lies above 0, "loses" below, "ties" otherwise.

Missing modalities: ciml, the ensemble and the joint U-Net are trained again with modality dropout
(``--modality-dropout``, a share of batches hides a random proper subset; CIML and the ensemble skip the
hidden segmentors, the joint U-Net sees them zero-filled, the usual missing-modality baseline) on the
first ``robustness_seeds`` seed(s), and ``ciml robustness`` scores the test cases on all 15 modality
subsets. Last comes the ShapeComposition table: the committed
benchmarks/results/shapecomposition/results.json, or a fresh run with ``--shapes``.

Before training, a budget probe times a few training steps and one whole-case inference of every model
and prints the estimated wall time of the run (``--estimate``: only that). With ``--jobs N`` (the cpu
preset: 2, one per core) N runs train at once in worker processes of one torch thread each, handed out
longest first; each run's numbers are the same as in one process (the same seed, one thread).

    python benchmarks/accuracy.py --setting cpu    # 2 cores, 2 processes of 1 thread: 88 min (2026-12-07)
    python benchmarks/accuracy.py --setting gpu    # a lent H100/H200
    python benchmarks/accuracy.py --quick --out /tmp/accuracy   # smoke test, about a minute
    python benchmarks/accuracy.py --setting cpu --estimate      # the budget probe only (~3 minutes)
    python benchmarks/accuracy.py --setting cpu --models ciml,joint --seeds 0 --out /tmp/accuracy_two
    python benchmarks/accuracy.py --setting cpu --models ciml,joint,ensemble --seeds 0 \
        --out /tmp/accuracy_two --resume   # keeps the finished ciml and joint runs, trains the ensemble

Writes ``results.json`` (environment, settings, estimate, every run with its validation curve and
per-case scores, per-model rows, comparisons, robustness, shapes) and ``results.md`` to ``--out``
(default benchmarks/results/accuracy_<setting>/), atomically, refusing to replace them without
``--overwrite``; they are rewritten after every run, so a crash keeps the finished runs. Phantoms, runs
and predictions go to ``--work`` (default: a temporary folder, deleted at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import speed  # benchmarks/speed.py, beside this script: its environment record
from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import plan_preprocessing, preprocess_case
from ciml.devices import MEMORY_FORMATS
from ciml.errors import CimlError
from ciml.evaluation.evaluate import evaluate_folders
from ciml.evaluation.robustness import (
    RobustnessResult,
    evaluate_robustness,
    modality_subsets,
    percentile_interval,
    resample_weights,
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
from ciml.inferers import sliding_window_probabilities
from ciml.models import build_model
from ciml.models.registry import MODELS
from ciml.runs import RunFolder
from ciml.runs.log import LOG_FILE, read_log
from ciml.tasks import load_task
from ciml.training.engine import TrainSettings, make_splits, train
from ciml.training.loop import Batch, TrainConfig, Trainer
from ciml.training.planning import forward_flops, match_widths
from threads import cpu_model  # benchmarks/threads.py: one reader of the CPU's name

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
SHAPES_RESULTS = RESULTS_DIR / "shapecomposition" / "results.json"
EQUAL_FLOPS = "ciml-flops"  # CIML with segmentor widths matched to the joint U-Net's forward FLOPs
ALL_MODELS = ("ciml", "ciml-beta0", "ciml-nomsg", "joint", "ensemble", "segresnet", EQUAL_FLOPS)
ROBUSTNESS_DEFAULT = ("ciml", "ensemble", "joint")
#: (a, b): the table gives Dice(a) - Dice(b) with its paired bootstrap interval, when both ran.
COMPARISONS = (
    ("ciml", "ensemble"),
    ("ciml", "joint"),
    (EQUAL_FLOPS, "joint"),
    (EQUAL_FLOPS, "ensemble"),
    ("ciml", "ciml-nomsg"),
    ("ciml", "ciml-beta0"),
    ("ciml", "segresnet"),
)
OUTPUT_NAMES = ("results.json", "results.md")
METRICS = ("dice", "hd95")
FOLDS = 5
#: The plateau criterion (:func:`plateau`).
PLATEAU_WINDOW = 3
PLATEAU_GAIN = 0.01  # a smoothed rise of this much in the tail: still learning
PLATEAU_DROP = 0.02  # the last smoothed value this far below the best: falling (about the validation noise)
PLATEAU_TAIL = 0.3
#: Budget probe: seconds that are not network arithmetic, measured with the cpu preset on the 2-core
#: AMD EPYC box (a joint and a joint+dropout run of 300 iterations; see :func:`budget`): per training
#: run beyond its steps and validations (integrity check, preprocessing the cases, checkpoints,
#: postprocessing choice, progress plot: ~3 s), per predicted test case beyond its inference (loading,
#: resampling to 2 mm, writing, ``ciml evaluate``: ~0.25 s), per scored modality subset of a case
#: (~0.05 s), per written phantom (0.43 s).
RUN_OVERHEAD_S = 4.0
PREDICT_OVERHEAD_S = 0.3
SUBSET_OVERHEAD_S = 0.1
PHANTOM_S = 0.5
PROBE_STEPS = 3


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers; stored in the JSON next to them.

    ``widths`` serve every U-Net-based model (each CIML/ensemble segmentor has them; ``ciml-flops``
    gets the widths whose forward FLOPs match the joint U-Net's at ``widths``); SegResNet gets
    ``segresnet_widths`` (only the first width, its init filters, and the number of levels matter).
    ``validations`` evenly spaced validations on ``max_validation_cases`` of the fold's validation
    cases give each run's convergence curve. The robustness runs train with ``modality_dropout`` on the
    first ``robustness_seeds`` of ``seeds``.
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
    seeds: tuple[int, ...]
    robustness_models: tuple[str, ...]
    threads: int | None
    optimizer: str = "adamw"
    lr: float = 1e-2
    augment: str = "mirror"
    phantom_spacing_mm: float = 2.0  # the voxel size the phantoms are drawn at
    target_spacing_mm: float | None = None  # None: train and predict at the phantoms' own spacing
    validations: int = 10
    max_validation_cases: int = 2
    modality_dropout: float = 0.5
    robustness_seeds: int = 1
    data_seed: int = 0
    bootstrap_samples: int = 2000
    jobs: int = 1  # runs trained at once, each in its own process (wall time only: same numbers)
    memory_format: str = "auto"  # the layout runs train and predict in (auto: channels_last_3d on a CPU)
    note: str = ""

    @property
    def validate_every(self) -> int:
        return max(1, self.iterations // self.validations)

    def train_settings(
        self, variant: Variant, seed: int, train_dir: Path, run_dir: Path, progress: bool
    ) -> TrainSettings:
        """The training settings of one run: the brain demo's, with this study's recipe set explicitly."""
        config = BrainDemoConfig(
            train_cases=self.train_cases,
            test_cases=self.test_cases,
            iterations=self.iterations,
            patch_size=(self.patch,) * 3,
            widths=variant.widths,
            batch_size=self.batch,
            inference_patch=(self.inference_patch,) * 3,
            model=variant.model,
            seed=seed,
            device=self.device,
            augment=self.augment,
            spacing_mm=self.phantom_spacing_mm,
        )
        training = train_settings(
            config, train_dir, run_dir, progress, validation_cases=self.max_validation_cases
        )
        spacing = None if self.target_spacing_mm is None else (self.target_spacing_mm,) * 3
        return replace(
            training,
            optimizer=self.optimizer,
            lr=self.lr,
            augment=self.augment,
            seed=seed,
            folds=FOLDS,
            validate_every=self.validate_every,
            max_validation_cases=self.max_validation_cases,
            modality_dropout=variant.modality_dropout,
            target_spacing=spacing,
            memory_format=self.memory_format,
        )

    def inference(self) -> Any:
        """How every run predicts: its last checkpoint with ``inference_patch`` tiles."""
        settings = inference_settings(
            BrainDemoConfig(inference_patch=(self.inference_patch,) * 3, device=self.device)
        )
        return replace(settings, memory_format=self.memory_format)


PRESETS: dict[str, Settings] = {
    # Phantoms drawn at 3 mm (80x80x52; the tumour is drawn on that grid, so no resampled labels cap
    # ET Dice) and 24^3 patches: 72 mm of context per patch, more than 32^3 at 2 mm, at 0.42x the voxels.
    # On a 2-core AVX2 EPYC (1 torch thread) a step of 2x4x24^3 takes ciml 0.69 s, ciml-beta0 0.69,
    # ciml-nomsg 0.49, ensemble 0.45, ciml-flops 0.52, segresnet 0.17, joint 0.13, a whole case with
    # 48^3 tiles ~4-5 s. A pilot there (seed 0, 600 iterations) gave test mean Dice ciml 0.83, ensemble
    # 0.68, joint 0.64; the ensemble's curve was flat from iteration 300, ciml's and joint's still rose.
    # 600 iterations with 8 validations of 3 cases: 88 minutes in 2 worker processes (2026-12-07), and
    # only 1 of 21 runs plateaued (benchmarks/results/accuracy_cpu/results.md).
    "cpu": Settings(
        setting="cpu",
        device="cpu",
        train_cases=14,  # fold 0 of 5 keeps 3 cases for validation
        test_cases=10,
        iterations=600,
        patch=24,
        batch=2,
        widths=(8, 16, 32),
        segresnet_widths=(8, 16, 32),  # SegResNet's init filters 8 (MONAI's default), 3 levels
        inference_patch=48,
        seeds=(0, 1, 2),
        robustness_models=ROBUSTNESS_DEFAULT,
        threads=1,
        phantom_spacing_mm=3.0,
        validations=8,
        max_validation_cases=3,
        jobs=2,
        note="2 CPU cores: 2 worker processes, 1 torch thread each; budget: at most 90 minutes",
    ),
    # Not measured (no GPU was lent yet): the budget probe prints its estimate at the start.
    "gpu": Settings(
        setting="gpu",
        device="cuda",
        train_cases=24,
        test_cases=20,
        iterations=1000,
        patch=64,
        batch=2,
        widths=(16, 32, 64, 128),
        segresnet_widths=(16, 32, 64, 128),  # MONAI's BraTS tutorial SegResNet: init_filters 16
        inference_patch=96,  # one tile covers a cropped 2 mm case
        seeds=(0, 1, 2),
        robustness_models=ROBUSTNESS_DEFAULT,
        threads=None,
        max_validation_cases=4,
        note="one H100/H200, bf16 autocast",
    ),
    "quick": Settings(
        setting="quick",
        device="cpu",
        train_cases=3,
        test_cases=2,
        iterations=4,
        patch=16,
        batch=1,
        widths=(4, 8),
        segresnet_widths=(4, 8),
        inference_patch=32,
        seeds=(0,),
        robustness_models=("ciml",),  # each 15-subset table adds ~25 s to the smoke test
        threads=1,
        phantom_spacing_mm=3.0,  # 3.4x fewer voxels to write and score than at 2 mm
        target_spacing_mm=4.0,  # fewer voxels still to train on and predict
        validations=2,
        max_validation_cases=1,
        bootstrap_samples=200,
        note="smoke test (--quick): numbers mean nothing",
    ),
}

#: ShapeComposition for ``--quick --shapes``: seconds, not minutes.
QUICK_SHAPES = ShapeExperimentConfig(
    size=(32, 32), widths=(4, 8), batch_size=2, iterations=3, validation_samples=4
)


@dataclass(frozen=True)
class Variant:
    """One row of the study: a registry model at some widths, trained with some modality dropout."""

    key: str
    model: str
    widths: tuple[int, ...]
    label: str
    modality_dropout: float = 0.0


@functools.lru_cache(maxsize=8)
def _equal_flops_widths(widths: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    edge = 2 ** len(widths)
    return match_widths(load_task(TASK), widths, (1, 4, edge, edge, edge), "ciml")


def equal_flops_widths(widths: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """CIML widths whose forward FLOPs match the joint U-Net's at ``widths``, and both FLOPs (one
    4-channel patch of the smallest edge every level takes; the ratio is the same at any patch).
    Cached: the search counts several networks' FLOPs on the meta device, seconds each."""
    return _equal_flops_widths(tuple(widths))


def study_variants(settings: Settings, keys: Sequence[str]) -> list[Variant]:
    """The main table's rows, in the order of ``keys``."""
    variants = []
    for key in keys:
        if key == EQUAL_FLOPS:
            variants.append(
                Variant(key, "ciml", equal_flops_widths(settings.widths)[0], "ciml (equal FLOPs)")
            )
        else:
            widths = settings.segresnet_widths if key == "segresnet" else settings.widths
            variants.append(Variant(key, key, tuple(widths), key))
    return variants


def robustness_variants(settings: Settings) -> list[Variant]:
    """The models trained with modality dropout for the 15-subset table."""
    p = settings.modality_dropout
    return [
        Variant(
            f"{model}+dropout",
            model,
            tuple(settings.segresnet_widths if model == "segresnet" else settings.widths),
            f"{model} (modality dropout {p:g}{', zero-filled' if model in ('joint', 'segresnet') else ''})",
            p,
        )
        for model in settings.robustness_models
    ]


def check_settings(settings: Settings, models: Sequence[str]) -> None:
    """Fail before any work on settings no model can run.

    Raises:
        CimlError: unknown model, CUDA missing, a patch not divisible by a model's downsampling, ...
    """
    unknown = [m for m in models if m not in (*MODELS, EQUAL_FLOPS)]
    unknown += [m for m in settings.robustness_models if m not in MODELS]
    if unknown:
        raise CimlError(
            f"unknown model(s) {', '.join(unknown)}; choose from {', '.join((*MODELS, EQUAL_FLOPS))}"
        )
    if not models:
        raise CimlError("--models: name at least one model")
    if len(set(models)) != len(models):
        raise CimlError("--models: a model is named twice")
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise CimlError("--seeds: give one or more distinct integers")
    if settings.robustness_models and not 0.0 < settings.modality_dropout < 1.0:
        raise CimlError(f"--modality-dropout must be in (0, 1), got {settings.modality_dropout}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise CimlError("--setting gpu needs CUDA, which is not available here (use --setting cpu)")
    if settings.train_cases < 2 or settings.test_cases < 1:
        raise CimlError("need at least 2 training cases (the run splits them) and 1 test case")
    if settings.iterations < 1 or settings.validations < 1:
        raise CimlError("need at least one iteration and one validation")
    if settings.jobs < 1:
        raise CimlError(f"--jobs must be at least 1, got {settings.jobs}")
    if settings.jobs > 1 and settings.device == "cuda":
        raise CimlError("--jobs > 1 shares one GPU between runs and distorts their timings; use --jobs 1")
    for widths in {settings.widths, settings.segresnet_widths}:
        divisor = 2 ** (len(widths) - 1)
        for name, size in (("patch", settings.patch), ("inference patch", settings.inference_patch)):
            if size < divisor or size % divisor:
                raise CimlError(f"{name} {size} must be a positive multiple of {divisor} for widths {widths}")


# ------------------------------------------------------------------------------------ convergence


def plateau(
    iterations: Sequence[int],
    scores: Sequence[float],
    total: int,
    window: int = PLATEAU_WINDOW,
    gain_tolerance: float = PLATEAU_GAIN,
    drop_tolerance: float = PLATEAU_DROP,
    tail: float = PLATEAU_TAIL,
) -> dict[str, Any]:
    """Whether a validation curve has plateaued, with the numbers behind the answer.

    The curve is smoothed first by a trailing mean of ``window`` validations: a validation of 2-3 cases is
    noisy (one case moving by 0.05 moves a 3-case mean by 0.017), and a flat curve with one low point is
    flat. Converged: the smoothed values in the last ``tail`` of the ``total`` iterations raised the
    smoothed best by less than ``gain_tolerance`` (still rising otherwise), and the last smoothed value is
    within ``drop_tolerance`` of the smoothed best (falling otherwise). NaN scores count as 0.
    """
    values = [0.0 if (s is None or math.isnan(s)) else float(s) for s in scores]
    result: dict[str, Any] = {"converged": False, "best": None, "last_mean": None, "tail_gain": None}
    if len(values) < window + 1:
        result["reason"] = f"{len(values)} validation(s): the criterion needs at least {window + 1}"
        return result
    smoothed = [
        (iterations[k], sum(values[k - window + 1 : k + 1]) / window) for k in range(window - 1, len(values))
    ]
    best = max(v for _, v in smoothed)
    last_mean = smoothed[-1][1]
    cutoff = (1.0 - tail) * total
    before = [v for i, v in smoothed if i <= cutoff]
    if not before:
        result.update(
            best=best, last_mean=last_mean, reason=f"no smoothed validation before iteration {cutoff:g}"
        )
        return result
    gain = best - max(before)
    drop = best - last_mean
    reasons = []
    if gain >= gain_tolerance:
        reasons.append(f"the last {tail:.0%} of training raised the best {window}-mean by {gain:.3f}")
    if drop > drop_tolerance:
        reasons.append(f"the last {window}-mean is {drop:.3f} below the best")
    result.update(
        converged=not reasons,
        best=best,
        last_mean=last_mean,
        tail_gain=gain,
        reason="; ".join(reasons) or "plateaued",
    )
    return result


def validation_curve(log: Sequence[dict[str, Any]], regions: Sequence[str]) -> list[dict[str, Any]]:
    """The validations of a run log: iteration, mean Dice and Dice per region."""
    return [
        {
            "iteration": int(r["iteration"]),
            "mean": r["val/dice/mean"],
            "dice": {region: r.get(f"val/dice/{region}") for region in regions},
        }
        for r in log
        if "val/dice/mean" in r and "iteration" in r
    ]


# ------------------------------------------------------------------------------------- statistics


def case_scores(run: dict[str, Any], key: str) -> dict[str, float]:
    """case -> Dice of ``key`` (a region, or ``mean``: the mean over regions, NaN if any region is)."""
    scores = {}
    for case, regions in run["cases"].items():
        values = [_float(v["dice"]) for v in regions.values()]
        scores[case] = float(np.mean(values)) if key == "mean" else _float(regions[key]["dice"])
    return scores


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def verdict(low: float, high: float) -> str:
    """ "wins" when the interval lies above 0, "loses" below, "ties" otherwise (or n/a)."""
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    return "wins" if low > 0 else "loses" if high < 0 else "ties"


def paired_difference(
    runs_a: Sequence[dict[str, Any]],
    runs_b: Sequence[dict[str, Any]],
    keys: Sequence[str],
    samples: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Dice(a) - Dice(b) with a paired bootstrap 95 % interval, per key (region or ``mean``).

    Pairs by seed and by case: per test case the difference is averaged over the seeds both ran
    (a case whose Dice is undefined for either model is left out), then cases are resampled with
    replacement (``samples`` seeded draws) and the mean over cases is recomputed on each draw.
    """
    by_seed_a = {run["seed"]: run for run in runs_a}
    by_seed_b = {run["seed"]: run for run in runs_b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    result: dict[str, Any] = {"seeds": seeds, "samples": samples, "bootstrap_seed": seed, "keys": {}}
    for key in keys:
        if not seeds:
            result["keys"][key] = {"estimate": math.nan, "low": math.nan, "high": math.nan, "cases": 0}
            continue
        a = [case_scores(by_seed_a[s], key) for s in seeds]
        b = [case_scores(by_seed_b[s], key) for s in seeds]
        cases = sorted(set.intersection(*(set(x) for x in a + b)))
        differences = np.array([[a[i][c] - b[i][c] for c in cases] for i in range(len(seeds))])
        per_case = differences.mean(axis=0) if cases else np.zeros(0)
        per_case = per_case[~np.isnan(per_case)]
        if per_case.size == 0:
            result["keys"][key] = {"estimate": math.nan, "low": math.nan, "high": math.nan, "cases": 0}
            continue
        weights = resample_weights(per_case.size, samples, seed)
        means = weights @ per_case / weights.sum(axis=1)
        interval = percentile_interval(float(means[0]), means[1:])
        result["keys"][key] = {
            "estimate": interval.estimate,
            "low": interval.low,
            "high": interval.high,
            "cases": int(per_case.size),
            "verdict": verdict(interval.low, interval.high),
        }
    return result


def summarize_runs(
    variant: dict[str, Any], runs: Sequence[dict[str, Any]], regions: Sequence[str]
) -> dict[str, Any]:
    """One model's table row: mean +- std over seeds of each seed's mean test Dice, and convergence.

    ``std`` is the sample standard deviation over seeds (0 for one seed).
    """
    keys = [*regions, "mean"]
    dice = {k: [run["dice"][k] for run in runs] for k in keys}
    hd95 = {r: [run["hd95"][r] for run in runs] for r in regions}

    def spread(values: Sequence[float]) -> tuple[float, float]:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    converged = sum(bool(run["plateau"]["converged"]) for run in runs)
    return {
        **variant,
        "seeds": [run["seed"] for run in runs],
        "dice": {k: spread(v)[0] for k, v in dice.items()},
        "dice_std": {k: spread(v)[1] for k, v in dice.items()},
        "hd95": {r: spread(v)[0] for r, v in hd95.items()},
        "hd95_std": {r: spread(v)[1] for r, v in hd95.items()},
        "converged": bool(runs) and converged == len(runs),
        "converged_seeds": converged,
        "train_s": statistics.fmean(run["train_s"] for run in runs),
        "inference_s_per_case": statistics.fmean(run["inference_s_per_case"] for run in runs),
    }


def study_tables(result: dict[str, Any]) -> None:
    """Recompute ``models`` and ``comparisons`` of ``result`` from its ``runs`` (in place)."""
    regions = result["regions"]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        by_key.setdefault(run["key"], []).append(run)
    result["models"] = [
        summarize_runs(variant, by_key[variant["key"]], regions)
        for variant in result["variants"]
        if variant["key"] in by_key
    ]
    samples = result["settings"]["bootstrap_samples"]
    result["comparisons"] = [
        {
            "a": a,
            "b": b,
            "converged": all(run["plateau"]["converged"] for run in by_key[a] + by_key[b]),
            **paired_difference(by_key[a], by_key[b], [*regions, "mean"], samples),
        }
        for a, b in COMPARISONS
        if a in by_key and b in by_key
    ]


# ---------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Timing:
    """Measured seconds of one training step and of the sliding-window inference of one whole case."""

    step_s: float
    case_s: float


def probe_timing(variant: Variant, settings: Settings, case_shape: Sequence[int], steps: int) -> Timing:
    """Time ``steps`` training steps (after one warm-up) and one whole-case inference of ``variant``."""
    spec = load_task(TASK)
    torch.manual_seed(0)
    model = build_model(
        variant.model, spec, widths=variant.widths, zero_fill_missing=variant.modality_dropout > 0
    )
    config = TrainConfig(
        iterations=steps + 1,
        optimizer=settings.optimizer,
        lr=settings.lr,
        region_names=list(spec.region_names),
        device=settings.device,
        memory_format=settings.memory_format,
    )
    patch = (settings.batch, len(spec.modality_names), *(settings.patch,) * 3)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(patch, generator=generator)
    target = (
        torch.rand((settings.batch, len(spec.region_names), *patch[2:]), generator=generator) > 0.9
    ).float()
    batch = Batch(image, target)
    trainer = Trainer(model, config, lambda _: batch)
    trainer.step(batch)
    _synchronize(settings.device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    _synchronize(settings.device)
    step_s = (time.perf_counter() - started) / steps
    model.eval()
    volume = torch.randn((1, len(spec.modality_names), *case_shape), generator=generator)
    tile = (settings.inference_patch,) * 3
    sliding_window_probabilities(model, volume, spec.region_names, tile, device=trainer.device)  # warm-up
    _synchronize(settings.device)
    started = time.perf_counter()
    sliding_window_probabilities(model, volume, spec.region_names, tile, device=trainer.device)
    _synchronize(settings.device)
    return Timing(step_s, time.perf_counter() - started)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def budget(
    settings: Settings,
    main: Sequence[Variant],
    robust: Sequence[Variant],
    timings: dict[str, Timing],
    validation_cases: int,
) -> dict[str, Any]:
    """Estimated seconds of a run, from per-model timings (keyed by variant key) and the overheads.

    Per run: iterations x step + validations x validation cases x case inference + ``RUN_OVERHEAD_S``;
    per main run the test cases x (case inference + ``PREDICT_OVERHEAD_S``); per robustness run
    15 subsets x test cases x (case inference + ``SUBSET_OVERHEAD_S``) (an upper bound: a subset skips
    segmentors); once the phantoms. Validations are ``iterations // validate_every`` per run.
    """
    seeds = len(settings.seeds)
    validations = settings.iterations // settings.validate_every
    subsets = len(modality_subsets(load_task(TASK).modality_names))
    rows = {}
    for variant, runs, robustness in [(v, seeds, False) for v in main] + [
        (v, min(settings.robustness_seeds, seeds), True) for v in robust
    ]:
        timing = timings[variant.key]
        parts = {
            "train": runs * settings.iterations * timing.step_s,
            "validation": runs * validations * validation_cases * timing.case_s,
            "overhead": runs * RUN_OVERHEAD_S,
            "prediction": 0.0
            if robustness
            else runs * settings.test_cases * (timing.case_s + PREDICT_OVERHEAD_S),
            "robustness": runs * subsets * settings.test_cases * (timing.case_s + SUBSET_OVERHEAD_S)
            if robustness
            else 0.0,
        }
        rows[variant.key] = {
            "runs": runs,
            "step_s": timing.step_s,
            "case_s": timing.case_s,
            **{k: round(v, 1) for k, v in parts.items()},
            "total": round(sum(parts.values()), 1),
        }
    phantoms = (settings.train_cases + settings.test_cases) * PHANTOM_S
    total = phantoms + sum(row["total"] for row in rows.values())
    runs = [row["total"] / row["runs"] for row in rows.values() for _ in range(row["runs"])]
    return {
        "models": rows,
        "phantoms": round(phantoms, 1),
        "total_s": round(total, 1),
        "jobs": settings.jobs,
        "wall_s": round(phantoms + makespan(runs, settings.jobs), 1),
    }


def makespan(seconds: Sequence[float], workers: int) -> float:
    """Wall time of runs handed, longest first, each to the worker that frees up first."""
    free = [0.0] * max(1, workers)
    for duration in sorted(seconds, reverse=True):
        free[free.index(min(free))] += duration
    return max(free)


def longest_first(jobs: Sequence[Job], estimate: dict[str, Any]) -> list[Job]:
    """``jobs`` by estimated duration, longest first (what :func:`makespan` assumes)."""
    rows = estimate["models"]
    return sorted(jobs, key=lambda job: -rows[job.variant.key]["total"] / rows[job.variant.key]["runs"])


def budget_lines(estimate: dict[str, Any]) -> list[str]:
    """The estimate as printable lines, one per model and a total."""
    lines = []
    for key, row in estimate["models"].items():
        lines.append(
            f"  {key:18s} {row['step_s']:.3f} s/step, {row['case_s']:.2f} s/case: {row['runs']} run(s), "
            f"train {row['train']:.0f} s + validation {row['validation']:.0f} s + prediction "
            f"{row['prediction']:.0f} s + robustness {row['robustness']:.0f} s + overhead "
            f"{row['overhead']:.0f} s = {row['total'] / 60:.1f} min"
        )
    load = estimate.get("load_average")
    busy = "" if load is None else f"; load average {load:g} on {os.cpu_count()} CPUs while timing"
    jobs = estimate.get("jobs", 1)
    parallel = f", {estimate['wall_s'] / 60:.1f} min wall in {jobs} worker processes" if jobs > 1 else ""
    lines.append(
        f"  estimated total {estimate['total_s'] / 60:.1f} min{parallel} (incl. "
        f"{estimate['phantoms']:.0f} s of phantoms; timing the probe took "
        f"{estimate.get('probe_s', 0):.0f} s{busy})"
    )
    return lines


def estimate_run(
    settings: Settings,
    main: Sequence[Variant],
    robust: Sequence[Variant],
    test_case: Any,
    validation_cases: int,
) -> dict[str, Any]:
    """Time every model on the shape of ``test_case`` preprocessed as the runs will, and :func:`budget`."""
    started = time.perf_counter()
    spec = load_task(TASK)
    spacing = None if settings.target_spacing_mm is None else (settings.target_spacing_mm,) * 3
    plan = plan_preprocessing([test_case], spec, spacing)
    shape = tuple(np.asarray(preprocess_case(replace(test_case, label=None), spec, plan).image).shape[1:])
    steps = 1 if settings.setting == "quick" else PROBE_STEPS
    measured: dict[tuple[str, tuple[int, ...], bool], Timing] = {}
    timings = {}
    for variant in [*main, *robust]:
        identity = (variant.model, variant.widths, variant.modality_dropout > 0)
        if identity not in measured:
            measured[identity] = probe_timing(variant, settings, shape, steps)
        timings[variant.key] = measured[identity]
    estimate = budget(settings, main, robust, timings, validation_cases)
    estimate["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    estimate.update(
        case_shape=list(shape), probe_steps=steps, probe_s=round(time.perf_counter() - started, 1)
    )
    return estimate


# ------------------------------------------------------------------------------------------- runs


def cost(model: str, widths: Sequence[int], patch: int) -> tuple[int, float]:
    """Parameters and forward GFLOPs of one 1x4xpatch^3 input, counted on the meta device."""
    spec = load_task(TASK)

    def build() -> torch.nn.Module:
        return build_model(model, spec, widths=widths)

    with torch.device("meta"):
        params = sum(p.numel() for p in build().parameters())
    flops = forward_flops(build, (1, len(spec.modality_names), patch, patch, patch))
    return params, flops / 1e9


def robustness_summary(result: RobustnessResult, seconds: float) -> dict[str, Any]:
    """A robustness result without its per-case metrics (those stay in the work folder)."""
    data = result.to_dict()
    for subset in data["subsets"].values():
        subset.pop("cases", None)
    data["seconds"] = round(seconds, 1)
    return data


def train_run(
    variant: Variant,
    seed: int,
    settings: Settings,
    train_dir: Path,
    splits: list[dict[str, list[str]]],
    run_dir: Path,
    progress: bool,
) -> tuple[RunFolder, dict[str, Any]]:
    """Train one (model, seed) on the study's split; the run folder and its record (curve, plateau)."""
    spec = load_task(TASK)
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.splits_path, splits)  # the same cases for every seed (the run would use its seed)
    started = time.perf_counter()
    run = train(settings.train_settings(variant, seed, train_dir, run_dir, progress))
    train_s = time.perf_counter() - started
    curve = validation_curve(read_log(run.fold_dir(0) / LOG_FILE), spec.region_names)
    record = {
        "key": variant.key,
        "seed": seed,
        "train_s": round(train_s, 1),
        "curve": curve,
        "plateau": plateau([c["iteration"] for c in curve], [c["mean"] for c in curve], settings.iterations),
    }
    return run, record


def score_run(
    run: RunFolder, record: dict[str, Any], settings: Settings, test_dir: Path, work: Path, progress: bool
) -> None:
    """Predict and score the test cases with ``run``; fills ``record`` (Dice, HD95, per case)."""
    spec = load_task(TASK)
    name = f"{record['key']}_seed{record['seed']}"
    predictions = work / "predictions" / name
    started = time.perf_counter()
    cases = predict_folder(run, test_dir, predictions, settings=settings.inference(), progress=progress)
    inference_s = time.perf_counter() - started
    evaluation = evaluate_folders(predictions, test_dir, spec)
    evaluation.write(work / "metrics" / f"{name}.json", work / "metrics" / f"{name}.csv")
    regions = evaluation.summary["regions"]
    record["dice"] = {r: regions[r]["dice"]["mean"] for r in spec.region_names}
    record["dice"]["mean"] = float(np.mean([record["dice"][r] for r in spec.region_names]))
    record["hd95"] = {r: regions[r]["hd95"]["mean"] for r in spec.region_names}
    record["inference_s"] = round(inference_s, 1)
    record["inference_s_per_case"] = round(sum(c.seconds for c in cases) / max(1, len(cases)), 2)
    record["cases"] = {
        case: {r: {m: values[r][m] for m in METRICS} for r in spec.region_names}
        for case, values in evaluation.cases.items()
    }


@dataclass(frozen=True)
class Job:
    """One training run of the study: the ``index``-th of ``total``."""

    index: int
    total: int
    variant: Variant
    seed: int
    robustness: bool


def run_job(
    job: Job,
    settings: Settings,
    train_dir: Path,
    test_dir: Path,
    splits: list[dict[str, list[str]]],
    work: Path,
    progress: bool,
    started_wall: float,
    log: Callable[[str], None] | None = None,
) -> tuple[Job, dict[str, Any], dict[str, Any] | None, str]:
    """Train ``job`` and score it (test cases, or the 15 subsets); a worker process's whole task.

    Returns the job, its run record, its robustness summary (robustness runs only) and the line that
    reports it. ``log`` (in-process runs) or stdout (workers) gets the line that starts it.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    variant, seed = job.variant, job.seed
    tag = f"{job.index}/{job.total} {variant.key} seed {seed}"
    line = (
        f"[{time.time() - started_wall:7.1f} s] {tag} {variant.widths}: training {settings.iterations} "
        f"iterations of {settings.batch}x4x{settings.patch}^3"
        + (", 15-subset table" if job.robustness else f", predicting {settings.test_cases} case(s)")
    )
    (log or (lambda text: print(text, flush=True)))(line)
    run_dir = work / "runs" / f"{variant.key}_seed{seed}"
    run, record = train_run(variant, seed, settings, train_dir, splits, run_dir, progress)
    plateaued = record["plateau"]
    verdict_text = "converged" if plateaued["converged"] else f"not converged ({plateaued['reason']})"
    if not job.robustness:
        score_run(run, record, settings, test_dir, work, progress)
        dice = ", ".join(f"{r} {_num(record['dice'][r])}" for r in load_task(TASK).region_names)
        report = (
            f"{tag}: {verdict_text}; mean Dice {_num(record['dice']['mean'])} ({dice}); "
            f"train {record['train_s']:.0f} s, inference {record['inference_s']:.0f} s"
        )
        return job, record, None, report
    began = time.perf_counter()
    scores = evaluate_robustness(
        run, test_dir, settings=settings.inference(), samples=settings.bootstrap_samples, progress=progress
    )
    seconds = time.perf_counter() - began
    scores.write(work / "robustness" / variant.key)
    summary = robustness_summary(scores, seconds)
    average = summary["average"]["mean"]["estimate"]
    report = (
        f"{tag}: {verdict_text}; subset-average mean Dice {_num(average)}; "
        f"train {record['train_s']:.0f} s, robustness {seconds:.0f} s"
    )
    return job, record, summary, report


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


def _signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def _mean_std(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if seeds < 2 else f"{mean:.3f} ± {_num(std)}"


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_head(header: Sequence[str]) -> list[str]:
    """A markdown table's header and separator lines."""
    return [_table_row(header), "|" + "---|" * len(header)]


def main_table(rows: Sequence[dict[str, Any]], regions: Sequence[str], patch: int) -> str:
    """Markdown: Dice (mean ± std over seeds) per region and mean, HD95, convergence and costs per model."""
    header = (
        ["model", "widths", "params", f"GFLOP fwd 1x4x{patch}^3", "seeds"]
        + [f"Dice {r}" for r in regions]
        + ["mean Dice"]
        + [f"HD95 {r} (mm)" for r in regions]
        + ["converged", "train s/seed", "inference s/case"]
    )
    lines = _table_head(header)
    for row in rows:
        seeds = len(row["seeds"])
        converged = f"{'yes' if row['converged'] else 'no'} ({row['converged_seeds']}/{seeds})"
        cells = (
            [
                row["label"],
                "/".join(map(str, row["widths"])),
                f"{row['params']:,}",
                f"{row['fwd_gflops']:.3f}",
            ]
            + [str(seeds)]
            + [_mean_std(row["dice"][r], row["dice_std"][r], seeds) for r in regions]
            + [f"**{_mean_std(row['dice']['mean'], row['dice_std']['mean'], seeds)}**"]
            + [_num(row["hd95"][r], 1) for r in regions]
            + [converged, f"{row['train_s']:.0f}", f"{row['inference_s_per_case']:.2f}"]
        )
        lines.append(_table_row(cells))
    return "\n".join(lines)


def comparison_table(
    comparisons: Sequence[dict[str, Any]], labels: dict[str, str], regions: Sequence[str]
) -> str:
    """Markdown: per pair the Dice difference with its 95 % interval and verdict, per region and mean."""
    keys = [*regions, "mean"]
    header = [
        "difference",
        "seeds",
        "cases",
        *(f"Δ Dice {k}" for k in keys),
        "verdict (mean Dice)",
        "both converged",
    ]
    lines = _table_head(header)
    for comparison in comparisons:
        cells = [f"{labels[comparison['a']]} - {labels[comparison['b']]}", str(len(comparison["seeds"]))]
        cells.append(str(comparison["keys"]["mean"]["cases"]))
        for key in keys:
            value = comparison["keys"][key]
            cells.append(
                f"{_signed(value['estimate'])} [{_signed(value['low'])}, {_signed(value['high'])}] "
                f"{value.get('verdict', 'n/a')}"
            )
        cells.append(f"**{comparison['keys']['mean'].get('verdict', 'n/a')}**")
        cells.append("yes" if comparison.get("converged") else "no")
        lines.append(_table_row(cells))
    return "\n".join(lines)


def convergence_table(runs: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    """Markdown: per run its validation mean-Dice curve, best, last-window mean, tail gain and verdict."""
    header = [
        "model",
        "seed",
        "validation mean Dice (iteration: value)",
        f"best {PLATEAU_WINDOW}-mean",
        f"last {PLATEAU_WINDOW}-mean",
        "tail gain",
        "converged",
    ]
    lines = _table_head(header)
    for run in runs:
        curve = ", ".join(f"{c['iteration']}: {_num(c['mean'], 2)}" for c in run["curve"])
        p = run["plateau"]
        cells = [
            labels.get(run["key"], run["key"]),
            str(run["seed"]),
            curve or "-",
            _num(p["best"]),
            _num(p["last_mean"]),
            _num(p["tail_gain"]),
            ("yes" if p["converged"] else f"no: {p['reason']}"),
        ]
        lines.append(_table_row(cells))
    return "\n".join(lines)


def robustness_table(
    robustness: dict[str, dict[str, Any]], labels: dict[str, str], regions: Sequence[str]
) -> str:
    """Markdown: one row per modality subset, per model the Dice of each region (n/a: not predictable)."""
    models = list(robustness)
    subsets = [subset_name(s) for s in modality_subsets(load_task(TASK).modality_names)]
    header = ["modalities", *(f"{labels.get(m, m)} ({'/'.join(regions)})" for m in models)]
    lines = _table_head(header)
    for name in subsets:
        cells = [name]
        for model in models:
            row = robustness[model]["subsets"].get(name)
            cells.append("-" if row is None else " / ".join(_num(row["dice"][r]) for r in regions))
        lines.append(_table_row(cells))
    averages = [robustness[m].get("average") for m in models]
    if any(averages):  # the mean over the subsets of each subset's Dice (DeMoSeg/mmFormer protocol)
        cells = [" / ".join(_num(a[r]["estimate"]) for r in regions) if a else "-" for a in averages]
        lines.append("| **subset average** | " + " | ".join(cells) + " |")
        cells = [
            f"{_num(a['mean']['estimate'])} [{_num(a['mean']['low'])}, {_num(a['mean']['high'])}]"
            if a
            else "-"
            for a in averages
        ]
        lines.append("| **subset average, mean Dice [95 % CI]** | " + " | ".join(cells) + " |")
    notes = []
    for model in models:
        reasons = [row["note"] for row in robustness[model]["subsets"].values() if row["note"]]
        if reasons:
            notes.append(
                f"- {labels.get(model, model)}: n/a on {len(reasons)} subsets, it cannot run on them "
                f"(e.g. {reasons[-1]})"
            )
    return "\n".join(lines + ([""] + notes if notes else []))


def render_markdown(result: dict[str, Any]) -> str:
    """results.md: environment, settings, the tables (main, differences, convergence, robustness, shapes)."""
    env, settings = result["environment"], result["settings"]
    regions = result["regions"]
    patch = settings["patch"]
    spacing = settings["target_spacing_mm"]
    resampled = "" if spacing is None else f", resampled to {spacing:g} mm for training and prediction"
    labels = {v["key"]: v["label"] for v in result["variants"] + result["robustness_variants"]}
    estimate = result.get("estimate") or {}
    resumed = "".join(
        f" Kept from an earlier invocation ({entry['date']}, commit {entry['git_commit']}, "
        f"{(entry['total_s'] or 0) / 60:.1f} min): {', '.join(entry['runs'])}."
        for entry in result.get("resumed_from", [])
    )
    estimated = ""
    if estimate.get("jobs", 1) > 1:
        estimated = (
            f" (estimated {estimate['wall_s'] / 60:.0f} min in {estimate['jobs']} worker processes, "
            f"{estimate['total_s'] / 60:.0f} min of runs)"
        )
    elif "total_s" in estimate:
        estimated = f" (estimated {estimate['total_s'] / 60:.0f} min)"
    seeds = ", ".join(map(str, settings["seeds"]))
    text = [
        f"# Accuracy at equal budget on the brain phantom ({settings['setting']} setting)",
        "",
        f"{hardware(env, settings['device'])}, torch {env['torch']}, "
        f"{env['torch_threads']} torch thread(s), device {settings['device']}; {env['date']}, "
        f"commit {env['git_commit']}. Status: {result['status']}, total {result['total_s'] / 60:.1f} min"
        f"{estimated}.{resumed}",
        "",
        f"Same data and budget for every model and seed: {settings['train_cases']} training phantoms "
        f"({settings.get('phantom_spacing_mm', 2.0):g} mm, MNI152 anatomy{resampled}; fold 0 of one "
        "5-fold split, made with data seed "
        f"{settings['data_seed']}, trains, and up to {settings['max_validation_cases']} of its validation "
        f"cases validate every {settings['validate_every']} iterations), {settings['iterations']} "
        f"iterations of batch {settings['batch']} at {patch}^3, {settings['optimizer']} lr "
        f"{settings['lr']:g} with poly decay, augmentation `{settings['augment']}`, training seeds {seeds}; "
        f"{settings['test_cases']} held-out test phantoms predicted by the last checkpoint with "
        f"{settings['inference_patch']}^3 tiles and the run's postprocessing, scored by `ciml evaluate` "
        "(BraTS conventions). Dice: mean ± sample std over the seeds of each seed's mean over the test "
        "cases; HD95: mean over seeds of the mean over cases. FLOPs: one forward pass of one training patch "
        "(convolutions and matrix products). Train s includes the validations and preprocessing the "
        "training cases; inference s/case excludes loading the model.",
        "",
        f"Converged: the run's validation mean Dice, smoothed by a trailing mean of {PLATEAU_WINDOW} "
        f"validations, plateaued — the last {PLATEAU_TAIL:.0%} of the iterations raised the smoothed best "
        f"by less than {PLATEAU_GAIN:g}, and the last smoothed value is within {PLATEAU_DROP:g} of the "
        f'smoothed best; "yes" only when every seed did.',
        "",
        main_table(result["models"], regions, patch),
    ]
    if result["comparisons"]:
        samples = settings["bootstrap_samples"]
        text += [
            "",
            "## Differences (paired bootstrap)",
            "",
            "Δ Dice = Dice(first) - Dice(second) [95 % interval]: per test case the difference is averaged "
            f"over the seeds both models ran, then the cases are resampled with replacement ({samples} "
            "seeded draws, percentile interval). It covers the choice of test cases for these seeds; the "
            "seed-to-seed spread is the ± of the table above. **wins**: the interval lies above 0; "
            "**loses**: below 0; **ties**: it contains 0.",
            "",
            comparison_table(result["comparisons"], labels, regions),
        ]
    if result["runs"]:
        text += [
            "",
            "## Convergence",
            "",
            "Validation mean Dice of every run (whole validation cases, sliding window).",
            "",
            convergence_table(result["runs"], labels),
        ]
    if result["robustness"]:
        seeds_used = ", ".join(map(str, settings["seeds"][: settings["robustness_seeds"]]))
        text += [
            "",
            "## Missing modalities (`ciml robustness`)",
            "",
            f"Models trained again with modality dropout {settings['modality_dropout']:g} (a batch hides a "
            "random proper subset of the modalities with that probability: CIML and the ensemble skip the "
            "hidden segmentors, the joint U-Net sees them zero-filled), training seed(s) "
            f"{seeds_used} only (the budget), otherwise as above. Dice per region on the "
            f"{settings['test_cases']} test cases for every subset of the modalities (absent channels "
            "zeroed, their segmentors skipped; no postprocessing). Subset average: the mean over the 15 "
            "subsets, with its patient-level bootstrap interval.",
            "",
            robustness_table(result["robustness"], labels, regions),
        ]
        curves = result["robustness_runs"]
        if curves:
            text += ["", convergence_table(curves, labels)]
    shapes = result.get("shapes")
    if shapes:
        text += ["", "## ShapeComposition", "", f"Source: {shapes['source']}."]
        if "methods" in shapes:
            text += ["", results_table(shapes)]
    return "\n".join(text) + "\n"


# -------------------------------------------------------------------------------------- environment


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


#: Settings a resumed study may change: they decide which runs exist or how fast they go, not their numbers.
RESUME_FREE = ("seeds", "robustness_models", "jobs", "note")
#: Settings added after studies were committed, with the value those studies ran with.
BEFORE_ADDED = {"memory_format": "contiguous"}


def check_resumable(previous: dict[str, Any], settings: Settings, path: Path) -> None:
    """Refuse to mix runs of different settings in one table.

    Raises:
        CimlError: ``path`` was written by other settings (names the fields and both values).
    """
    stored = {**BEFORE_ADDED, **previous.get("settings", {})}
    current = {**asdict(settings), "validate_every": settings.validate_every}
    differ = [
        f"{name} {stored.get(name)!r} there, {value!r} now"
        for name, value in json.loads(json.dumps(current)).items()
        if name not in RESUME_FREE and stored.get(name) != value
    ]
    if differ:
        raise CimlError(f"--resume: {path} was run with other settings: {'; '.join(differ)}")


def read_previous(path: Path, settings: Settings, models: Sequence[str]) -> dict[str, Any]:
    """The results.json ``--resume`` continues, checked against ``settings`` and ``models``.

    Raises:
        CimlError: it is missing, unreadable, was run with other settings, or holds finished runs that
            ``models`` and the seeds leave out (rewriting it would lose them).
    """
    if not path.is_file():
        raise CimlError(f"--resume: {path} does not exist; run without --resume first")
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CimlError(f"--resume: cannot read {path}: {error}") from error
    if previous.get("benchmark") != "accuracy" or "settings" not in previous:
        raise CimlError(f"--resume: {path} is not a results.json of benchmarks/accuracy.py")
    check_resumable(previous, settings, path)
    wanted = {(v.key, seed) for v in study_variants(settings, models) for seed in settings.seeds}
    wanted |= {
        (v.key, seed)
        for v in robustness_variants(settings)
        for seed in settings.seeds[: settings.robustness_seeds]
    }
    stored = previous.get("runs", []) + previous.get("robustness_runs", [])
    dropped = [
        f"{run['key']} seed {run['seed']}" for run in stored if (run["key"], run["seed"]) not in wanted
    ]
    if dropped:
        raise CimlError(
            f"--resume: {path} holds finished runs this invocation leaves out ({', '.join(dropped)}); "
            "name their models, seeds and robustness models too, or use another --out"
        )
    return previous


def finished_runs(
    previous: dict[str, Any], jobs: Sequence[Job]
) -> dict[int, tuple[Job, dict[str, Any], dict[str, Any] | None]]:
    """The jobs an earlier results.json has finished, with its records, keyed by job index."""
    main = {(run["key"], run["seed"]): run for run in previous.get("runs", [])}
    robust = {(run["key"], run["seed"]): run for run in previous.get("robustness_runs", [])}
    kept = {}
    for job in jobs:
        identity = (job.variant.key, job.seed)
        if job.robustness and identity in robust and job.variant.key in previous.get("robustness", {}):
            kept[job.index] = (job, robust[identity], previous["robustness"][job.variant.key])
        elif not job.robustness and identity in main:
            kept[job.index] = (job, main[identity], None)
    return kept


def resumed_entry(previous: dict[str, Any], kept: dict[int, tuple[Job, Any, Any]]) -> dict[str, Any]:
    """Where the kept runs came from, for the record."""
    return {
        "git_commit": previous["environment"].get("git_commit"),
        "date": previous["environment"].get("date"),
        "total_s": previous.get("total_s"),
        "runs": [f"{job.variant.key} seed {job.seed}" for job, _, _ in kept.values()],
    }


def run_benchmark(
    settings: Settings,
    models: Sequence[str],
    out: Path,
    work: Path,
    run_shapes: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (model, seed) into ``work``; (re)write ``out/results.json`` and ``results.md`` after each.

    Order: for each seed every model of the main table, then the robustness runs, so that an
    interrupted run keeps complete comparisons for the first seeds. ``previous`` (``--resume``): an
    earlier results.json of the same settings (:func:`check_resumable`) whose finished runs are kept
    and not trained again.

    Returns:
        The JSON-ready result.
    """
    started = time.perf_counter()
    started_wall = time.time()  # the workers' clock too
    spec = load_task(TASK)
    main = study_variants(settings, models)
    robust = robustness_variants(settings)

    def elapsed() -> str:
        return f"[{time.perf_counter() - started:7.1f} s]"

    equal_flops = None
    if EQUAL_FLOPS in models:
        eq_widths, eq_flops, joint_flops = equal_flops_widths(settings.widths)
        equal_flops = {"widths": list(eq_widths), "ciml_flops": eq_flops, "joint_flops": joint_flops}
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "task": TASK,
        "status": "running",
        "environment": environment(settings.device),
        "settings": {**asdict(settings), "validate_every": settings.validate_every},
        "plateau_criterion": {
            "window": PLATEAU_WINDOW,
            "gain_tolerance": PLATEAU_GAIN,
            "drop_tolerance": PLATEAU_DROP,
            "tail": PLATEAU_TAIL,
        },
        "equal_flops": equal_flops,  # None when the ciml-flops row is not run
        "models_requested": list(models),
        "regions": list(spec.region_names),
        "variants": [],
        "robustness_variants": [],
        "estimate": None,
        "runs": [],
        "models": [],
        "comparisons": [],
        "robustness_runs": [],
        "robustness": {},
        "shapes": None,
        "total_s": 0.0,
        "resumed_from": [],  # earlier invocations whose runs are kept: commit, date, runs, seconds
    }
    for target, variants in (("variants", main), ("robustness_variants", robust)):
        for variant in variants:
            params, gflops = cost(variant.model, variant.widths, settings.patch)
            result[target].append({**asdict(variant), "params": params, "fwd_gflops": round(gflops, 4)})

    def save(status: str) -> None:
        result["status"] = status
        result["total_s"] = round(time.perf_counter() - started, 1)
        study_tables(result)
        write_json_atomic(out / "results.json", result)
        write_text_atomic(out / "results.md", render_markdown(result))

    log(f"{elapsed()} writing {settings.train_cases}+{settings.test_cases} brain phantoms into {work}")
    config = BrainDemoConfig(
        train_cases=settings.train_cases,
        test_cases=settings.test_cases,
        seed=settings.data_seed,
        spacing_mm=settings.phantom_spacing_mm,
    )
    train_dir, test_dir = write_phantoms(work / "data", config, progress=progress)
    check_phantoms((train_dir, test_dir), spec, log=log)
    train_cases = read_dataset(train_dir, spec)
    splits = make_splits(train_cases, FOLDS, settings.data_seed)
    validation_cases = min(settings.max_validation_cases, len(splits[0]["val"]))
    log(
        f"{elapsed()} budget probe: timing {1 if settings.setting == 'quick' else PROBE_STEPS} training "
        "steps and one case of every model"
    )
    result["estimate"] = estimate_run(
        settings, main, robust, read_dataset(test_dir, spec)[0], validation_cases
    )
    for line in budget_lines(result["estimate"]):
        log(line)
    result["shapes"] = shapes_table(settings, run_shapes, log)
    log(f"{elapsed()} shapes: {result['shapes']['source']}")
    save("running")

    robust_seeds = settings.seeds[: settings.robustness_seeds]
    jobs = [(v, s, False) for s in settings.seeds for v in main] + [
        (v, s, True) for s in robust_seeds for v in robust
    ]
    tasks = [
        Job(index, len(jobs), variant, seed, robustness)
        for index, (variant, seed, robustness) in enumerate(jobs, start=1)
    ]
    if settings.jobs > 1:
        tasks = longest_first(tasks, result["estimate"])
    arguments = [(job, settings, train_dir, test_dir, splits, work) for job in tasks]
    finished: dict[int, tuple[Job, dict[str, Any], dict[str, Any] | None]] = {}

    def publish() -> None:
        order = sorted(finished)
        result["runs"] = [finished[i][1] for i in order if not finished[i][0].robustness]
        result["robustness_runs"] = [finished[i][1] for i in order if finished[i][0].robustness]
        result["robustness"] = {
            finished[i][0].variant.key: finished[i][2] for i in order if finished[i][0].robustness
        }
        done = len(finished)
        save(f"partial: {done} of {len(jobs)} runs" if done < len(jobs) else "complete")

    def collect(job: Job, record: dict[str, Any], robustness: dict[str, Any] | None, line: str) -> None:
        finished[job.index] = (job, record, robustness)
        log(f"{elapsed()} {line}")
        publish()

    if previous is not None:
        finished.update(finished_runs(previous, tasks))
        tasks = [job for job in tasks if job.index not in finished]
        arguments = [args for args in arguments if args[0].index not in finished]
        result["resumed_from"] = [*previous.get("resumed_from", []), resumed_entry(previous, finished)]
        commit = previous["environment"].get("git_commit")
        log(
            f"{elapsed()} resuming: kept {len(finished)} finished run(s) of commit {commit}; "
            f"{len(tasks)} of the {len(jobs)} runs the estimate counts are left to train"
        )
        publish()
    if settings.jobs > 1 and len(tasks) > 1:
        log(f"{elapsed()} {len(tasks)} runs in {settings.jobs} worker processes (1 torch thread each)")
        context = multiprocessing.get_context("spawn")  # no forked OpenMP state
        with ProcessPoolExecutor(settings.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_job, *args, False, started_wall) for args in arguments]
            for future in as_completed(futures):
                collect(*future.result())
    else:
        for args in arguments:
            collect(*run_job(*args, progress, started_wall, log))
    if not jobs:
        save("complete")
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
        help=f"comma-separated models of the main table (default: {','.join(ALL_MODELS)}; "
        f"{EQUAL_FLOPS}: ciml at the joint U-Net's FLOPs)",
    )
    parser.add_argument(
        "--seeds", default=None, help="comma-separated training seeds (default: cpu/gpu 0,1,2; quick 0)"
    )
    parser.add_argument(
        "--robustness",
        default=None,
        help="comma-separated models trained with modality dropout for the 15-subset table, or 'none' "
        f"(default: {','.join(ROBUSTNESS_DEFAULT)}, those of them among --models)",
    )
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=None,
        metavar="P",
        help="modality dropout of the robustness runs (default 0.5; joint, segresnet: zero-filled)",
    )
    parser.add_argument("--shapes", action="store_true", help="rerun ShapeComposition instead of reading it")
    parser.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    parser.add_argument("--patch", type=int, default=None, help="override the preset's training patch edge")
    parser.add_argument(
        "--widths",
        default=None,
        help="override the preset's U-Net widths, comma-separated (SegResNet's too), e.g. 4,8,16",
    )
    parser.add_argument(
        "--inference-patch", type=int, default=None, help="override the preset's inference tile edge"
    )
    parser.add_argument(
        "--validations", type=int, default=None, help="override the preset's validations per run"
    )
    parser.add_argument(
        "--test-cases", type=int, default=None, help="override the preset's held-out test phantoms"
    )
    parser.add_argument(
        "--phantom-spacing",
        type=float,
        default=None,
        metavar="MM",
        help="override the preset's phantom voxel size in mm (cpu: 3; larger: fewer voxels per case)",
    )
    parser.add_argument(
        "--memory-format",
        choices=MEMORY_FORMATS,
        default=None,
        help="layout runs train and predict in (default auto: channels_last_3d on a CPU)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained at once in worker processes (default: cpu 2, one per core; gpu and quick 1)",
    )
    parser.add_argument(
        "--estimate", action="store_true", help="only time every model and print the run's estimate"
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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of --out's results.json (same settings; more seeds or models may be "
        "asked for) and train only the others",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars of every step")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    """The preset with the command line's overrides, and the models to run."""
    settings = PRESETS["quick" if args.quick else args.setting]
    models = _names(args.models)
    if args.robustness is None:
        robustness = tuple(m for m in settings.robustness_models if m in models)
    elif args.robustness.strip() == "none":
        robustness = ()
    else:
        robustness = tuple(_names(args.robustness))
    overrides: dict[str, Any] = {"robustness_models": robustness}
    if args.seeds is not None:
        try:
            overrides["seeds"] = tuple(int(s) for s in _names(args.seeds))
        except ValueError as error:
            raise CimlError(f"--seeds {args.seeds}: give comma-separated integers") from error
    if args.widths is not None:
        try:
            widths = tuple(int(w) for w in _names(args.widths))
        except ValueError as error:
            raise CimlError(f"--widths {args.widths}: give comma-separated integers") from error
        if not widths or min(widths) < 1:
            raise CimlError(f"--widths {args.widths}: give at least one positive width")
        overrides["widths"] = overrides["segresnet_widths"] = widths
    for field in ("iterations", "patch", "inference_patch", "validations", "test_cases"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.jobs is not None:
        overrides["jobs"] = args.jobs
    if args.modality_dropout is not None:
        overrides["modality_dropout"] = args.modality_dropout
    if args.phantom_spacing is not None:
        overrides["phantom_spacing_mm"] = args.phantom_spacing
    if args.memory_format is not None:
        overrides["memory_format"] = args.memory_format
    return replace(settings, **overrides), models


def estimate_only(settings: Settings, models: Sequence[str], work: Path) -> dict[str, Any]:
    """``--estimate``: one test phantom, the budget probe, its lines printed; nothing else is written."""
    spec = load_task(TASK)
    config = BrainDemoConfig(
        train_cases=1, test_cases=1, seed=settings.data_seed, spacing_mm=settings.phantom_spacing_mm
    )
    _, test_dir = write_phantoms(work / "probe", config, progress=False)
    validation_cases = min(settings.max_validation_cases, max(1, settings.train_cases // FOLDS))
    estimate = estimate_run(
        settings, study_variants(settings, models), robustness_variants(settings),
        read_dataset(test_dir, spec)[0], validation_cases,
    )  # fmt: skip
    for line in budget_lines(estimate):
        print(line, flush=True)
    return estimate


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temporary: Path | None = None
    try:
        settings, models = settings_from_args(args)
        check_settings(settings, models)
        out = args.out or RESULTS_DIR / f"accuracy_{settings.setting}"
        existing = [str(out / name) for name in OUTPUT_NAMES if (out / name).exists()]
        previous = None
        if args.resume:
            previous = read_previous(out / "results.json", settings, models)
        elif existing and not args.overwrite and not args.estimate:  # fail before an hour, not after
            raise CimlError(
                f"{', '.join(existing)} already exist(s); pass --overwrite to replace or --resume to continue"
            )
        if args.work is not None and args.work.exists() and any(args.work.iterdir()):
            raise CimlError(f"--work {args.work} is not empty; choose a new folder (nothing is deleted)")
        if settings.threads:
            torch.set_num_threads(settings.threads)
        work = args.work or (temporary := Path(tempfile.mkdtemp(prefix="ciml-accuracy-")))
        print(f"settings: {settings}\nmodels: {', '.join(models)}", flush=True)
        if args.estimate:
            estimate_only(settings, models, work)
            return 0
        result = run_benchmark(
            settings,
            models,
            out,
            work,
            args.shapes,
            args.progress,
            lambda line: print(line, flush=True),
            previous,
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
        f"commit {env['git_commit']}; {result['total_s']:.0f} s in all (estimated "
        f"{result['estimate']['total_s']:.0f} s); wrote {out}\n"
    )
    print(main_table(result["models"], result["regions"], settings.patch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
