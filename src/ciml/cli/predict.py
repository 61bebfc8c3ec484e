"""`ciml predict`: label maps for new cases from a trained run, with any subset of its modalities."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ciml.cli.options import (
    add_dataset_arguments,
    add_device,
    add_memory_format,
    add_overwrite,
    add_progress,
    channel_flags,
    finish,
)
from ciml.errors import CimlError
from ciml.inference.predict import InferenceSettings, predict_files, predict_folder
from ciml.inferers import DEFAULT_STEP
from ciml.runs import CHECKPOINTS


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose how a run's networks are applied (shared with `ciml robustness`)."""
    parser.add_argument(
        "--run", required=True, type=Path, help="run folder written by training (run.json, fold_K/)"
    )
    parser.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="last",
        help="which checkpoint of each fold: last (default) or best (best validation score)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="folds to ensemble (probabilities averaged); default: every fold with a checkpoint",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="mirroring test-time augmentation over every axis combination (8x slower in 3D; default off)",
    )
    parser.add_argument(
        "--step",
        type=float,
        default=DEFAULT_STEP,
        help=(
            f"sliding-window step as a fraction of the patch size (default {DEFAULT_STEP}, as nnU-Net; "
            "larger is faster, 1 means no overlap)"
        ),
    )
    parser.add_argument(
        "--patch",
        dest="patch_size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="sliding-window tile size (default: the tile training chose on the validation cases, "
        "fold_K/tile.json: the training patch, as nnU-Net, or twice it where that scored better; the tile "
        "changes InstanceNorm's statistics and so the scores, up or down)",
    )
    add_device(parser)
    add_memory_format(parser)
    add_dataset_arguments(parser, task=False, what="the input cases")


def settings_from_args(args: argparse.Namespace) -> InferenceSettings:
    folds = None if args.folds is None else tuple(args.folds)
    patch = tuple(args.patch_size) if args.patch_size else None
    return InferenceSettings(
        args.checkpoint,
        folds,
        args.tta,
        args.step,
        args.device,
        patch_size=patch,
        memory_format=args.memory_format,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict label maps for new cases with a trained run (any subset of modalities)",
        description=(
            "Predict one label map <case_id>.nii.gz per case: the run's preprocessing, sliding-window "
            "inference with Gaussian weighting, optional mirroring TTA, the mean over the run's folds, and "
            "the result resampled back onto the input's own grid and written with its affine and header, in "
            "the dataset's label values (BraTS: 0/1/2/4). With --modalities, a CIML run predicts from a "
            "subset of its modalities and reads no file of the others; a region whose owning segmentors are "
            "all missing makes it stop with the region's name (no mask is invented). A case folder with "
            "modality files missing stops before the first case, naming the files and the --modalities "
            "every case has; --allow-missing predicts each case from the modalities it has and writes "
            "<case_id>_modalities.json beside its label map. The postprocessing the run chose on its "
            "validation folds (fold_K/postprocessing.json, e.g. a small ET removed) is applied unless "
            "--no-postprocessing. Existing outputs are "
            "kept (finished cases are skipped) unless --overwrite; files are written atomically."
        ),
    )
    add_inference_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        type=Path,
        help="folder of cases in any supported layout (BraTS, autoPET, HECKTOR, nnU-Net) or a CSV list",
    )
    source.add_argument(
        "--files",
        nargs="+",
        metavar="MODALITY=FILE",
        help="a single case given as files, e.g. --files flair=a.nii.gz t1ce=b.nii.gz",
    )
    parser.add_argument(
        "--case-id",
        default=None,
        help="output name for --files (default: the first file's name without its extension)",
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument(
        "--modalities",
        default=None,
        help=(
            "comma-separated subset to predict from, e.g. flair,t1ce (default: all of the task's modalities; "
            "with --files: those given)"
        ),
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help=(
            "predict each case from those of its modalities (or of --modalities) whose files exist, and "
            "record them in <case_id>_modalities.json (default: a missing file stops prediction)"
        ),
    )
    parser.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case_id>_probabilities.nii.gz: float32 region probabilities [X, Y, Z, R]",
    )
    parser.add_argument(
        "--no-postprocessing",
        dest="postprocessing",
        action="store_false",
        help=(
            "write the thresholded network output as it is, without the postprocessing the run chose on its "
            "validation folds (default: apply it; runs without fold_K/postprocessing.json have none)"
        ),
    )
    add_overwrite(
        parser, help="replace existing outputs (default: keep them and skip the cases that have them)"
    )
    add_progress(parser)
    finish(parser, run)


def parse_modalities(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CimlError(f"--modalities: expected comma-separated modality names, got {text!r}")
    return names


def parse_files(items: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for item in items:
        modality, sep, path = item.partition("=")
        if not sep or not modality or not path:
            raise CimlError(f"--files: expected MODALITY=FILE, got {item!r}")
        if modality in files:
            raise CimlError(f"--files: modality {modality!r} given twice")
        files[modality] = Path(path)
    return files


def run(args: argparse.Namespace) -> int:
    options = {
        "settings": dataclasses.replace(settings_from_args(args), postprocessing=args.postprocessing),
        "modalities": parse_modalities(args.modalities),
        "save_probabilities": args.save_probabilities,
        "overwrite": args.overwrite,
        "progress": args.progress,
        "allow_missing": args.allow_missing,
    }
    if args.files is not None:
        results = [
            predict_files(args.run, parse_files(args.files), args.output, case_id=args.case_id, **options)
        ]
    else:
        if args.case_id is not None:
            raise CimlError("--case-id names the case given with --files; it cannot rename --input cases")
        with channel_flags():
            results = predict_folder(
                args.run, args.input, args.output, layout=args.layout, channels=args.channels, **options
            )
    done = [r for r in results if not r.skipped]
    seconds = sum(r.seconds for r in done)
    mean = f", {seconds / len(done):.1f} s per case" if done else ""
    print(
        f"predicted {len(done)} case(s){mean}; skipped {len(results) - len(done)} finished; in {args.output}"
    )
    return 0
