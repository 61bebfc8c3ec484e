"""Time `ciml predict`'s network part on one BraTS-sized case (4 x 240 x 240 x 155), random weights.

Measures what dominates a prediction: sliding-window inference with Gaussian blending (step 0.5, patch
128^3) of a full-width model (default widths 32..320). The image is the uncropped BraTS volume, the
worst case: preprocessing crops real cases to the brain's box (about 140 x 170 x 140), which needs fewer
windows. Reports parameters, forward FLOPs per window (torch's FLOP counter), seconds per window and,
unless --windows-only, the measured time of the whole case (one fold, TTA as chosen).

    python benchmarks/inference_time.py --threads 2 --windows-only     # per window, extrapolated
    python benchmarks/inference_time.py --device cuda --out benchmarks/results/inference_time_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ciml.data.preprocessing import ModalityNormalization, PreprocessingPlan
from ciml.inference import InferenceSettings, Predictor
from ciml.inferers import mirror_axes_combinations
from ciml.models import build_model
from ciml.models.registry import DEFAULT_WIDTHS
from ciml.tasks import load_task


def windows_per_case(shape: tuple[int, ...], patch: int, step: float) -> int:
    """Tiles MONAI's sliding window visits: per axis ceil((size - patch) / (patch * step)) + 1."""
    interval = max(int(patch * step), 1)
    return math.prod(1 if s <= patch else math.ceil((s - patch) / interval) + 1 for s in shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ciml", help="registry name (default ciml)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge (default 128)")
    parser.add_argument("--step", type=float, default=0.5, help="window step, fraction of the patch (0.5)")
    parser.add_argument("--tta", action="store_true", help="mirroring TTA (8 passes per window)")
    parser.add_argument("--windows-only", action="store_true", help="time one window, do not run the case")
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155), help="case shape (BraTS)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    spec = load_task("brats2020")
    torch.manual_seed(0)
    model = build_model(args.model, spec, widths=DEFAULT_WIDTHS, spatial_dims=3).eval()
    patch = (args.patch,) * 3
    window = torch.randn(1, len(spec.modalities), *patch)
    small = torch.randn(1, len(spec.modalities), 32, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(small)  # FLOPs grow with voxels: count at 32^3 and scale
    flops = counter.get_total_flops() * (args.patch / 32) ** 3
    model.to(device)
    settings = InferenceSettings(tta=args.tta, step=args.step, device=args.device)
    plan = PreprocessingPlan(
        dict(spec.modalities),
        (1.0, 1.0, 1.0),
        {m: ModalityNormalization("zscore_nonzero") for m in spec.modalities},
    )
    predictor = Predictor(spec, plan, [model], patch, settings)
    passes = len(mirror_axes_combinations(3)) if args.tta else 1

    predictor.probabilities(window[0].numpy())  # warm-up (cuDNN autotuning, allocator)
    _sync(device)
    start = time.perf_counter()
    predictor.probabilities(window[0].numpy())
    _sync(device)
    per_window = time.perf_counter() - start
    n_windows = windows_per_case(tuple(args.shape), args.patch, args.step)
    result = {
        "model": args.model,
        "widths": list(DEFAULT_WIDTHS),
        "device": _hardware(device),
        "torch": torch.__version__,
        "bf16_autocast": device.type == "cuda",
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_TFLOP_per_window": flops / 1e12,
        "patch": args.patch,
        "step": args.step,
        "tta_passes": passes,
        "case_shape": list(args.shape),
        "windows_per_case": n_windows,
        "seconds_per_window": per_window,
        "extrapolated_case_seconds": per_window * n_windows,
        "measured_case_seconds": None,
    }
    print(json.dumps(result, indent=2), flush=True)
    if not args.windows_only:
        image = np.random.default_rng(0).normal(size=(4, *args.shape)).astype(np.float32)
        start = time.perf_counter()
        predictor.probabilities(image)
        _sync(device)
        result["measured_case_seconds"] = time.perf_counter() - start
        print(f"measured case: {result['measured_case_seconds']:.1f} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
