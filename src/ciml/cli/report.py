"""`ciml report`: one self-contained HTML page of a run (results, overlays, explanations, settings)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ciml.cli.explain import add_network_arguments, network_settings
from ciml.cli.options import add_overwrite, add_progress, finish
from ciml.data.layouts import LAYOUTS
from ciml.report import write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained HTML report of a run (opens from disk, no server, no network)",
        description=(
            "Write one HTML page with the evaluation table (--pred and --ref), per-case overlays (input "
            "modalities, reference, prediction, errors), the explanations (Grad-CAM shares and information "
            "maps; from --explanations or computed for --explain-cases cases), the robustness table when "
            "`ciml robustness` wrote one, the training curves and the run's configuration and task "
            "decomposition. Images are embedded; there is no script and no external link."
        ),
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder written by training")
    parser.add_argument(
        "--out", type=Path, default=None, help="the HTML file to write (default: RUN/report.html)"
    )
    parser.add_argument(
        "--pred",
        dest="pred_dir",
        type=Path,
        default=None,
        help="folder of predicted label maps <case>.nii.gz (with --ref)",
    )
    parser.add_argument(
        "--ref",
        dest="ref_dir",
        type=Path,
        default=None,
        help="references for --pred: <case>.nii.gz files, labelsTr/, or a dataset folder (whose images "
        "then appear in the overlays)",
    )
    parser.add_argument(
        "--layout", default="auto", choices=("auto", *LAYOUTS), help="layout of --ref (default: auto)"
    )
    parser.add_argument(
        "--explanations",
        type=Path,
        default=None,
        help="folder written by `ciml explain --out` to embed (default: explain --explain-cases cases now)",
    )
    parser.add_argument(
        "--explain-cases",
        type=int,
        default=1,
        help="without --explanations, explain this many cases now: the first evaluated ones, else the "
        "run's own data (default: 1; 0 skips)",
    )
    parser.add_argument(
        "--robustness",
        type=Path,
        default=None,
        help="robustness.json of `ciml robustness` (default: RUN/robustness/robustness.json if present)",
    )
    parser.add_argument(
        "--max-cases",
        type=int,
        default=3,
        help="cases shown with overlays and from --explanations (default 3)",
    )
    add_network_arguments(parser)
    add_overwrite(parser, "an existing report")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = write_report(
        args.run,
        args.out if args.out is not None else args.run / "report.html",
        pred_dir=args.pred_dir,
        ref_dir=args.ref_dir,
        explanations=args.explanations,
        robustness=args.robustness,
        explain_cases=args.explain_cases,
        max_cases=args.max_cases,
        layout=args.layout,
        settings=network_settings(args),
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0
