"""Memory of one BraTS training step for every network, counted exactly on the meta device.

    python benchmarks/memory.py                 # 128^3, batch 2, fp32 (+ bf16 rows); ~1 min on a CPU
    python benchmarks/memory.py --patch 64 --batch 1 --out /tmp/m.json   # any size

Nothing is allocated or computed: each network and its batch are built on PyTorch's ``meta`` device and
one training forward (CIML loss) and backward run there (:mod:`ciml.training.memory`). Per network:
the bytes autograd saves for backward (each storage once; parameters excluded), the bytes alive when
the loss is ready (what checkpointing keeps counts here), the peak of live tensors over forward and
backward plus AdamW's two states per parameter, and, to compare with the issue's figures, the plain
sum of every saved tensor's size (storages shared by several saved tensors counted each time, weights
included). Ratios are to the joint U-Net of the same run. CIML's "equal FLOPs" widths are searched as in
ciml.training.planning (as `ciml train` does), so its forward FLOPs, gates included, equal the joint U-Net's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciml import files
from ciml.losses import CIMLLoss
from ciml.models import build_model
from ciml.tasks import load_task
from ciml.training.memory import GIB, _as_output, count_step, in_dtype
from ciml.training.planning import NNUNET_WIDTHS
from ciml.training.planning import match_widths as match_ciml_widths
from speed import git_commit

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One row: a network, its widths and options, and the activation dtype it is counted in."""

    label: str
    name: str
    widths: tuple[int, ...]
    options: dict[str, Any]
    dtype: torch.dtype = torch.float32


def plain_saved_sum(model: nn.Module, x: torch.Tensor, target: torch.Tensor, regions: Sequence[str]) -> int:
    """Every saved tensor's bytes, shared storages and weights counted each time (the issue's count)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        CIMLLoss(regions, beta=1e-3)(_as_output(model(x), regions), target)
    return total


def count(case: Case, patch: int, batch: int) -> dict[str, Any]:
    spec = load_task("brats2020")
    shape = (batch, len(spec.modality_names), *(patch,) * 3)

    def build() -> nn.Module:
        model = build_model(case.name, spec, widths=case.widths)
        for key, value in case.options.items():
            setattr(model, key, value)
        return model

    with torch.device("meta"):
        x, target = torch.empty(shape), torch.empty((batch, len(spec.region_names), *(patch,) * 3))
        memory = count_step(build(), x, target, spec.region_names, activation_dtype=case.dtype)
        model = in_dtype(build(), case.dtype)
        plain = plain_saved_sum(model, x.to(case.dtype), target, spec.region_names)
    return {
        "label": case.label,
        "network": case.name,
        "widths": list(case.widths),
        "options": case.options,
        "activations": str(case.dtype).removeprefix("torch."),
        **memory.as_dict(),
        "plain_saved_sum_bytes": plain,
    }


def cases(ciml_widths: tuple[int, ...]) -> list[Case]:
    full = NNUNET_WIDTHS
    rows = [
        Case("joint U-Net, nnU-Net widths", "joint", full, {}),
        Case("CIML, equal FLOPs (default)", "ciml", ciml_widths, {}),
        Case(
            "CIML, equal FLOPs, gate tensors kept (before #13)",
            "ciml",
            ciml_widths,
            {"recompute_gates": False},
        ),
        Case("segmentors only (ciml-nomsg), equal FLOPs", "ciml-nomsg", ciml_widths, {}),
        Case(
            "CIML, equal FLOPs, --checkpoint-activations",
            "ciml",
            ciml_widths,
            {"checkpoint_activations": True},
        ),
        Case("joint U-Net, --checkpoint-activations", "joint", full, {"checkpoint_activations": True}),
        Case("CIML, 32..320 per segmentor", "ciml", full, {}),
        Case("CIML, 32..320 per segmentor, gate tensors kept", "ciml", full, {"recompute_gates": False}),
        Case("ensemble, 32..320 per member", "ensemble", full, {}),
        Case("joint U-Net, bf16 activations", "joint", full, {}, torch.bfloat16),
        Case("CIML, equal FLOPs, bf16 activations", "ciml", ciml_widths, {}, torch.bfloat16),
    ]
    probe = build_model("ciml", "brats2020", widths=(4, 8))
    if not hasattr(probe, "checkpoint_activations"):
        rows = [r for r in rows if "checkpoint_activations" not in r.options]
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    joint = {r["activations"]: r for r in rows if r["network"] == "joint" and not r["options"]}
    nomsg = next(r for r in rows if r["network"] == "ciml-nomsg")
    for row in rows:
        reference = joint[row["activations"]]
        for key in ("saved_bytes", "live_after_forward_bytes", "peak_bytes", "plain_saved_sum_bytes"):
            row[key.removesuffix("_bytes") + "_ratio"] = row[key] / reference[key]
        comparable = "checkpoint_activations" not in row["options"] and row["activations"] == "float32"
        if row["network"] == "ciml" and row["widths"] == nomsg["widths"] and comparable:
            gates = row["live_after_forward_bytes"] - nomsg["live_after_forward_bytes"]
            row["gates_live_after_forward_bytes"] = gates
            row["gates_share_of_segmentors"] = gates / nomsg["live_after_forward_bytes"]
            row["gates_peak_bytes"] = row["peak_bytes"] - nomsg["peak_bytes"]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | widths | saved for backward GiB (x joint) | live after forward GiB (x joint) "
        "| peak GiB incl. AdamW (x joint) | gates, % of segmentors "
        "| issue's count: plain sum GiB (x joint) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("gates_share_of_segmentors")
        cells = [
            r["label"],
            "/".join(map(str, r["widths"])),
            f"{r['saved_bytes'] / GIB:.2f} ({r['saved_ratio']:.2f})",
            f"{r['live_after_forward_bytes'] / GIB:.2f} ({r['live_after_forward_ratio']:.2f})",
            f"{r['peak_bytes'] / GIB:.2f} ({r['peak_ratio']:.2f})",
            "-" if share is None else f"{100 * share:.1f} %",
            f"{r['plain_saved_sum_bytes'] / GIB:.2f} ({r['plain_saved_sum_ratio']:.2f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="patches per step (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json", help="JSON output")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    spec = load_task("brats2020")
    flops_shape = (args.batch, len(spec.modality_names), *(args.patch,) * 3)
    ciml_widths, ciml_flops, joint_flops = match_ciml_widths(spec, NNUNET_WIDTHS, flops_shape)
    print(f"equal FLOPs: joint {NNUNET_WIDTHS} {joint_flops / 1e9:.0f} GFLOP, ciml {ciml_widths} "
          f"{ciml_flops / 1e9:.0f} GFLOP per forward", flush=True)  # fmt: skip
    rows = []
    for case in cases(ciml_widths):
        rows.append(count(case, args.patch, args.batch))
        print(f"[{time.perf_counter() - started:5.1f} s] {case.label}: "
              f"saved {rows[-1]['saved_bytes'] / GIB:.2f} GiB, peak {rows[-1]['peak_bytes'] / GIB:.2f} GiB",
              flush=True)  # fmt: skip
    add_ratios(rows)
    table = markdown(rows)
    result = {
        "benchmark": "memory",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "patch": args.patch,
        "batch": args.batch,
        "ciml_equal_flops_widths": list(ciml_widths),
        "gflops": {"joint": joint_flops / 1e9, "ciml": ciml_flops / 1e9},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(args.out, result)
    header = (
        f"# Training-step memory, counted on the meta device (`python benchmarks/memory.py`)\n\n"
        f"BraTS (4 modalities, 3 regions), patch {args.patch}^3, batch {args.batch}, AdamW, CIML loss; "
        f"torch {torch.__version__}, commit {result['git_commit']}, {result['date'][:10]}. Exact counts "
        f"from shapes alone (no GPU needed; the same on any machine). CIML at equal FLOPs: widths "
        f"{'/'.join(map(str, ciml_widths))} ({ciml_flops / 1e9:.0f} vs {joint_flops / 1e9:.0f} GFLOP "
        f"per forward). Ratios to the joint U-Net of the same dtype. The peak is tensors only (no "
        f"allocator fragmentation, cuDNN workspace or CUDA context). bf16 rows run the whole forward "
        f"in bf16 (float32 weights, gradients, AdamW state): an estimate of autocast.\n\n"
    )
    markdown_path = args.out.with_suffix(".md")
    files.write_text_atomic(markdown_path, header + table + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out} and {markdown_path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
