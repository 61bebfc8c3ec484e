"""`ciml robustness`: Dice per region for every subset of the modalities (15 rows for BraTS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciml.cli.options import add_overwrite, add_progress, finish
from ciml.cli.predict import add_inference_arguments, parse_modalities, settings_from_args
from ciml.evaluation.evaluate import CONVENTIONS, check_outputs
from ciml.evaluation.robustness import BOOTSTRAP_SAMPLES, OUTPUT_NAMES, evaluate_robustness, output_paths


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "robustness",
        help="score a run on labelled cases with every subset of its modalities (missing-modality table)",
        description=(
            "Predict the labelled cases of a folder with every non-empty subset of the task's modalities "
            "(one loaded model; each case preprocessed once, absent modalities zeroed and skipped) and score "
            "each with the task's challenge convention, as `ciml evaluate` does. Prints and writes a table "
            f"with one row per subset and the Dice of each region ({', '.join(OUTPUT_NAMES)}); a region "
            "whose owners and fallback owners are all missing is n/a. HECKTOR: aggregated Dice; others: "
            "mean Dice over cases. Below the rows: the subset average per region (mean over the subsets of "
            "each subset's Dice, the DeMoSeg/mmFormer protocol) and each modality's marginal contribution "
            "(mean of Dice(S + m) - Dice(S) over the subsets S lacking m), with patient-level bootstrap 95 % "
            "intervals. Networks on stacked modalities (joint, segresnet) run zero-filled when trained with "
            "--modality-dropout, else get n/a rows with the reason."
        ),
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--data", required=True, type=Path, help="labelled cases in any supported layout (or a CSV list)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for robustness.json/.csv/.md (default: RUN/robustness)",
    )
    parser.add_argument(
        "--subsets",
        nargs="+",
        default=None,
        metavar="MODS",
        help="only these subsets, each comma-separated, e.g. flair,t1ce t1ce (default: every subset)",
    )
    parser.add_argument(
        "--convention",
        choices=sorted(CONVENTIONS),
        default=None,
        help="challenge conventions; default from the task name (see `ciml evaluate --help`; else brats)",
    )
    parser.add_argument(
        "--bootstrap",
        dest="samples",
        type=int,
        default=BOOTSTRAP_SAMPLES,
        metavar="N",
        help="patient-level bootstrap resamples for the 95 %% intervals (default %(default)s; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default %(default)s)")
    add_overwrite(parser, "existing output files")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.run / "robustness"
    check_outputs(output_paths(out), args.overwrite)  # fail before the long evaluation, not after it
    subsets = None if args.subsets is None else [parse_modalities(s) for s in args.subsets]
    result = evaluate_robustness(
        args.run,
        args.data,
        layout=args.layout,
        settings=settings_from_args(args),
        subsets=subsets,
        convention=args.convention,
        progress=args.progress,
        samples=args.samples,
        seed=args.seed,
    )
    print(result.table())
    paths = result.write(out, overwrite=args.overwrite)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0
