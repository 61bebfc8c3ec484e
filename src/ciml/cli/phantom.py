"""`ciml phantom`: write realistic phantom datasets in the layouts of BraTS2020, autoPET and HECKTOR 2022."""

from __future__ import annotations

import argparse

from ciml.cli.options import add_overwrite, add_progress, finish
from ciml.data.phantoms import PHANTOMS, phantom_generator
from ciml.errors import CimlError

# Dataset -> (name, layout written under --out), for the final report line.
_LAYOUTS = {
    "brats": ("BraTS2020", "BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii.gz"),
    "autopet": ("autoPET", "PETCT_<hash>/<study>/{SUV,CTres,SEG}.nii.gz"),
    "hecktor": ("HECKTOR 2022", "imagesTr/<ID>__{CT,PT}.nii.gz, labelsTr/<ID>.nii.gz"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write a realistic phantom dataset in a real dataset's layout",
        description=(
            "Generate phantom cases with exact labels in the file layout of a real dataset, to try "
            "ciml end to end without downloading data. brats: MRI brain tumours (FLAIR, T1, T1CE, T2; "
            "labels 1 necrosis, 2 edema, 4 enhancing) on the MNI ICBM152 anatomy that nilearn ships. "
            "autopet: whole-body FDG PET (SUV) and CT (HU), label 1 lesion, some patients with a "
            "follow-up study. hecktor: head and neck PET/CT, PET on a coarser grid than CT, labels "
            "1 GTVp, 2 GTVn. The same --seed always gives the same cases."
        ),
    )
    parser.add_argument(
        "dataset", choices=list(PHANTOMS), help="which dataset's layout and content to imitate"
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--cases", type=int, required=True, help="number of cases (autopet: studies) to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--spacing",
        type=float,
        choices=[1.0, 2.0, 3.0],
        default=None,
        metavar="{1,2,3}",
        help="brats only: voxel size in mm; 1 = BraTS's 240x240x155 grid, 2 = 120x120x78 (8x less work), "
        "3 = 80x80x52 (27x less) (default: 1)",
    )
    add_overwrite(
        parser,
        help="replace existing files; without it, existing non-empty case folders or files stop the run "
        "before anything is written",
    )
    add_progress(parser)
    finish(parser, run)


def run(args: argparse.Namespace) -> int:
    options = {"overwrite": args.overwrite, "progress": args.progress}
    if args.spacing is not None:
        if args.dataset != "brats":
            raise CimlError(f"--spacing applies to brats only, not {args.dataset}")
        options["spacing_mm"] = args.spacing
    cases = phantom_generator(args.dataset)(args.out, args.cases, args.seed, **options)
    name, layout = _LAYOUTS[args.dataset]
    detail = ""
    if args.dataset == "brats":
        detail = f" at {options.get('spacing_mm', 1.0):g} mm"
    elif args.dataset == "autopet":
        detail = f" from {len({case.patient for case in cases})} patients"
    noun = "case" if len(cases) == 1 else "cases"
    print(f"wrote {len(cases)} {name} phantom {noun}{detail} to {args.out} ({layout})")
    return 0
