"""Interleaved CPU training steps: joint U-Net, CIML's segmentors alone, CIML with gates kept, recomputed.

Equal FLOPs at the CPU preset of benchmarks/speed.py (48^3, batch 1; joint 16/32/64/128, CIML 8/16/28/56).
The networks take turns step by step in one process, so a busy machine slows them alike; per network
the median wall time and the median CPU time of the process's thread (with one torch thread the whole
step runs there, so time the machine gives to other jobs does not count) after one warm-up round.
Usage: ``python benchmarks/gate_step_time.py [threads] [rounds]`` (prints ratios to the joint U-Net).
"""

import statistics
import sys
import time

import torch

from ciml.losses import CIMLLoss
from ciml.models import build_model
from ciml.models.ciml import CIMLNet
from ciml.tasks import load_task
from ciml.training import TrainConfig, make_optimizer
from ciml.training.memory import _as_output

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 12
spec = load_task("brats2020")
R = spec.region_names
w = (8, 16, 28, 56)


def ciml(**kw):
    return CIMLNet(spec.modality_names, spec.decomposition, w, 3, **kw)


nets = {
    "joint U-Net": build_model("joint", spec, widths=(16, 32, 64, 128)),
    "segmentors only (ciml-nomsg)": ciml(message_levels=()),
    "CIML, gate tensors kept (autograd)": ciml(recompute_gates=False),
    "CIML, gates recomputed (default)": ciml(),
}
torch.manual_seed(0)
x = torch.randn(1, 4, 48, 48, 48)
t = (torch.rand(1, 3, 48, 48, 48) > 0.5).float()
loss = CIMLLoss(R, 1e-3)
opts = {k: make_optimizer(n, TrainConfig(lr=1e-4)) for k, n in nets.items()}  # as `ciml train`


def step(k):
    o = opts[k]
    o.zero_grad(set_to_none=True)
    step_loss = loss(_as_output(nets[k](x), R), t).total
    step_loss.backward()
    o.step()


wall = {k: [] for k in nets}
cpu = {k: [] for k in nets}
for r in range(rounds + 1):
    for k in nets:
        started, cpu_started = time.perf_counter(), time.thread_time()
        step(k)
        if r:
            wall[k].append(time.perf_counter() - started)
            cpu[k].append(time.thread_time() - cpu_started)
    print(r, {k: round(statistics.median(v) * 1e3) for k, v in cpu.items() if v}, flush=True)
joint_wall, joint_cpu = statistics.median(wall["joint U-Net"]), statistics.median(cpu["joint U-Net"])
print("| network | wall ms/step | x joint | CPU ms/step | x joint |\n|---|---|---|---|---|")
for k in nets:
    w_k, c_k = statistics.median(wall[k]), statistics.median(cpu[k])
    print(f"| {k} | {w_k * 1e3:.0f} | {w_k / joint_wall:.2f} | {c_k * 1e3:.0f} | {c_k / joint_cpu:.2f} |")
