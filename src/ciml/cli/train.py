"""`ciml train`: train one fold of a model on a dataset folder into a run folder."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ciml.cli.options import (
    DefaultsHelpFormatter,
    add_dataset_arguments,
    add_device,
    add_memory_format,
    add_progress,
    add_task,
    channel_flags,
    finish,
)
from ciml.data.augmentation import AUGMENTATIONS, parse_selection
from ciml.inferers import tile_text
from ciml.models import model_names
from ciml.threads import SEVERAL_JOBS_HELP
from ciml.training.engine import CPU_DEFAULTS, GPU_DEFAULTS, TrainSettings, train
from ciml.training.loading import default_workers

DEFAULTS = TrainSettings(task="", data=Path(), out=Path())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a dataset (one fold; resumable; DDP with torchrun)",
        description=(
            "Check the dataset, split it 5-fold by patient (RUN/splits_final.json, editable), preprocess it "
            "once into RUN/preprocessed, and train one fold with patch sampling, writing RUN/fold_K/"
            "{checkpoint_last,checkpoint_best}.pt, log.jsonl and progress.png. Validation is the real "
            "sliding-window Dice on the held-out fold. Multi-GPU/multi-node: "
            "`torchrun --nproc_per_node=N -m ciml.cli train ...` (same options)."
        ),
        epilog=SEVERAL_JOBS_HELP,
        formatter_class=DefaultsHelpFormatter,
    )
    add_task(parser)
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset folder (any layout of README 'Your data') or CSV; every case needs a label",
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--model", default=DEFAULTS.model, choices=model_names(), help="network to train")
    parser.add_argument("--fold", type=int, default=DEFAULTS.fold, help="fold to train (0-4)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--iterations", type=int, help="optimizer steps (default: epochs x iterations per epoch)"
    )
    length.add_argument("--epochs", type=int, help="epochs of --iterations-per-epoch steps (default 1000)")
    parser.add_argument(
        "--iterations-per-epoch",
        type=int,
        default=DEFAULTS.iterations_per_epoch,
        help="steps per epoch (nnU-Net: 250)",
    )
    parser.add_argument(
        "--patch",
        dest="patch_size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help=f"patch size (default: task's on GPU, {CPU_DEFAULTS['patch_size']} on CPU)",
    )
    parser.add_argument(
        "--validation-patch",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="sliding-window tile for validation (default: --patch); also a candidate for the inference tile",
    )
    parser.add_argument("--batch-size", type=int, help="patches per step (default 2)")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        help=f"U-Net widths per level (default GPU {GPU_DEFAULTS['widths']} for joint U-Nets and, for "
        "per-modality segmentors (ciml), the widths of equal forward FLOPs; CPU "
        f"{CPU_DEFAULTS['widths']})",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="device memory in GiB to plan widths, patch and batch for, nnU-Net style (default: the CUDA "
        "device's; on a CPU no planning). Sizes given explicitly are kept, or refused if they cannot fit",
    )
    parser.add_argument(
        "--spacing",
        dest="target_spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="target spacing in mm (default: the data's median)",
    )
    parser.add_argument(
        "--beta", type=float, default=DEFAULTS.beta, help="weight of the KL (bottleneck) term"
    )
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="initial learning rate (poly decay)")
    parser.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=["adamw", "sgd"], help="optimizer")
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=DEFAULTS.modality_dropout,
        help=(
            "chance a batch hides a random proper subset of modalities: CIML skips their segmentors (this "
            "teaches the fallback owners); joint and segresnet see them zero-filled, then run on any subset"
        ),
    )
    parser.add_argument(
        "--foreground-fraction",
        type=float,
        default=DEFAULTS.foreground_fraction,
        help="share of foreground patches",
    )
    parser.add_argument(
        "--augment",
        type=_selection,
        metavar="none|default|NAME[,NAME...]",
        help=f"augmentation of training patches, the same for every model: none; default (nnU-Net's "
        f"transforms and probabilities: all but elastic); or names from {','.join(AUGMENTATIONS)}, "
        "where default,elastic adds to the default (default: the task spec's training.augmentation, "
        "else default)",
    )
    parser.add_argument(
        "--augment-p",
        dest="augment_probability",
        type=_probability,
        nargs="+",
        default=[],
        metavar="NAME=P",
        help="probability of a selected augmentation, e.g. rotation=0.3 gamma=0 (0 switches it off)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help=f"background loader processes making and augmenting batches during the step; 0 makes "
        f"them in the training process (default: CPUs - 1, at most 8; here {default_workers()})",
    )
    parser.add_argument("--validate-every", type=int, help="steps between validations (default: one epoch)")
    parser.add_argument("--max-validation-cases", type=int, help="validate on at most this many cases")
    add_dataset_arguments(parser, task=False)
    add_device(parser, DEFAULTS.device)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of split, weights and patches")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    add_memory_format(parser, DEFAULTS.memory_format)
    parser.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="recompute U-Net stages in backward instead of storing them (less memory, ~1.3x the time)",
    )
    parser.add_argument(
        "--deep-supervision",
        action="store_true",
        help="nnU-Net's deep supervision: auxiliary heads on the coarser decoder scales, loss weighted "
        "1/2^i per scale (U-Net models and CIML's segmentors; not segresnet; off by default)",
    )
    parser.add_argument(
        "--no-tile-choice",
        dest="choose_tile",
        action="store_false",
        help="predict with the training patch, as nnU-Net (default: after training, score the validation "
        "cases with the training patch and with twice it, and keep the better in fold_K/tile.json when it "
        "wins by more than 0.005 mean Dice; InstanceNorm makes the tile matter)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the fold from its last checkpoint")
    parser.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (when installed)")
    add_progress(parser)
    finish(parser, run)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The settings the parsed options name (option dests are TrainSettings fields)."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)
    }
    return TrainSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _selection(text: str) -> str:
    """``--augment``'s value, refused at parse time with the valid names when unknown."""
    try:
        parse_selection(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _probability(text: str) -> tuple[str, float]:
    """``NAME=P`` of ``--augment-p``."""
    name, sep, value = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in AUGMENTATIONS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=P with NAME one of {', '.join(AUGMENTATIONS)}"
        )
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a probability") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: probability must be in [0, 1]")
    return name, p


def run(args: argparse.Namespace) -> int:
    with channel_flags():
        run_folder = train(settings_from_args(args))
    print(f"trained fold {args.fold}: {run_folder.fold_dir(args.fold)}")
    tile = run_folder.read_tile(args.fold)
    if tile is not None:
        patch = tile_text(run_folder.read_info()["patch_size"])
        print(f"inference tile chosen on its validation cases: {tile_text(tile)} (training patch {patch})")
    rule = run_folder.read_postprocessing(args.fold)
    if rule is not None:
        print(f"postprocessing chosen on its validation cases: {rule.describe()}")
    return 0
