"""The end-to-end demo on the brain tumour phantom: data -> check -> train -> predict -> evaluate.

It runs every step a user runs on BraTS, through the same Python API the commands use, on phantom
cases small enough for a CPU: 2 mm BraTS-layout phantoms on the real MNI152 anatomy, a training set
(split 5-fold inside the run) and a separate held-out test set that prediction and evaluation use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciml.data.integrity import check_folder
from ciml.data.phantoms import make_brats_phantom
from ciml.errors import CimlError
from ciml.evaluation.evaluate import evaluate_folders
from ciml.files import write_json_atomic
from ciml.inference.predict import InferenceSettings, predict_folder
from ciml.inferers import tile_text
from ciml.report import write_report
from ciml.tasks import TaskSpec, load_task
from ciml.training.engine import TrainSettings, train

TASK = "brats2020"


@dataclass
class BrainDemoConfig:
    """Sizes of the demo; the defaults take a few minutes on 2 CPU cores."""

    train_cases: int = 8
    test_cases: int = 3
    iterations: int = 300
    patch_size: tuple[int, int, int] = (32, 32, 32)
    widths: tuple[int, ...] = (8, 16, 32)
    batch_size: int = 2
    #: Prediction tile; None: the one training chose on the validation cases (the 32^3 patch or 64^3:
    #: 64^3 tiles scored held-out mean Dice 0.89 and 32^3 0.80 on 2026-12-07, see ciml.training.tiles).
    inference_patch: tuple[int, int, int] | None = None
    model: str = "ciml"
    seed: int = 0
    device: str = "auto"
    #: Mirroring only: a few hundred CPU steps are too few for nnU-Net's full augmentation to pay (it
    #: is the default of `ciml train`).
    augment: str = "mirror"
    #: AdamW at 1e-2 (poly decay): at these widths and budgets 1e-3 leaves every model far from
    #: converged (benchmarks/results/demo_recipe.md compares optimizers and rates).
    optimizer: str = "adamw"
    lr: float = 1e-2
    #: The phantoms' voxel size (1, 2 or 3 mm); training and prediction run at it.
    spacing_mm: float = 2.0


def write_phantoms(data_dir: Path, config: BrainDemoConfig, progress: bool = True) -> tuple[Path, Path]:
    """Write the training and the held-out test phantoms (``config.spacing_mm``) under ``data_dir``.

    Returns:
        The folders ``data_dir/train`` and ``data_dir/test`` (cases numbered from 1 and from 901).
    """
    train_dir, test_dir = data_dir / "train", data_dir / "test"
    spacing = config.spacing_mm
    make_brats_phantom(train_dir, config.train_cases, seed=config.seed, spacing_mm=spacing, progress=progress)
    make_brats_phantom(
        test_dir,
        config.test_cases,
        seed=config.seed + 1,
        spacing_mm=spacing,
        first_index=901,
        progress=progress,
    )
    return train_dir, test_dir


def check_phantoms(folders: Iterable[Path], spec: TaskSpec, log: Callable[[str], None] = print) -> None:
    """Run the integrity check on each folder, logging its summary.

    Raises:
        CimlError: a folder failed the check (names its first error).
    """
    for folder in folders:
        report = check_folder(folder, spec, progress=False)
        log(f"  {folder.name}: {report.summary()}")
        if not report.ok:
            raise CimlError(f"{folder}: the phantom failed its integrity check: {report.errors[0]}")


def train_settings(
    config: BrainDemoConfig, train_dir: Path, run_dir: Path, progress: bool = True, validation_cases: int = 2
) -> TrainSettings:
    """The demo's training settings for ``config.model``: one validation at the end on a few cases.

    Args:
        config: sizes, model, seed and device.
        train_dir: the training phantoms.
        run_dir: the run folder to write.
        progress: show the training progress bar.
        validation_cases: validation cases of the fold scored at the end (0: no validation).
    """
    return TrainSettings(
        task=TASK,
        data=train_dir,
        out=run_dir,
        model=config.model,
        iterations=config.iterations,
        patch_size=config.patch_size,
        validation_patch=config.inference_patch,
        widths=config.widths,
        batch_size=config.batch_size,
        validate_every=config.iterations,
        max_validation_cases=validation_cases,
        seed=config.seed,
        device=config.device,
        augment=config.augment,
        optimizer=config.optimizer,
        lr=config.lr,
        progress=progress,
    )


def inference_settings(config: BrainDemoConfig) -> InferenceSettings:
    """How the demo predicts: the run's last checkpoint with ``config.inference_patch`` tiles (None: the
    tile the run chose on its validation cases)."""
    return InferenceSettings(device=config.device, patch_size=config.inference_patch)


def run_brain_demo(
    out: Path, config: BrainDemoConfig, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the pipeline into ``out`` (data/, run/, predictions/, metrics.json); returns the summary."""
    spec = load_task(TASK)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str) -> None:
        nonlocal started
        timings[name] = round(time.perf_counter() - started, 1)
        log(f"[{name}] done in {timings[name]:.1f} s")
        started = time.perf_counter()

    log(f"1/6 writing {config.train_cases}+{config.test_cases} brain phantom cases (2 mm, MNI152 anatomy)")
    train_dir, test_dir = write_phantoms(out / "data", config, progress=progress)
    step("phantom")

    log("2/6 checking the data")
    check_phantoms((train_dir, test_dir), spec, log=log)
    step("check")

    log(f"3/6 training {config.model} for {config.iterations} iterations")
    run = train(train_settings(config, train_dir, out / "run", progress=progress))
    tile = config.inference_patch or run.read_tile(0) or config.patch_size
    if config.inference_patch is None:
        log(
            f"  tile chosen on the validation cases: {tile_text(tile)} (patch {tile_text(config.patch_size)})"
        )
    step("train")

    log("4/6 predicting the held-out test cases")
    predictions = out / "predictions"
    predict_folder(run, test_dir, predictions, settings=inference_settings(config), progress=progress)
    step("predict")

    log("5/6 evaluating with the BraTS conventions")
    result = evaluate_folders(predictions, test_dir, spec)
    result.write(out / "metrics.json", out / "metrics.csv", overwrite=True)
    step("evaluate")
    log(result.table())

    log("6/6 writing the report (explains one test case)")
    report = write_report(
        run,
        out / "report.html",
        pred_dir=predictions,
        ref_dir=test_dir,
        settings=inference_settings(config),
        overwrite=True,
    )
    step("report")
    log(f"report: {report}")
    summary = {
        "config": config.__dict__,
        "inference_tile": list(tile),
        "timings_s": timings,
        "metrics": result.to_dict()["summary"],
        "report": str(report),
    }
    write_json_atomic(out / "demo.json", summary)
    return summary
