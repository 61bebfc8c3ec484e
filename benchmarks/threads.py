"""One CIML training step (the CPU demo's settings) with 1, 2 and ciml's default threads, beside a neighbour.

    python benchmarks/threads.py [--steps 5] [--out benchmarks/results/threads.json]

The neighbour is another process spinning torch convolutions, as a second job or a test suite beside a
training run is: once with torch's own default threads (one per core, what an unconfigured process
uses), once with 1 thread. Prints a table of seconds per step (median) and writes JSON with the hardware.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ciml.experiments.brain_demo import BrainDemoConfig
from ciml.files import write_json_atomic
from ciml.threads import affinity_cpus, cgroup_cpu_quota, choose_threads
from demo_step_time import seconds_per_step

SPIN = """
import sys, torch
x, w = torch.randn(2, 8, 32, 32, 32), torch.randn(8, 8, 3, 3, 3)
print("spinning", torch.get_num_threads(), flush=True)
while True:
    torch.nn.functional.conv3d(x, w, padding=1)
"""


class Neighbour:
    """A process spinning torch with ``threads`` threads (None: torch's default) while inside ``with``."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Neighbour:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.process = subprocess.Popen(
            [sys.executable, "-c", SPIN], env=env, stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()  # busy from here on
        if not line.startswith("spinning"):
            raise RuntimeError(f"the neighbour did not start: {line!r}")
        return self

    def __exit__(self, *_exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 2 warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny network and patch (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.json"))
    args = parser.parse_args(argv)
    torch_default = torch.get_num_threads()
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    default = choose_threads(environ, affinity_cpus(), cgroup_cpu_quota()).threads
    config = BrainDemoConfig(patch_size=(16, 16, 16), widths=(4, 8)) if args.quick else BrainDemoConfig()
    counts = list(dict.fromkeys([1, 2, default]))
    neighbours = {"alone": None, f"beside {torch_default}-thread neighbour": torch_default}
    neighbours["beside 1-thread neighbour"] = 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: dict[str, dict[str, float]] = {}
    for label, neighbour_threads in neighbours.items():
        for threads in counts:
            torch.set_num_threads(threads)
            if label == "alone":
                seconds = seconds_per_step(config.model, config, args.steps)
            else:
                with Neighbour(neighbour_threads):
                    seconds = seconds_per_step(config.model, config, args.steps)
            rows.setdefault(f"{threads} threads" + (" (ciml default)" if threads == default else ""), {})[
                label
            ] = seconds
            print(f"{label}, {threads} threads: {seconds:.3f} s/step", flush=True)
    torch.set_num_threads(torch_default)
    header = list(neighbours)
    print(f"\nCIML step, patch {config.patch_size}, batch {config.batch_size}, widths {config.widths}")
    print("| threads | " + " | ".join(header) + " |\n|---|" + "---|" * len(header))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[h]:.2f} s" for h in header) + " |")
    write_json_atomic(
        args.out,
        {
            "date": datetime.date.today().isoformat(),
            "hardware": {
                "cpu": cpu_model(),
                "machine": platform.machine(),
                "cpus_in_affinity": affinity_cpus(),
                "cgroup_quota": cgroup_cpu_quota(),
                "load_average_1min_before": load,
            },
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_default_threads": torch_default,
            "ciml_default_threads": default,
            "settings": {
                "patch": config.patch_size,
                "batch": config.batch_size,
                "widths": config.widths,
                "steps": args.steps,
            },
            "seconds_per_step": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
