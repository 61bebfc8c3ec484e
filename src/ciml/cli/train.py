"""`ciml train`: train one fold of a model on a dataset folder into a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciml.models import model_names
from ciml.threads import SEVERAL_JOBS_HELP
from ciml.training.engine import CPU_DEFAULTS, GPU_DEFAULTS, TrainSettings, train


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task", required=True, help="task preset (brats2020, autopet, hecktor2022) or YAML file"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset folder (any supported layout) or CSV"
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--model", default="ciml", choices=model_names(), help="network to train")
    parser.add_argument("--fold", type=int, default=0, help="fold to train (0-4)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--iterations", type=int, help="optimizer steps (default: epochs x iterations per epoch)"
    )
    length.add_argument("--epochs", type=int, help="epochs of --iterations-per-epoch steps (default 1000)")
    parser.add_argument(
        "--iterations-per-epoch", type=int, default=250, help="steps per epoch (nnU-Net: 250)"
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        help=f"patch size (default: task's on GPU, {CPU_DEFAULTS['patch_size']} on CPU)",
    )
    parser.add_argument(
        "--validation-patch", type=int, nargs=3, help="sliding-window tile for validation (default: --patch)"
    )
    parser.add_argument("--batch-size", type=int, help="patches per step (default 2)")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        help=f"U-Net widths per level (default GPU {GPU_DEFAULTS['widths']}, CPU {CPU_DEFAULTS['widths']})",
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, help="target spacing in mm (default: the data's median)"
    )
    parser.add_argument("--beta", type=float, default=1e-3, help="weight of the KL (bottleneck) term")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (poly decay)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    parser.add_argument(
        "--modality-dropout", type=float, default=0.0, help="chance a batch hides random modalities"
    )
    parser.add_argument(
        "--foreground-fraction", type=float, default=1 / 3, help="share of foreground patches"
    )
    parser.add_argument("--validate-every", type=int, help="steps between validations (default: one epoch)")
    parser.add_argument("--max-validation-cases", type=int, help="validate on at most this many cases")
    parser.add_argument(
        "--layout", default="auto", help="dataset layout: auto, brats, autopet, hecktor, nnunet, csv"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, weights and patches")
    parser.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--resume", action="store_true", help="continue the fold from its last checkpoint")
    parser.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (when installed)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        task=args.task,
        data=args.data,
        out=args.out,
        model=args.model,
        fold=args.fold,
        iterations=args.iterations,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        patch_size=tuple(args.patch) if args.patch else None,
        validation_patch=tuple(args.validation_patch) if args.validation_patch else None,
        batch_size=args.batch_size,
        widths=tuple(args.widths) if args.widths else None,
        target_spacing=tuple(args.spacing) if args.spacing else None,
        beta=args.beta,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        device=args.device,
        layout=args.layout,
        modality_dropout=args.modality_dropout,
        foreground_fraction=args.foreground_fraction,
        validate_every=args.validate_every,
        max_validation_cases=args.max_validation_cases,
        amp=not args.no_amp,
        compile=args.compile,
        resume=args.resume,
        tensorboard=args.tensorboard,
        progress=not args.no_progress,
    )
    run_folder = train(settings)
    print(f"trained fold {args.fold}: {run_folder.fold_dir(args.fold)}")
    return 0
