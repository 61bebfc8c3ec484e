"""Seconds per BraTS-sized case (240 x 240 x 155, 1 mm) for `ciml evaluate`'s metrics, HD95 on.

Scores one synthetic glioma-like case (an edema shell around a necrotic core with an enhancing rim,
plus satellite lesions; the prediction shifted, eroded, missing one satellite and with false-positive
blobs) under each convention, on 1 CPU thread, excluding file reading:

* brats (2020/2021): Dice, voxel-centre HD95, sensitivity, specificity per region;
* brats, --hd95 surface: the same with the area-weighted BraTS 2023+ HD95;
* brats2023 / brats2024, --metrics all: lesion-wise and legacy scores per tissue.

    python benchmarks/evaluate_time.py --out benchmarks/results/evaluate_time.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ciml.evaluation.evaluate import scoring
from ciml.tasks import TaskSpec, load_task

SHAPE = (240, 240, 155)


def ball(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def case(et: int, cavity: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps; ``et`` is the enhancing label (4 in 2020, 3 from 2023)."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[ball((120, 110, 80), 32)] = 2
    ref[ball((122, 112, 80), 20)] = et
    ref[ball((122, 112, 80), 14)] = 1
    if cavity:
        ref[ball((100, 100, 70), 8)] = 4
    for centre in [(60, 150, 60), (170, 60, 100), (150, 170, 40)]:  # satellites
        ref[ball(centre, 5)] = et
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    pred = np.where(ndimage.binary_erosion(pred > 0), pred, 0).astype(np.uint8)
    pred[ball((152, 171, 41), 7)] = 0  # one satellite missed
    for centre in [(40, 40, 40), (200, 200, 120)]:  # false positives
        pred[ball(centre, 3)] = et
    return pred, ref


def brats2023_spec(cavity: bool) -> TaskSpec:
    labels = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]} | ({"RC": [4]} if cavity else {})
    return TaskSpec.from_dict(
        {
            "name": "brats2024" if cavity else "brats2023",
            "modalities": {"t1c": "mri", "t1n": "mri", "t2f": "mri", "t2w": "mri"},
            "regions": labels,
            "decomposition": {"t2f": ["WT"], "t1n": ["TC"], "t2w": ["WT", "TC"], "t1c": ["TC", "ET"]}
            | ({"t1n": ["TC", "RC"]} if cavity else {}),
            "assembly": [["WT", 2], ["TC", 1], ["ET", 3]] + ([["RC", 4]] if cavity else []),
        }
    )


def seconds(fn, repeats: int) -> float:
    fn()  # warm caches (area tables, imports)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {
        "brats2020 legacy, voxel HD95": (load_task("brats2020"), case(4, False), None, None),
        "brats2020 legacy, surface HD95": (load_task("brats2020"), case(4, False), None, "surface"),
        "brats2023 legacy only": (brats2023_spec(False), case(3, False), "legacy", None),
        "brats2023 lesionwise + legacy": (brats2023_spec(False), case(3, False), "all", None),
        "brats2024 lesionwise + legacy": (brats2023_spec(True), case(3, True), "all", None),
    }
    results = {}
    for name, (spec, (pred, ref), metrics, hd95) in runs.items():
        score = functools.partial(scoring(spec, None, metrics, hd95).score, pred, ref, spec, (1.0, 1.0, 1.0))
        results[name] = round(seconds(score, args.repeats), 3)
        print(f"{name}: {results[name]:.2f} s per case")
    report = {"shape": SHAPE, "threads": 1, "machine": platform.machine(), "seconds_per_case": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
