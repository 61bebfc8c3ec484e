"""Interleaved CPU training steps: joint U-Net vs CIML with gates kept, recomputed, narrower.

Equal FLOPs at the CPU preset of benchmarks/speed.py (48^3, batch 1; joint 16/32/64/128, CIML 8/16/28/56).
Usage: ``python benchmarks/gate_step_time.py [threads]`` (prints per-round medians, then ratios to joint).
"""

import statistics
import sys
import time

import torch

from ciml.losses import CIMLLoss
from ciml.models import build_model
from ciml.models.ciml import CIMLNet
from ciml.tasks import load_task
from ciml.training.memory import _as_output

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
spec = load_task("brats2020")
R = spec.region_names
w = (8, 16, 28, 56)


def ciml(**kw):
    return CIMLNet(spec.modality_names, spec.decomposition, w, 3, **kw)


nets = {
    "joint": build_model("joint", spec, widths=(16, 32, 64, 128)),
    "ciml_old": ciml(recompute_gates=False),
    "ciml_rc": ciml(recompute_gates=True),
    "ciml_rc_k4": ciml(recompute_gates=True, message_channels=[max(4, c // 4) for c in w]),
}
torch.manual_seed(0)
x = torch.randn(1, 4, 48, 48, 48)
t = (torch.rand(1, 3, 48, 48, 48) > 0.5).float()
loss = CIMLLoss(R, 1e-3)
opts = {k: torch.optim.AdamW(n.parameters(), 1e-4) for k, n in nets.items()}


def step(k):
    n = nets[k]
    o = opts[k]
    o.zero_grad(set_to_none=True)
    step_loss = loss(_as_output(n(x), R), t).total
    step_loss.backward()
    o.step()


times = {k: [] for k in nets}
for r in range(5):
    print(r, {k: round(statistics.median(v) * 1e3) for k, v in times.items() if v}, flush=True)
    for k in nets:
        s = time.perf_counter()
        step(k)
        if r >= 1:
            times[k].append(time.perf_counter() - s)
j = statistics.median(times["joint"])
for k, v in times.items():
    print(k, f"{statistics.median(v) * 1e3:.0f} ms  x joint {statistics.median(v) / j:.2f}", flush=True)
