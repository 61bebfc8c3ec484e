"""`ciml explain`: which modality contributed where (Grad-CAM) and what each message carried (KL maps)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ciml.cli.options import add_device, add_overwrite, add_progress, finish
from ciml.data.layouts import LAYOUTS
from ciml.explain import CAMS, EXTENTS, GRADCAM, explain_cases
from ciml.inference import InferenceSettings
from ciml.runs import CHECKPOINTS


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that pick the explained network (shared with `ciml report`)."""
    parser.add_argument(
        "--fold", type=int, default=None, help="fold whose network is explained (default: the first trained)"
    )
    parser.add_argument(
        "--checkpoint", choices=CHECKPOINTS, default="last", help="last (default) or best checkpoint"
    )
    add_device(parser)


def network_settings(args: argparse.Namespace) -> InferenceSettings:
    """The explained network as prediction settings (one vocabulary for choosing a run's network)."""
    folds = None if args.fold is None else (args.fold,)
    return InferenceSettings(checkpoint=args.checkpoint, folds=folds, device=args.device)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM and information maps of a run on some cases (NIfTI, PNG and JSON)",
        description=(
            "For every segmentor and region: Grad-CAM maps of each modality's contribution (gradient of the "
            "region's logits inside its predicted mask with respect to each modality's encoder features) and "
            "each modality's share; for every message receiver<-sender: the information map (KL, nats per "
            "voxel, summed over levels), whose mean is the message's share of the loss's KL term. Writes "
            "OUT/<case>/ gradcam_<segmentor>_<region>_from_<modality>.nii.gz and "
            "info_<receiver>_from_<sender>.nii.gz on the case's own grid (overlay them in any viewer), "
            "gradcam.png, information.png, contributions.png (slices through the tumour, share bar chart) "
            "and explanation.json. Joint networks are explained by input-gradient x input per channel; "
            "ensembles per region on each member's own encoder; explanation.json says which."
        ),
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder written by training")
    parser.add_argument(
        "--case", nargs="+", required=True, metavar="ID", help="case id(s) to explain, as in the dataset"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per case)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset holding the cases, any supported layout (default: the run's training data)",
    )
    parser.add_argument(
        "--layout",
        default=None,
        choices=("auto", *LAYOUTS),
        help="layout of --data (default: auto-detect; the run's own layout for its data)",
    )
    add_network_arguments(parser)
    parser.add_argument(
        "--level",
        type=int,
        default=None,
        help=(
            "encoder level of Grad-CAM, 0 = full resolution (default: the shallowest message level, 0 for "
            "CIML: a level sees only messages entering there or deeper; 1 for networks without messages)"
        ),
    )
    parser.add_argument(
        "--cam",
        choices=tuple(CAMS),
        default=GRADCAM,
        help="gradcam (default; channel weight: mean gradient) or hirescam (gradient x features per voxel)",
    )
    parser.add_argument(
        "--extent",
        choices=EXTENTS,
        default="auto",
        help=(
            "case: the whole preprocessed case in one pass; patch: a window of the run's patch size centred "
            "on the predicted tumour; auto (default): the whole case when it fits --max-voxels"
        ),
    )
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=None,
        help="voxel budget of --extent auto (default: what fits in about 4 GB for this network)",
    )
    add_overwrite(parser, "existing explanations")
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    summaries = explain_cases(
        args.run,
        args.case,
        args.out,
        data=args.data,
        layout=args.layout,
        settings=network_settings(args),
        level=args.level,
        cam=args.cam,
        extent=args.extent,
        max_voxels=args.max_voxels,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    for summary in summaries:
        print(f"{summary['case_id']}: {summary['method']}, {summary['extent']} -> {summary['folder']}")
        for c in summary["contributions"]:
            shares = ", ".join(f"{m} {100 * v:.0f}%" for m, v in c["fractions"].items())
            print(f"  {c['segmentor']}:{c['region']}: {shares}")
    print(f"explained {len(summaries)} case(s) in {time.perf_counter() - started:.1f} s")
    return 0
