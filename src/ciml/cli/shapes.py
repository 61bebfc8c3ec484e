"""`ciml shapes`: the ShapeComposition verification experiment, CIML against its baselines."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ciml.cli.options import DefaultsHelpFormatter, add_device, add_overwrite, add_progress, add_task, finish
from ciml.errors import CimlError
from ciml.experiments.shapecomposition import (
    DEMO_METHODS,
    ShapeExperimentConfig,
    plot_examples,
    results_table,
    run_experiment,
    write_json,
)
from ciml.files import write_text_atomic
from ciml.models import model_names

DEFAULTS = ShapeExperimentConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes",
        help="verify CIML on ShapeComposition: train it and its baselines, compare Dice and selectivity",
        description=(
            "Generate ShapeComposition samples on the fly, train CIML (beta > 0), ciml-beta0, joint and "
            "ensemble with the same budget, evaluate on held-out samples and write results.json, "
            "results.md and examples.png to --out. About 5-8 minutes on 2 CPU cores with the defaults."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("shapes_out"), help="output folder")
    add_task(
        parser,
        required=False,
        default=DEFAULTS.task,
        help="ShapeComposition preset (shapecomposition, shapecomposition3, ...)",
    )
    parser.add_argument(
        "--iterations", type=int, default=DEFAULTS.iterations, help="training steps per method"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="samples per step")
    parser.add_argument(
        "--size", type=int, nargs="+", default=list(DEFAULTS.size), help="sample size (2 or 3 ints)"
    )
    parser.add_argument(
        "--widths", type=int, nargs="+", default=list(DEFAULTS.widths), help="U-Net widths per level"
    )
    parser.add_argument(
        "--beta", type=float, default=DEFAULTS.beta, help="weight of the KL (bottleneck) term"
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULTS.lr, help="initial AdamW learning rate (poly decay)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of data and weights")
    parser.add_argument(
        "--validation-samples", type=int, default=DEFAULTS.validation_samples, help="held-out samples"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(DEMO_METHODS), choices=model_names(), help="methods to compare"
    )
    add_device(parser, "cpu")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="methods trained in parallel processes, one torch thread each (same results, less wall time)",
    )
    add_overwrite(parser, "results already in --out")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    outputs = [out / "results.json", out / "results.md", out / "examples.png"]
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise CimlError(f"{existing[0]} already exists; choose another --out or pass --overwrite")
    if args.iterations < 1 or args.batch_size < 1:
        raise CimlError("--iterations and --batch-size must be at least 1")
    config = ShapeExperimentConfig(
        task=args.task,
        size=tuple(args.size),
        widths=tuple(args.widths),
        batch_size=args.batch_size,
        iterations=args.iterations,
        lr=args.lr,
        beta=args.beta,
        seed=args.seed,
        validation_samples=args.validation_samples,
        methods=tuple(args.methods),
        device=args.device,
    )
    out.mkdir(parents=True, exist_ok=True)
    results = run_experiment(config, progress=args.progress, jobs=args.jobs)
    table = results_table(results)
    print()
    print(table)
    write_json(results, outputs[0])
    write_text_atomic(outputs[1], f"# ShapeComposition verification\n\n{table}\n")
    plot_examples(results, outputs[2])
    print(f"\nwrote {', '.join(str(p) for p in outputs)}")
    return 0
