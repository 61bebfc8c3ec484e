"""Training iterations per second of CIML and the joint U-Net at the CPU demo's settings, same run.

    python benchmarks/demo_step_time.py [--threads 2] [--steps 10]

Uses `ciml demo`'s defaults (patch, batch, widths) on random 4-modality BraTS patches; prints a table
with the ratio to joint and writes benchmarks/results/demo_step_time.json.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from ciml.experiments.brain_demo import BrainDemoConfig
from ciml.files import write_json_atomic
from ciml.models import build_model
from ciml.tasks import load_task
from ciml.training import Batch, TrainConfig, Trainer


def seconds_per_step(name: str, config: BrainDemoConfig, steps: int, warmup: int = 2) -> float:
    spec = load_task("brats2020")
    torch.manual_seed(0)
    model = build_model(name, spec, widths=config.widths, spatial_dims=3)
    shape = (config.batch_size, len(spec.modalities), *config.patch_size)
    batch = Batch(
        torch.randn(shape), (torch.rand(shape[0], len(spec.regions), *config.patch_size) > 0.7).float()
    )
    settings = TrainConfig(iterations=steps + warmup, region_names=list(spec.region_names), device="cpu")
    trainer = Trainer(model, settings, lambda i: batch)
    times = []
    for i in range(steps + warmup):
        started = time.perf_counter()
        trainer.step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_step_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BrainDemoConfig()
    rows = {name: seconds_per_step(name, config, args.steps) for name in ("joint", "ciml")}
    print(f"patch {config.patch_size}, batch {config.batch_size}, widths {config.widths}")
    print(f"torch threads: {args.threads}")
    print("| model | s/step | it/s | ratio to joint |\n|---|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {1 / seconds:.2f} | {seconds / rows['joint']:.2f} |")
    write_json_atomic(
        args.out,
        {
            "date": datetime.date.today().isoformat(),
            "hardware": f"{platform.machine()} CPU, {args.threads} torch threads",
            "settings": {"patch": config.patch_size, "batch": config.batch_size, "widths": config.widths},
            "seconds_per_step": rows,
        },
    )


if __name__ == "__main__":
    main()
