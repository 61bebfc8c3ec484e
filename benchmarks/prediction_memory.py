"""Peak memory of `ciml predict` on a big 2-modality PET/CT case, and its growth over many cases.

Builds an untrained tiny autopet run (pet, ct), writes one synthetic PET/CT case of --shape (default
512x512x600) and --cases small ones, predicts each set on the CPU in a fresh process, and prints the
peak RSS (ru_maxrss and /proc/self/status VmHWM) and, for the small cases, RSS after case 5 and after
the last. Usage: ``python benchmarks/prediction_memory.py [--shape 256 256 300] [--cases 20]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ciml.data.cases import Case
from ciml.data.preprocessing import plan_preprocessing
from ciml.models import build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import load_task

CHILD = r"""
import json, resource, sys
from ciml.inference.predict import InferenceSettings, Predictor, predict_case
from ciml.data.cases import Case
from pathlib import Path
def vm_hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0].rstrip(":"), int(line.split()[1]) / 1024
run, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
predictor = Predictor.from_run(run, InferenceSettings(device="cpu", step=1.0))
rss = []
for cid, images in cases:
    predict_case(predictor, Case(cid, {m: Path(p) for m, p in images.items()}), out)
    rss.append(dict(vm_hwm())["VmRSS"])
print(json.dumps({"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **{k + "_mb": v for k, v in vm_hwm()}, "rss_after_each_mb": rss}))
"""


def write_case(folder: Path, shape: tuple[int, ...], seed: int) -> dict[str, str]:
    """PET (float32 SUV) and CT (int16 HU) of one synthetic body with a hot lesion; float32/int16 only."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ct = np.full(shape, -1000, np.int16)
    x, y = (s // 4 for s in shape[:2])
    ct[x:-x, y:-y] = 40
    pet = (ct > 0).astype(np.float32)
    pet[x + 4 : x + 12, y + 4 : y + 12, shape[2] // 2 : shape[2] // 2 + 8] = 10.0
    pet += rng.random(shape, dtype=np.float32) * 0.1
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    files = {"pet": folder / "SUV.nii.gz", "ct": folder / "CTres.nii.gz"}
    nib.save(nib.Nifti1Image(pet, affine), files["pet"])
    nib.save(nib.Nifti1Image(ct, affine), files["ct"])
    return {m: str(p) for m, p in files.items()}


def make_run(folder: Path, case: dict[str, str]) -> Path:
    spec = load_task("autopet")
    model = build_model("ciml", spec, widths=(4, 8), spatial_dims=3).eval()
    run = RunFolder(folder)
    save_checkpoint({"model": model.state_dict(), "config": model.config}, run.checkpoint(0))
    plan = plan_preprocessing([Case("ref", {m: Path(p) for m, p in case.items()})], spec)
    run.write_info({"task": spec.to_dict(), "model": model.config, "preprocessing": plan.to_dict(),
                    "patch_size": [64, 64, 64], "data": {}, "train": {}})  # fmt: skip
    return folder


def measure(run: Path, out: Path, cases: list[tuple[str, dict[str, str]]]) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(run), str(out), json.dumps(cases)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[512, 512, 600], help="big case (default 512 512 600)"
    )
    parser.add_argument("--cases", type=int, default=20, help="small cases for the growth check (default 20)")
    parser.add_argument("--small", type=int, nargs=3, default=[48, 48, 40], help="small case shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = [(f"s{i}", write_case(root / f"s{i}", tuple(args.small), i)) for i in range(args.cases)]
        run = make_run(root / "run", small[0][1])
        growth = measure(run, root / "out_small", small)
        rss = growth["rss_after_each_mb"]
        print(f"{args.cases} small cases: RSS after case 5 {rss[min(4, len(rss) - 1)]:.0f} MB, "
              f"after case {len(rss)} {rss[-1]:.0f} MB, peak {growth['VmHWM_mb']:.0f} MB")  # fmt: skip
        big = [("big", write_case(root / "big", tuple(args.shape), 99))]
        peak = measure(run, root / "out_big", big)
        print(f"big case {tuple(args.shape)}: peak RSS {peak['VmHWM_mb']:.0f} MB "
              f"(ru_maxrss {peak['ru_maxrss_mb']:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
