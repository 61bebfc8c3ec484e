"""Why the CIML family costs more than its FLOPs on a CPU: grouped conv3d, and the channels_last_3d layout.

    python benchmarks/conv_layout.py [--rounds 3] [--steps 4]

CIML's segmentors (and the ensemble's members) run as one grouped convolution per layer
(``ciml.models.grouped``). On a CPU, oneDNN's grouped 3D convolutions are slower per FLOP than dense
ones, so ciml-nomsg costs several times the joint U-Net at equal parameters and FLOPs. This prints two
tables, measured in one process with 1 torch thread, rounds interleaved so load drifts hit every row:

1. one 3x3x3 convolution, forward and backward, grouped (4 groups) against dense, in torch's default
   (contiguous) layout and in ``channels_last_3d``;
2. a whole training step of the accuracy study's models as ``ciml train`` takes it (the Trainer: CIML's
   loss, AdamW, gradient clipping; no deep supervision) at 2x4x24^3 and 2x4x16^3, with
   ``memory_format`` contiguous and channels_last (the CPU default since 2026-12-08, with InstanceNorm
   computed on a contiguous copy, :func:`ciml.models.backbone.instance_norm`).

Only ratios within one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ciml.models import build_model
from ciml.tasks import load_task
from ciml.training import Batch, TrainConfig, Trainer
from threads import cpu_model  # benchmarks/threads.py: one reader of the CPU's name

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
FORMATS = ("contiguous", "channels_last")  # TrainConfig.memory_format
EDGES = (24, 16)  # the study's training patches
#: (groups, channels per group, edge): CIML widths 4/8/16 at 24^3 have 4 segmentors of 4, 8, 16 channels.
CONVS = ((4, 4, 24), (4, 8, 12), (4, 16, 6))
MODELS = (("joint", (8, 16, 32)), ("ciml-nomsg", (4, 8, 16)), ("ciml", (4, 8, 16)), ("ensemble", (4, 8, 16)))


def timed(step: Callable[[], None], steps: int) -> float:
    """Milliseconds per call of ``step``, after one warm-up call."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def conv_step(groups: int, channels: int, edge: int, dense: bool, layout: torch.memory_format) -> Callable:
    """Forward and backward of one 3x3x3 convolution over a batch of 2."""
    width = groups * channels
    x = torch.randn(2, width, edge, edge, edge).to(memory_format=layout).requires_grad_()
    weight = torch.randn(width, width if dense else channels, 3, 3, 3).to(memory_format=layout)
    weight.requires_grad_()

    def step() -> None:
        F.conv3d(x, weight, padding=1, groups=1 if dense else groups).sum().backward()

    return step


def model_step(name: str, widths: tuple[int, ...], edge: int, memory_format: str) -> Callable:
    """One Trainer step of a registry model on a fixed 2x4x``edge``^3 batch in ``memory_format``."""
    spec = load_task("brats2020")
    torch.manual_seed(0)
    model = build_model(name, spec, widths, 3)
    generator = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(2, 4, edge, edge, edge, generator=generator),
        (torch.rand(2, 3, edge, edge, edge, generator=generator) > 0.9).float(),
    )
    config = TrainConfig(
        iterations=10**6,
        lr=1e-3,
        region_names=list(spec.region_names),
        device="cpu",
        memory_format=memory_format,
    )
    trainer = Trainer(model, config, lambda _: batch)

    def step() -> None:
        trainer.step(batch)

    return step


def measure(cases: dict[str, Callable], rounds: int, steps: int) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each case's ms per step."""
    times: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(rounds):
        for key, step in cases.items():
            times[key].append(timed(step, steps))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--steps", type=int, default=4, help="timed calls per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{cpu_model()}, torch {torch.__version__}, 1 thread; median of {args.rounds} rounds\n")

    convs = {
        (g, c, e, dense, layout): conv_step(g, c, e, dense, LAYOUTS[layout])
        for g, c, e in CONVS
        for dense in (False, True)
        for layout in LAYOUTS
    }
    conv_ms = measure(convs, args.rounds, args.steps * 3)
    print("| 3x3x3 conv, fwd+bwd, batch 2 | grouped ms | dense ms (4x FLOPs) | grouped, channels_last ms |")
    print("|---|---|---|---|")
    for g, c, e in CONVS:
        row = [conv_ms[g, c, e, False, "contiguous"], conv_ms[g, c, e, True, "contiguous"]]
        row.append(conv_ms[g, c, e, False, "channels_last_3d"])
        print(f"| {g} groups x {c} channels, {e}^3 | " + " | ".join(f"{v:.1f}" for v in row) + " |")

    steps = {
        (name, edge, memory_format): model_step(name, widths, edge, memory_format)
        for name, widths in MODELS
        for edge in EDGES
        for memory_format in FORMATS
    }
    step_ms = measure(steps, args.rounds, args.steps)
    for edge in EDGES:
        joint = step_ms["joint", edge, "contiguous"]
        header = "contiguous ms | x joint | channels_last ms | x joint | ratio"
        print(f"\n| Trainer step of 2x4x{edge}^3 | {header} |")
        print("|---|---|---|---|---|---|")
        joint_last = step_ms["joint", edge, "channels_last"]
        for name, widths in MODELS:
            plain, last = step_ms[name, edge, "contiguous"], step_ms[name, edge, "channels_last"]
            label = f"{name} ({'/'.join(map(str, widths))})"
            print(
                f"| {label} | {plain:.0f} | {plain / joint:.2f} | {last:.0f} | {last / joint_last:.2f} "
                f"| {last / plain:.2f} |"
            )


if __name__ == "__main__":
    main()
