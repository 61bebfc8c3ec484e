"""Training step time with real batch loading (patch sampling + augmentation) against a preloaded batch.

Every row trains the same CIML network for the same steps on the same synthetic BraTS-like cases
(4 modalities, nested tumour regions); only where batches come from differs:

* ``preloaded``: one batch made beforehand, handed over every step (no loading at all: the floor);
* ``in process``: ``ciml train --workers 0``: each batch is sampled (and augmented) before its step;
* ``N workers``: ``--workers N``: DataLoader processes make the next batches while the step runs.

Per row: median wall milliseconds per step (batch wait + forward/backward/AdamW) in the fastest of
the interleaved rounds, the mean time the training process waited for its batch, and the ratio to
``preloaded`` measured in the same run (CPU timings on a shared machine are noisy: compare ratios, not
absolute numbers across runs). A second table times making one batch in process at the CPU and GPU
patch sizes (no step), which says how many workers a GPU step needs to never wait.

    python benchmarks/loading.py                      # 64^3 patches, batch 2, CPU widths; minutes
    python benchmarks/loading.py --widths 8 16 32 64 --warmup 1 --steps 4   # how results/ was made
    python benchmarks/loading.py --quick --out /tmp/loading.json   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ciml import files
from ciml.data.preprocessing import PreprocessedCase
from ciml.models import build_model
from ciml.tasks import load_task
from ciml.threads import usable_cpus
from ciml.training import Batch, TrainConfig, Trainer
from ciml.training.engine import CPU_DEFAULTS, GPU_DEFAULTS, PatchStream, TrainSettings
from ciml.training.loading import BackgroundBatches, default_workers
from threads import cpu_model  # benchmarks/threads.py, beside this script

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPEC = load_task("brats2020")


def synthetic_cases(count: int, size: int, seed: int = 0) -> list[PreprocessedCase]:
    """Z-scored noise with a bright ball per case, labelled 2 > 1 > 4 inwards (BraTS's nesting)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1)
    cases = []
    for i in range(count):
        distance = np.linalg.norm(grid - rng.uniform(0.3 * size, 0.7 * size, 3), axis=-1)
        label = np.where(distance < size / 6, 2, 0).astype(np.uint8)
        label[distance < size / 10] = 1
        label[distance < size / 16] = 4
        image = rng.normal(size=(4, size, size, size)).astype(np.float32) + (label > 0)
        cases.append(PreprocessedCase(f"case{i}", image, label, {}))
    return cases


def stream(cases, patch: Sequence[int], batch_size: int, augment: str) -> PatchStream:
    settings = TrainSettings(
        task="brats2020",
        data=Path(),
        out=Path(),
        patch_size=tuple(patch),
        batch_size=batch_size,
        augment=augment,
    )
    return PatchStream(
        cases, SPEC, settings, rank=0, missing_modalities=build_model("ciml", SPEC).missing_modalities
    )


def time_steps(
    batch_at: Callable[[int], Batch], widths, warmup: int, steps: int, workers: int
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps; per measured step its wall time and the time spent waiting for data."""
    torch.manual_seed(0)
    model = build_model("ciml", SPEC, widths=tuple(widths), spatial_dims=3)
    config = TrainConfig(
        iterations=warmup + steps, region_names=list(SPEC.region_names), device="cpu", seed=0
    )
    with BackgroundBatches(batch_at, stop=config.iterations, workers=workers) as batches:
        trainer = Trainer(model, config, batches)
        marks: list[tuple[float, float]] = []

        def mark(trainer: Trainer, record: dict[str, float]) -> None:
            marks.append((time.perf_counter(), batches.wait_seconds))

        marks.append((time.perf_counter(), 0.0))
        trainer.fit(progress=False, callbacks=[mark])
    measured = marks[warmup:]
    wall = [b[0] - a[0] for a, b in zip(measured, measured[1:], strict=False)]
    wait = [b[1] - a[1] for a, b in zip(measured, measured[1:], strict=False)]
    return {"ms_per_step": 1000 * statistics.median(wall), "wait_ms": 1000 * statistics.mean(wait)}


def time_batches(cases, patch: Sequence[int], augment: str, count: int) -> float:
    """Milliseconds to make one batch of 2 in the calling process (median of ``count``)."""
    make = stream(cases, patch, 2, augment)
    make(0)  # first calls build kernels and caches
    times = []
    for k in range(1, count + 1):
        started = time.perf_counter()
        make(k)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def environment() -> dict[str, Any]:
    model = cpu_model()
    return {
        "hardware": f"{model}, {usable_cpus()} CPUs available ({os.cpu_count()} online), no GPU used",
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cases = synthetic_cases(args.cases, args.size)
    widths = args.widths
    fixed = stream(cases, args.patch, args.batch_size, "default")(0)
    configs = [
        ("preloaded", lambda k: fixed, 0, "-"),
        ("in process", stream(cases, args.patch, args.batch_size, "none"), 0, "none"),
        ("in process", stream(cases, args.patch, args.batch_size, "default"), 0, "default"),
        *[
            (f"{n} workers", stream(cases, args.patch, args.batch_size, "default"), n, "default")
            for n in args.workers
        ],
    ]
    timings: list[list[dict[str, float]]] = [[] for _ in configs]
    for round_ in range(args.rounds):  # rounds interleave the rows, so a load change hits them all
        for i, (name, batch_at, workers, augment) in enumerate(configs):
            result = time_steps(batch_at, widths, args.warmup, args.steps, workers)
            timings[i].append(result)
            print(
                f"  round {round_ + 1}: {name} ({augment}): {result['ms_per_step']:.0f} ms/step, "
                f"waited {result['wait_ms']:.0f} ms",
                file=sys.stderr,
            )
    rows = [
        {
            "loading": name,
            "workers": workers,
            "augment": augment,
            # the fastest round: other processes on a shared machine only ever add time
            "ms_per_step": min(t["ms_per_step"] for t in timing),
            "wait_ms": min(t["wait_ms"] for t in timing),
            "ms_per_step_rounds": [round(t["ms_per_step"], 1) for t in timing],
        }
        for (name, _, workers, augment), timing in zip(configs, timings, strict=True)
    ]
    floor = rows[0]["ms_per_step"]
    for r in rows:
        r["ratio_to_preloaded"] = round(r["ms_per_step"] / floor, 3)
        r["ms_per_step"], r["wait_ms"] = round(r["ms_per_step"], 1), round(r["wait_ms"], 1)

    batch_rows = []
    for patch in args.batch_patches:
        big = synthetic_cases(2, max(args.size, patch + patch // 2)) if patch > args.size else cases
        for augment in ("none", "default"):
            ms = time_batches(big, (patch,) * 3, augment, args.batch_repeats)
            batch_rows.append({"patch": patch, "augment": augment, "ms_per_batch_of_2": round(ms, 1)})
    return {
        "environment": environment(),
        "setup": {
            "model": "ciml", "widths": list(widths), "patch": list(args.patch), "batch_size": args.batch_size,
            "cases": args.cases, "case_size": args.size, "warmup": args.warmup, "steps": args.steps,
            "rounds": args.rounds,
            "default_workers_here": default_workers(),
        },
        "steps": rows,
        "batches": batch_rows,
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["setup"]
    lines = [
        f"# Step time with real loading vs a preloaded batch ({env['date'][:10]})",
        "",
        f"Hardware: {env['hardware']}; torch {env['torch']}, {env['torch_threads']} torch threads in the "
        f"training process. CIML widths {setup['widths']}, patch {setup['patch']}, "
        f"batch {setup['batch_size']}, {setup['cases']} synthetic cases of 4x{setup['case_size']}^3, "
        f"median of {setup['steps']} steps after {setup['warmup']} warm-up steps, fastest of "
        f"{setup['rounds']} interleaved rounds. CPU timings on a shared "
        "machine are noisy: compare the ratios of one run.",
        "",
        "| loading | workers | augment | ms/step | waited ms/step | ratio to preloaded |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r['loading']} | {r['workers']} | {r['augment']} | {r['ms_per_step']:.0f} "
            f"| {r['wait_ms']:.0f} | {r['ratio_to_preloaded']:.2f} |"
        )
    lines += [
        "",
        "Making one batch of 2 in process (no step):",
        "",
        "| patch | augment | ms/batch |",
        "|---:|---|---:|",
    ]
    for b in result["batches"]:
        lines.append(f"| {b['patch']}^3 | {b['augment']} | {b['ms_per_batch_of_2']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, nargs=3, default=list(CPU_DEFAULTS["patch_size"]))
    parser.add_argument("--batch-size", type=int, default=CPU_DEFAULTS["batch_size"])
    parser.add_argument("--widths", type=int, nargs="+", default=list(CPU_DEFAULTS["widths"]))
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="edge of the synthetic cases (voxels)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every row, interleaved")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (training)"
    )
    parser.add_argument(
        "--batch-patches", type=int, nargs="+",
        default=[CPU_DEFAULTS["patch_size"][0], GPU_DEFAULTS["patch_size"][0]],
        help="patch edges at which to time making a batch",
    )  # fmt: skip
    parser.add_argument("--batch-repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--out", type=Path, help="JSON output; a .md table is written beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.patch, args.widths, args.size, args.cases = [16, 16, 16], [4, 8], 24, 2
        args.warmup, args.steps, args.workers, args.batch_patches, args.batch_repeats = 1, 3, [1], [16], 2
        args.rounds = 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out is not None:
        files.write_json_atomic(args.out, result)
        args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
