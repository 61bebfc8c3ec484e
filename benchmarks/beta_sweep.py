"""Sweep CIML's bottleneck weight beta on ShapeComposition and record the choice.

Trains `ciml` once per beta with the demo's budget (plus `ciml-beta0` as beta = 0) and prints composite
Dice, selectivity (KL in sender-only shapes / KL in shapes both modalities show), the
complementary/background ratio and the silence of messages into the self-sufficient segmentor.

    python benchmarks/beta_sweep.py --out benchmarks/results/beta_sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import platform
import subprocess
from pathlib import Path

import torch

from ciml.experiments.shapecomposition import ShapeExperimentConfig, run_experiment, write_json


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def sweep_point(method: str, beta: float, args: argparse.Namespace) -> dict:
    """Train and score one (method, beta) point of the sweep."""
    torch.set_num_threads(args.threads)
    config = ShapeExperimentConfig(
        iterations=args.iterations, beta=beta, seed=args.seed, methods=(method,), device=args.device
    )
    result = run_experiment(config, progress=False)["methods"][method]
    ((key, selectivity),) = result["selectivity"].items()
    return {
        "method": method,
        "beta": beta,
        "composite_dice": result["composite_dice"],
        "selectivity": selectivity["selectivity"],
        "specific_over_background": selectivity["specific_over_background"],
        "kl_specific": selectivity["specific"],
        "kl_redundant": selectivity["redundant"],
        "silence": sum(result["silence"].values()),
        "message": key,
        "train_seconds": result["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--betas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--iterations", type=int, default=ShapeExperimentConfig.iterations)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/beta_sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = [("ciml-beta0", 0.0)] + [("ciml", beta) for beta in args.betas]
    jobs = [(method, beta, args) for method, beta in runs]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.starmap(sweep_point, jobs)
    else:
        rows = [sweep_point(*job) for job in jobs]
    print(
        "| beta | composite Dice | selectivity | specific/background | KL specific | KL redundant | silence |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['beta']:g} | {r['composite_dice']:.4f} | {r['selectivity']:.2f} | "
            f"{r['specific_over_background']:.1f} | {r['kl_specific']:.3g} | {r['kl_redundant']:.3g} | "
            f"{r['silence']:.3g} |"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "hardware": _hardware(args.device),
        "iterations": args.iterations,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
