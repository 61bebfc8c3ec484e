"""`ciml check-data`: check a dataset folder before training and list every problem with its file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciml.cli.options import add_dataset_arguments, add_overwrite, add_progress, channel_flags, finish
from ciml.data.integrity import IntegrityReport, check_folder
from ciml.data.layouts import resolve_task
from ciml.errors import CimlError
from ciml.files import refuse_existing, write_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="check a dataset's files (readable, same grid, label values, NaN) before training",
        description=(
            "Read every file of every case of a dataset (fully decompressed) and report, one line per "
            "problem, what is wrong and where: missing, empty, truncated or unreadable files; shape, "
            "spacing, orientation or affine mismatch within a case; NaN/inf voxels; constant images; "
            "label values the task does not know; duplicate case ids. Warnings (label with only "
            "background, case without label) and notes do not fail. Exit code 1 when there is any "
            "error, else 0. Nothing is written unless --json is given."
        ),
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset folder (any layout of README 'Your data') or a CSV list (case_id, modalities, label)",
    )
    add_dataset_arguments(parser)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the report as JSON to this file (default: write nothing)",
    )
    add_overwrite(parser, "an existing --json file")
    parser.add_argument(
        "--require-labels",
        action="store_true",
        help=(
            "treat DATA as a training set: warn about every case without a label and fail when no case "
            "has one (default: warn only when some cases have labels and others do not)"
        ),
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes reading cases in parallel (default: 1)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="list every note too (default: errors and warnings only)"
    )
    add_progress(parser, "--quiet")
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    spec = resolve_task(args.task, args.data, args.layout)
    if args.json is not None:
        refuse_existing([args.json], args.overwrite)
    if args.workers < 1:
        raise CimlError(f"--workers: must be at least 1, got {args.workers}")
    with channel_flags():
        report = check_folder(
            args.data,
            spec,
            args.layout,
            require_labels=True if args.require_labels else None,
            progress=args.progress,
            workers=args.workers,
            channels=args.channels,
        )
    hidden = [] if args.verbose else report.notes
    for problem in report.problems:
        if problem not in hidden:
            print(problem)
    if hidden:
        print(f"{len(hidden)} note(s) not listed (pass --verbose), e.g. {hidden[0]}")
    print(report.summary())
    if args.json is not None:
        write_report_json(report, args.json, task=spec.name)
    return 0 if report.ok else 1


def write_report_json(report: IntegrityReport, path: Path, task: str) -> None:
    """Write the report atomically: a temporary file in the same folder, then a rename."""
    data = {"task": task, **report.to_dict()}
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CimlError(f"{path}: folder {folder} does not exist")
    write_json_atomic(path, data)
