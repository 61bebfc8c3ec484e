"""`ciml evaluate`: score predicted label maps against references with a challenge's conventions."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciml.cli.options import TASK_HELP, add_overwrite, add_progress, add_task, finish
from ciml.data.layouts import LAYOUTS
from ciml.evaluation.evaluate import (
    CONVENTION_FOR_TASK,
    CONVENTIONS,
    HD95_VARIANTS,
    METRIC_SETS,
    check_outputs,
    evaluate_folders,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    task_defaults = ", ".join(f"{task} -> {conv}" for task, conv in CONVENTION_FOR_TASK.items())
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against references (BraTS, autoPET, HECKTOR conventions)",
        description=(
            "Score a folder of predicted label maps against reference labels, print a summary table, and "
            "write per-case metrics and their summary. BraTS: Dice, HD95 (mm), sensitivity, specificity per "
            "region, with Dice 1 / HD95 0 when both masks are empty and Dice 0 / HD95 373.13 when one is. "
            "BraTS 2023/2024 (and the 2023 SSA, PED, MEN, MET rules): the lesion-wise Dice and HD95 the "
            "challenges rank on (lesions merged by dilation, small reference lesions left out, a "
            "false-positive lesion scores Dice 0 and HD95 374 mm in 2023, 337 mm in 2024) next to the "
            "legacy per-region metrics, with the area-weighted surface HD95 of the official code. "
            "autoPET: Dice, false-positive and false-negative volume (ml). HECKTOR 2022: Dice aggregated "
            "over all cases per class from volumes in mm^3, and its mean."
        ),
    )
    add_task(parser, help=TASK_HELP.replace("dataset.json)", "dataset.json, from --ref)"))
    parser.add_argument(
        "--pred",
        required=True,
        type=Path,
        help="folder of predictions: one <case_id>.nii.gz (or .nii) label map per case, in dataset labels",
    )
    parser.add_argument(
        "--ref",
        required=True,
        type=Path,
        help=(
            "reference labels: a folder of <case_id>.nii.gz files (e.g. labelsTs), a dataset root with "
            "labelsTr/labelsTs (the one holding every predicted case), or any dataset ciml reads (BraTS "
            "<case>/<case>_seg or -seg, autoPET PATIENT/STUDY/SEG.nii.gz, MSD, HECKTOR); spacing comes from "
            "these headers"
        ),
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *LAYOUTS),
        help="layout of --ref when it is read as a dataset; default: auto (detected from the file names)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="JSON file for the summary and per-case metrics (must not exist)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="also write one CSV row per case and region")
    parser.add_argument(
        "--convention",
        choices=sorted(CONVENTIONS),
        default=None,
        help=f"challenge conventions; default from the task name ({task_defaults}; any other task: brats)",
    )
    parser.add_argument(
        "--metrics",
        choices=METRIC_SETS,
        default=None,
        help=(
            "legacy: Dice, HD95, sensitivity, specificity per region; lesionwise: the BraTS 2023+ "
            "lesion-wise Dice/HD95 with TP/FP/FN lesion counts; all: both. Default: the challenge's "
            "(all for BraTS 2023+, legacy otherwise); lesionwise needs a BraTS 2023+ convention"
        ),
    )
    parser.add_argument(
        "--hd95",
        choices=HD95_VARIANTS,
        default=None,
        help=(
            "HD95 definition: voxel (larger directed 95th percentile over voxel-centre surface "
            "distances, as MONAI) or surface (area-weighted surface elements on voxel corners, as the "
            "BraTS 2023+ code). Default: the challenge's (brats2020/2021: voxel, 2023+: surface); "
            "lesion-wise HD95 is always the challenge's"
        ),
    )
    add_overwrite(parser, "existing output files")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    outputs = [args.out] + ([args.csv] if args.csv else [])
    check_outputs(outputs, args.overwrite)  # fail before the (long) evaluation, not after it
    result = evaluate_folders(
        args.pred,
        args.ref,
        args.task,
        convention=args.convention,
        progress=args.progress,
        layout=args.layout,
        metrics=args.metrics,
        hd95=args.hd95,
    )
    print(result.table())
    result.write(args.out, args.csv, overwrite=args.overwrite)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0
