"""The plan `ciml train --task brats2020` makes for a GPU budget: widths, patch, batch, estimated peak.

    python benchmarks/plan.py                      # 3, 4, 6, 8, 12, 24 and 80 GiB; bf16 (AMP); ~20 s on a CPU
    python benchmarks/plan.py --gpu-memory 24 --out /tmp/plan.json

Each plan is :func:`ciml.training.planning.plan_training` with no explicit sizes, as `ciml train` calls it
on CUDA (``--gpu-memory GB`` or the device's memory): the task's 128^3 patch and batch 2, nnU-Net's widths
for the joint U-Net and the equal-FLOPs widths for CIML, shrunk until the exact meta-device count of one
training step (bf16 activations, float32 weights, gradients and AdamW state) fits 90 % of the budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from ciml import files
from ciml.training.memory import GIB
from ciml.training.planning import plan_training
from speed import git_commit

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUDGETS = (3.0, 4.0, 6.0, 8.0, 12.0, 24.0, 80.0)
MODELS = ("ciml", "joint")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-memory", type=float, nargs="+", default=list(BUDGETS), help="budgets in GiB")
    parser.add_argument("--task", default="brats2020")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plan.json", help="JSON output")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for model in MODELS:
        for gib in args.gpu_memory:
            plan = plan_training(model, args.task, int(gib * GIB), dtype=torch.bfloat16)
            rows.append({"model": model, "gpu_memory_gib": gib, **plan.as_dict()})
            print(
                f"[{time.perf_counter() - started:5.1f} s] {model} {gib:g} GiB: {plan.summary()}", flush=True
            )
    lines = [
        "| model | GPU memory GiB | patch | batch | widths | estimated peak GiB (bf16) | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["model"],
            f"{r['gpu_memory_gib']:g}",
            "x".join(map(str, r["patch_size"])),
            str(r["batch_size"]),
            "/".join(map(str, r["widths"])),
            f"{r['peak_bytes'] / GIB:.2f}",
            r["reason"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    result = {
        "benchmark": "plan",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "task": args.task,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(args.out, result)
    header = (
        f"# Memory-aware plans of `ciml train --task {args.task}` (`python benchmarks/plan.py`)\n\n"
        f"torch {torch.__version__}, commit {result['git_commit']}, {result['date'][:10]}. No explicit "
        "sizes: the task's patch and batch 2, nnU-Net widths (joint) or equal-FLOPs widths (CIML), shrunk "
        "until the exact meta-device count of one step (bf16 activations; float32 weights, gradients and "
        "AdamW state) fits 90 % of the budget. The peak counts tensors only (no CUDA context, cuDNN "
        "workspace or fragmentation: the 10 % margin is for them).\n\n"
    )
    markdown = args.out.with_suffix(".md")
    files.write_text_atomic(markdown, header + "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {args.out} and {markdown} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
