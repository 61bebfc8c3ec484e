"""Which optimizer, learning rate and budget make the CPU demo's models good (issue 14, item 4).

Every variant trains on the same brain phantoms as ``ciml demo`` (8 training cases, 2 mm, fold 0 of the
5-fold split; the demo's patch, widths, batch and mirroring) through the demo's own functions, predicts
the same 3 held-out phantoms and scores them with the code ``ciml evaluate`` runs. Only the training seed
changes between repeats of a variant (weights and patch sampling); the phantoms are the same for all.

    python benchmarks/demo_recipe.py                               # every variant, seed 0
    python benchmarks/demo_recipe.py --variants adamw-1e-2-300 --seeds 0,1,2
    python benchmarks/demo_recipe.py --quick --out /tmp/recipe     # smoke test, about a minute

Appends one JSON line per (variant, seed) to ``--out``/demo_recipe.jsonl as it finishes, so an interrupted
run keeps what it measured, and rewrites ``--out``/demo_recipe.md (the table of every line) after each.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ciml.evaluation.evaluate import evaluate_folders
from ciml.experiments.brain_demo import (
    TASK,
    BrainDemoConfig,
    inference_settings,
    train_settings,
    write_phantoms,
)
from ciml.files import write_text_atomic
from ciml.inference.predict import predict_folder
from ciml.tasks import load_task
from ciml.training.engine import train

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """What differs from the demo's defaults."""

    model: str = "ciml"
    optimizer: str = "adamw"
    lr: float = 1e-2
    iterations: int = 300
    foreground_fraction: float = 1 / 3
    widths: tuple[int, ...] = BrainDemoConfig.widths
    deep_supervision: bool = False


VARIANTS = {
    "adamw-1e-3-150": Variant(lr=1e-3, iterations=150),  # the demo before issue 14
    "adamw-3e-3-150": Variant(lr=3e-3, iterations=150),
    "adamw-1e-2-150": Variant(iterations=150),
    "adamw-3e-2-150": Variant(lr=3e-2, iterations=150),
    "sgd-1e-2-150": Variant(optimizer="sgd", iterations=150),  # nnU-Net's: Nesterov momentum 0.99
    "adamw-1e-2-300": Variant(),  # the demo's recipe
    "sgd-1e-2-300": Variant(optimizer="sgd"),
    "adamw-1e-2-300-fg0.66": Variant(foreground_fraction=2 / 3),
    "joint-adamw-1e-3-150": Variant(model="joint", lr=1e-3, iterations=150),
    "joint-adamw-1e-2-150": Variant(model="joint", iterations=150),
    # Deep supervision needs 4 levels (nnU-Net heads every decoder level but the two lowest): with
    # widths 8/16/32/64 one auxiliary head at half resolution, weights 2/3 and 1/3.
    "4-levels": Variant(widths=(8, 16, 32, 64)),
    "4-levels-ds": Variant(widths=(8, 16, 32, 64), deep_supervision=True),
    "joint-4-levels": Variant(model="joint", widths=(8, 16, 32, 64)),
    "joint-4-levels-ds": Variant(model="joint", widths=(8, 16, 32, 64), deep_supervision=True),
}


def run_variant(name: str, seed: int, data: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Train, predict and score one variant with one training seed; returns its JSON line."""
    variant = VARIANTS[name]
    config = replace(
        BrainDemoConfig(),
        model=variant.model,
        optimizer=variant.optimizer,
        lr=variant.lr,
        iterations=3 if quick else variant.iterations,
        widths=variant.widths,
        seed=seed,
        device="cpu",
    )
    out = work / f"{name}-seed{seed}"
    settings = replace(
        train_settings(config, data / "train", out / "run", progress=False),
        foreground_fraction=variant.foreground_fraction,
        deep_supervision=variant.deep_supervision,
    )
    started = time.perf_counter()
    run = train(settings)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    predictions = out / "predictions"
    predict_folder(run, data / "test", predictions, settings=inference_settings(config), progress=False)
    predicted = time.perf_counter() - started
    summary = evaluate_folders(predictions, data / "test", load_task(TASK)).to_dict()["summary"]
    dice = {region: values["dice"]["mean"] for region, values in summary["regions"].items()}
    return {
        "variant": name,
        "seed": seed,
        **variant.__dict__,
        "iterations": config.iterations,
        "train_s": round(trained, 1),
        "predict_s": round(predicted, 1),
        "dice": dice,
    }


def table(lines: list[dict[str, Any]]) -> str:
    """Markdown: one row per (variant, seed) in the order measured, then the mean over seeds."""
    regions = list(lines[0]["dice"]) if lines else []
    head = "| variant | seed | " + " | ".join(f"{r} Dice" for r in regions) + " | mean | train s |"
    rows = [head, "|" + "---|" * (len(regions) + 4)]
    for line in lines:
        values = [line["dice"][r] for r in regions]
        rows.append(
            f"| {line['variant']} | {line['seed']} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {sum(values) / len(values):.3f} | {line['train_s']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of demo_recipe.jsonl/.md")
    parser.add_argument(
        "--work", type=Path, default=None, help="phantoms and runs (default: a temporary folder)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 iterations per variant: checks that the script runs"
    )
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    lines_path = args.out / "demo_recipe.jsonl"
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        data = work / "data"
        if not (data / "test").is_dir():
            write_phantoms(data, BrainDemoConfig(), progress=False)
        for name in names:
            for seed in seeds:
                line = run_variant(name, seed, data, work, args.quick)
                line["date"] = datetime.now(UTC).date().isoformat()
                line["machine"] = f"{platform.machine()} {platform.processor() or platform.system()}"
                with lines_path.open("a") as stream:
                    stream.write(json.dumps(line) + "\n")
                print(json.dumps(line), flush=True)
                lines = [json.loads(text) for text in lines_path.read_text().splitlines() if text]
                write_text_atomic(args.out / "demo_recipe.md", table(lines) + "\n")


if __name__ == "__main__":
    main()
