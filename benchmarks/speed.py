"""Speed of CIML against the joint U-Net, MONAI's DynUNet and SegResNet on BraTS, in one process.

For each network, at the same patch: forward FLOPs (torch's FlopCounterMode, convolutions and matrix
products only), milliseconds per training step (forward + CIML loss + backward + AdamW, built as
`ciml train` builds it), peak memory of a training step and the time of sliding-window inference on
one case (Gaussian blending, step 0.5). CIML's segmentor widths are searched so that its forward FLOPs
match the joint U-Net's: the comparison is at equal arithmetic, so any gap is efficiency (narrow
convolutions, many small kernels), not work.
Ratios are to the joint U-Net measured in the same run, so they survive a busy or different machine.

    python benchmarks/speed.py                          # cuda if available: 128^3, batch 2, bf16
    python benchmarks/speed.py --device cpu             # 48^3, batch 1, small case (4x96x96x64)
    python benchmarks/speed.py --device cuda --compile  # also torch.compile'd joint and ciml
    python benchmarks/speed.py --quick --device cpu --out /tmp/speed.json   # smoke test, seconds

Peak memory of one training step after warm-up (weights, gradients, AdamW state, inputs, activations):
on CUDA torch.cuda.max_memory_allocated minus what was allocated before the model was built; on the CPU,
which has no allocator counter, the bytes of live tensor storages counted op by op over one extra,
untimed step (the process-wide ru_maxrss is recorded too, but it only grows and mixes every network).
On a busy CPU, --threads 1 avoids OpenMP threads waiting on each other (--quick uses 1 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from torch import nn

from ciml import files
from ciml.errors import CimlError
from ciml.inferers import SIGMA_SCALE, sliding_window_probabilities
from ciml.losses import CIMLLoss
from ciml.models import SegmentationOutput, build_model
from ciml.tasks import TaskSpec, load_task
from ciml.training import TrainConfig, make_optimizer
from ciml.training.memory import LiveTensorBytes
from ciml.training.planning import NNUNET_WIDTHS, forward_flops
from ciml.training.planning import match_widths as match_ciml_widths

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: MONAI's BraTS tutorial SegResNet: init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1).
SEGRESNET_TUTORIAL_WIDTHS = (16, 32, 64, 128)
BRATS_CASE = (240, 240, 155)
BETA = 1e-3
COMPILED = " (compiled)"


@dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers; stored in the JSON next to them."""

    device: str
    patch: int
    batch: int
    joint_widths: tuple[int, ...]
    segresnet_widths: tuple[int, ...]
    warmup: int
    repeats: int
    inference_warmup: int
    inference_repeats: int
    case_shape: tuple[int, int, int]
    bf16: bool
    compile: bool
    compiled_inference: bool = True
    networks: tuple[str, ...] = ()  # empty: all
    step: float = 0.5
    beta: float = BETA
    case_note: str = ""


@dataclass
class Row:
    """One network's measurements; ratios are to the joint U-Net of the same run (None: not measured)."""

    network: str
    widths: list[int]
    params: int
    fwd_gflops: float
    ms_per_step: float | None = None
    peak_mem_mb: float | None = None
    inference_s: float | None = None
    first_step_s: float | None = None
    step_ratio: float | None = None
    mem_ratio: float | None = None
    inference_ratio: float | None = None
    reference: str = "joint"
    note: str = ""


@dataclass(frozen=True)
class Network:
    """How to build one network under test and which sliding-window path serves it."""

    name: str
    kind: str  # the architecture: a compiled variant shares its eager twin's kind (and FLOPs)
    build: Callable[[], nn.Module]
    widths: tuple[int, ...]
    ciml_output: bool = True  # SegmentationOutput (ciml's path) or a plain logits tensor (MONAI's path)
    compiled: bool = False


def settings_for(
    device: str, quick: bool = False, full_case: bool = False, compile_models: bool = False
) -> Settings:
    """The preset for ``device``: the design's GPU anchors on CUDA, a few minutes on 2 CPU cores."""
    if device == "cuda":
        settings = Settings(
            device="cuda",
            patch=128,
            batch=2,
            joint_widths=NNUNET_WIDTHS,
            segresnet_widths=SEGRESNET_TUTORIAL_WIDTHS,
            warmup=3,
            repeats=10,
            inference_warmup=1,
            inference_repeats=3,
            case_shape=BRATS_CASE,
            bf16=True,
            compile=compile_models,
            case_note="full BraTS case",
        )
    else:
        small = not full_case
        settings = Settings(
            device="cpu",
            patch=48,
            batch=1,
            joint_widths=(16, 32, 64, 128),
            segresnet_widths=SEGRESNET_TUTORIAL_WIDTHS,
            warmup=2,
            repeats=5,
            inference_warmup=0,
            inference_repeats=2 if small else 1,
            case_shape=(96, 96, 64) if small else BRATS_CASE,
            bf16=False,
            compile=compile_models,
            case_note="small CPU case, not the full BraTS case" if small else "full BraTS case",
        )
    if quick:
        settings = replace(
            settings,
            patch=16,
            batch=1,
            joint_widths=(4, 8, 16),
            segresnet_widths=(4, 8, 16),
            warmup=1,
            repeats=1,
            inference_warmup=0,
            inference_repeats=1,
            case_shape=(32, 32, 24),
            case_note="tiny smoke-test case (--quick)",
        )
    return settings


# forward_flops and the equal-FLOPs width search (match_ciml_widths) live in the library, in
# ciml.training.planning, which `ciml train` plans with.


# ----------------------------------------------------------------------------------------- networks


def dynunet(in_channels: int, out_channels: int, widths: Sequence[int]) -> DynUNet:
    """MONAI's DynUNet as nnU-Net configures it: kernel 3, stride 2 below the first level, no deep sup."""
    strides = [1] + [2] * (len(widths) - 1)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * len(widths),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(widths),
    )


def networks(spec: TaskSpec, settings: Settings, ciml_widths: tuple[int, ...]) -> list[Network]:
    """The networks under test, joint first (eager ratios refer to it, compiled ones to the compiled joint).

    ``ciml`` is the default grouped form (:mod:`ciml.models.grouped`); ``ciml (per-segmentor)`` is the
    same model run segmentor by segmentor, the naive form the grouped one replaces.
    """
    n_mod, n_reg = len(spec.modality_names), len(spec.region_names)
    joint_w, seg_w = settings.joint_widths, settings.segresnet_widths

    def ciml_per_segmentor() -> nn.Module:
        model = build_model("ciml", spec, widths=ciml_widths)
        model.grouped = False
        return model

    nets = [
        Network("joint", "joint", lambda: build_model("joint", spec, widths=joint_w), joint_w),
        Network("ciml", "ciml", lambda: build_model("ciml", spec, widths=ciml_widths), ciml_widths),
        Network("ciml (per-segmentor)", "ciml", ciml_per_segmentor, ciml_widths),
        Network("dynunet", "dynunet", lambda: dynunet(n_mod, n_reg, joint_w), joint_w, ciml_output=False),
        Network("segresnet", "segresnet", lambda: build_model("segresnet", spec, widths=seg_w), seg_w),
    ]
    if settings.compile:
        nets += [replace(net, name=net.name + COMPILED, compiled=True) for net in nets[:2]]
    if settings.networks:
        unknown = sorted(set(settings.networks) - {net.name for net in nets})
        if unknown:
            raise CimlError(f"--networks: unknown {unknown}; choose from {[net.name for net in nets]}")
        nets = [net for net in nets if net.name == "joint" or net.name in settings.networks]
    return nets


def as_output(out: torch.Tensor | SegmentationOutput, regions: Sequence[str]) -> SegmentationOutput:
    """A plain network's logits as a SegmentationOutput, so every network trains on the same loss."""
    if isinstance(out, SegmentationOutput):
        return out
    return SegmentationOutput(
        logits={"net": out}, owned={"net": tuple(regions)}, kl=out.new_zeros((), dtype=torch.float32)
    )


# ------------------------------------------------------------------------------------------- timing


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    """bf16 autocast where the settings ask for it (CUDA), nothing otherwise."""
    if settings.bf16:
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn`` takes: CUDA events on the GPU (work is asynchronous), a host clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def training_peak_mb(
    step: Callable[[], None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Sequence[torch.Tensor],
    cuda_baseline: int,
) -> float:
    """Peak MB of tensors alive during one training step: weights, gradients, AdamW state, activations.

    On CUDA the allocator's peak, minus ``cuda_baseline`` (what was held before the model was built).
    On the CPU the count slows the step down, so it is one extra step, kept out of the timed ones.
    """
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - cuda_baseline) / 2**20
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    with LiveTensorBytes([*model.parameters(), *model.buffers(), *state, *tensors]) as counter:
        step()  # starts with zero_grad(set_to_none=True): the previous gradients are gone, not counted
    return counter.peak / 2**20


def measure_training(
    model: nn.Module, spec: TaskSpec, settings: Settings, cuda_baseline: int
) -> tuple[float, float, float]:
    """Time AdamW training steps on random inputs and random binary region targets.

    Returns:
        (median seconds per step, peak MB of one step (see :func:`training_peak_mb`), seconds of the
        first step, which holds lazy initialisation, cuDNN autotuning and, for compiled models,
        compilation).
    """
    device = settings.device
    regions = spec.region_names
    shape = (settings.batch, len(spec.modality_names), *(settings.patch,) * 3)
    x = torch.randn(shape, device=device)
    target = (torch.rand((settings.batch, len(regions), *shape[2:]), device=device) > 0.5).float()
    loss_fn = CIMLLoss(regions, beta=settings.beta)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(settings):
            loss = loss_fn(as_output(model(x), regions), target).total
        loss.backward()
        optimizer.step()

    first = timed(step, device)
    for _ in range(settings.warmup - 1):
        step()
    peak_mb = training_peak_mb(step, model, optimizer, (x, target), cuda_baseline)
    times = [timed(step, device) for _ in range(settings.repeats)]
    return statistics.median(times), peak_mb, first


def measure_inference(model: nn.Module, spec: TaskSpec, settings: Settings, ciml_output: bool) -> float:
    """Median seconds of sliding-window inference (Gaussian, step 0.5) over one random case."""
    device = settings.device
    image = torch.randn((1, len(spec.modality_names), *settings.case_shape), device=device)
    patch = (settings.patch,) * 3
    model.eval()

    def ciml_path() -> torch.Tensor:
        return sliding_window_probabilities(
            model, image, spec.region_names, patch, step=settings.step, device=device
        )

    def monai_path() -> torch.Tensor:
        def predictor(tiles: torch.Tensor) -> torch.Tensor:
            with autocast(settings):
                return torch.sigmoid(model(tiles).float())

        with torch.inference_mode():
            return sliding_window_inference(
                image,
                roi_size=patch,
                sw_batch_size=1,
                predictor=predictor,
                overlap=1.0 - settings.step,
                mode="gaussian",
                sigma_scale=SIGMA_SCALE,
            )

    run = ciml_path if ciml_output else monai_path
    for _ in range(settings.inference_warmup):
        run()
    return statistics.median(timed(run, device) for _ in range(settings.inference_repeats))


def release_memory(device: str) -> None:
    """Free the previous network before measuring the next one."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(net: Network, spec: TaskSpec, settings: Settings, flops: int) -> Row:
    """Every measurement of one network; a failure (out of memory, compiler) is recorded, not raised."""
    release_memory(settings.device)
    cuda_baseline = torch.cuda.memory_allocated() if settings.device == "cuda" else 0
    torch.manual_seed(0)
    model = net.build().to(settings.device)
    row = Row(net.name, list(net.widths), sum(p.numel() for p in model.parameters()), flops / 1e9)
    runnable = torch.compile(model) if net.compiled else model
    recoverable: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
    if net.compiled:
        recoverable = (Exception,)  # a missing compiler toolchain must not cost the eager results
    try:
        row.ms_per_step, row.peak_mem_mb, row.first_step_s = measure_training(
            runnable, spec, settings, cuda_baseline
        )
        row.ms_per_step *= 1e3
        if net.compiled:
            row.note = "first step includes compilation"
        if settings.compiled_inference or not net.compiled:
            row.inference_s = measure_inference(runnable, spec, settings, net.ciml_output)
    except recoverable as error:
        row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    del model, runnable
    release_memory(settings.device)
    return row


def add_ratios(rows: list[Row]) -> None:
    """Fill each row's ratios to the joint U-Net's row of the same run (compiled rows: the compiled joint)."""
    by_name = {r.network: r for r in rows}

    def ratio(value: float | None, reference: float | None) -> float | None:
        return None if value is None or not reference else value / reference

    for row in rows:
        compiled = row.network.endswith(COMPILED)
        joint = by_name.get("joint" + COMPILED if compiled else "joint", by_name["joint"])
        row.reference = joint.network
        row.step_ratio = ratio(row.ms_per_step, joint.ms_per_step)
        row.mem_ratio = ratio(row.peak_mem_mb, joint.peak_mem_mb)
        row.inference_ratio = ratio(row.inference_s, joint.inference_s)


# ------------------------------------------------------------------------------------------- output


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table; '-' where a number was not measured."""

    def fmt(value: float | None, spec: str = "") -> str:
        if value is None:
            return "-"
        return format(value, spec or (".0f" if abs(value) >= 100 else ".1f" if abs(value) >= 10 else ".3g"))

    lines = [
        "| network | params | fwd GFLOPs | ms/step | ratio | peak mem (MB) | ratio | inference s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r.network,
            f"{r.params / 1e6:.2f} M",
            fmt(r.fwd_gflops),
            fmt(r.ms_per_step),
            fmt(r.step_ratio, ".2f"),
            fmt(r.peak_mem_mb),
            fmt(r.mem_ratio, ".2f"),
            fmt(r.inference_s),
            fmt(r.inference_ratio, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    """Short commit of the checkout this script lives in ('unknown' outside a git tree)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment(device: str) -> dict[str, Any]:
    """Hardware and software the numbers belong to."""
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return {
        "hardware": hardware,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def write_json_atomic(path: Path, data: dict[str, Any], overwrite: bool) -> None:
    """Write ``data`` atomically (temporary file, then rename): never a half-written result."""
    if path.exists() and not overwrite:
        raise CimlError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(path, data)


# ---------------------------------------------------------------------------------------------- API


def check_settings(settings: Settings) -> None:
    """Fail before any measurement on settings no network can run."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise CimlError("--device cuda: CUDA is not available here (use --device cpu)")
    for name, widths in (("joint", settings.joint_widths), ("segresnet", settings.segresnet_widths)):
        divisor = 2 ** (len(widths) - 1)
        if settings.patch % divisor or settings.patch < 2 * divisor:  # instance norm needs 2+ voxels
            raise CimlError(
                f"--patch {settings.patch} must be a multiple of {divisor} and at least {2 * divisor} "
                f"for the {name} widths {widths}"
            )
    if min(settings.batch, settings.repeats, settings.inference_repeats, settings.warmup) < 1:
        raise CimlError("--batch, --repeats and the warm-up must be at least 1")


def run_benchmark(
    settings: Settings,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every network under ``settings``; returns the JSON-ready result (environment, rows).

    ``on_row`` receives the partial result after each network (``"complete": false``), so a run cut
    short (a time limit on a lent GPU) still leaves what it measured.
    """
    check_settings(settings)
    started = time.perf_counter()
    if settings.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net trains: fixed patch, autotuned kernels
    spec = load_task("brats2020")
    input_shape = (settings.batch, len(spec.modality_names), *(settings.patch,) * 3)
    ciml_widths, ciml_flops, joint_flops = match_ciml_widths(spec, settings.joint_widths, input_shape)
    log(
        f"equal FLOPs: joint {settings.joint_widths} {joint_flops / 1e9:.2f} GFLOP, "
        f"ciml {ciml_widths} {ciml_flops / 1e9:.2f} GFLOP (per forward of batch {settings.batch})"
    )
    flops = {"joint": joint_flops, "ciml": ciml_flops}
    rows: list[Row] = []
    result: dict[str, Any] = {}
    under_test = networks(spec, settings, ciml_widths)
    for net in under_test:
        if net.kind not in flops:
            flops[net.kind] = forward_flops(net.build, input_shape)
        log(f"[{time.perf_counter() - started:6.1f} s] {net.name} {net.widths}: measuring ...")
        rows.append(measure(net, spec, settings, flops[net.kind]))
        log(f"[{time.perf_counter() - started:6.1f} s] {rows[-1]}")
        add_ratios(rows)
        result = {
            "benchmark": "speed",
            "complete": len(rows) == len(under_test),
            "task": spec.name,
            "environment": environment(settings.device),
            "settings": asdict(settings),
            "flops_note": "forward FLOPs of one batch, convolutions and matrix products (FlopCounterMode)",
            "memory_note": "peak tensor memory of one training step: "
            + (
                "torch.cuda.max_memory_allocated minus what was allocated before the model was built"
                if settings.device == "cuda"
                else "bytes of live tensor storages counted op by op (LiveTensorBytes), not RSS"
            ),
            "process_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ciml_flops_match": {"joint_gflops": joint_flops / 1e9, "ciml_gflops": ciml_flops / 1e9},
            "rows": [asdict(r) for r in rows],
        }
        if on_row is not None:
            on_row(result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to measure (default: cuda when available, else cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny patch, widths and case: a smoke test")
    parser.add_argument(
        "--full-case",
        action="store_true",
        help="CPU: infer on the full 4x240x240x155 case (default: 4x96x96x64)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd joint and ciml (training step)"
    )
    parser.add_argument(
        "--compiled-inference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile, also time inference of the compiled networks (a second compilation)",
    )
    parser.add_argument(
        "--networks",
        default="",
        help="comma-separated rows to measure, e.g. 'ciml,ciml (compiled)' (joint always; default: all)",
    )
    parser.add_argument("--patch", type=int, default=None, help="cubic patch edge (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed training steps (default: preset's)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default: benchmarks/results/speed_<device>.json)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    settings = settings_for(args.device, args.quick, args.full_case, args.compile)
    overrides = {"patch": args.patch, "batch": args.batch, "repeats": args.repeats}
    networks = tuple(name.strip() for name in args.networks.split(",") if name.strip())
    settings = replace(settings, compiled_inference=args.compiled_inference, networks=networks)
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or RESULTS_DIR / f"speed_{settings.device}.json"
    try:
        if out.exists() and not args.overwrite:  # fail before minutes of measuring, not after
            raise CimlError(f"{out} already exists; pass --overwrite to replace it")
        print(f"settings: {settings}", flush=True)
        result = run_benchmark(
            settings,
            log=lambda line: print(line, flush=True),
            on_row=lambda partial: write_json_atomic(out, partial, overwrite=True),
        )
    except CimlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    env = result["environment"]
    print(f"\n{env['hardware']}, torch {env['torch']}, {env['torch_threads']} threads", end="")
    print(f", commit {env['git_commit']}")
    print(
        f"patch {settings.patch}^3, batch {settings.batch}, bf16 {settings.bf16}; inference on "
        f"4x{'x'.join(map(str, settings.case_shape))} ({settings.case_note}), ratios to joint; wrote {out}\n"
    )
    print(markdown_table([Row(**r) for r in result["rows"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
