"""`ciml demo`: the whole pipeline on built-in data (phantom -> check -> train -> predict -> evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciml.cli.options import DefaultsHelpFormatter, add_device, add_progress, finish
from ciml.errors import CimlError
from ciml.experiments.brain_demo import BrainDemoConfig, run_brain_demo
from ciml.models import model_names

DEFAULTS = BrainDemoConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a built-in brain tumour phantom (a few minutes on a CPU)",
        description=(
            "Write BraTS-layout brain tumour phantoms (2 mm, real MNI152 anatomy) for training and testing, "
            "check them, train CIML, predict the held-out test cases and evaluate them with the BraTS "
            "conventions. Everything lands in --out: data/, run/ (checkpoints, log, progress.png), "
            "predictions/ (NIfTI label maps), metrics.json/csv, report.html (self-contained: curves, "
            "tables, overlays, Grad-CAM and information maps) and demo.json. "
            "For the ShapeComposition verification of the method see `ciml shapes`."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (must be new or empty)"
    )
    parser.add_argument("--model", default=DEFAULTS.model, choices=model_names(), help="network to train")
    parser.add_argument("--iterations", type=int, default=DEFAULTS.iterations, help="training steps")
    parser.add_argument(
        "--train-cases", type=int, default=DEFAULTS.train_cases, help="phantom training cases"
    )
    parser.add_argument("--test-cases", type=int, default=DEFAULTS.test_cases, help="phantom test cases")
    parser.add_argument("--patch", type=int, nargs=3, default=list(DEFAULTS.patch_size), help="patch size")
    parser.add_argument(
        "--inference-patch",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="sliding-window tile size for prediction (default: the tile training chose on the validation "
        "cases: the training patch or twice it)",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULTS.widths), help="U-Net widths")
    add_device(parser, DEFAULTS.device)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of phantoms, split and weights")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and any(args.out.iterdir()):
        raise CimlError(f"{args.out} is not empty; choose a new --out (nothing is overwritten)")
    config = BrainDemoConfig(
        train_cases=args.train_cases,
        test_cases=args.test_cases,
        iterations=args.iterations,
        patch_size=tuple(args.patch),
        inference_patch=tuple(args.inference_patch) if args.inference_patch else None,
        widths=tuple(args.widths),
        model=args.model,
        seed=args.seed,
        device=args.device,
    )
    summary = run_brain_demo(args.out, config, progress=args.progress)
    print(f"\ndemo finished: {args.out}\nopen the report in a browser: {summary['report']}")
    return 0
