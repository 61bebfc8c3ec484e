"""Missing modalities on the brain phantom (issue 17): the 15-subset table of CIML, ensemble and joint.

Every model trains with the same modality dropout on the same phantoms (fold 0 of one split, same
iterations, patch, batch, widths and seed), then ``ciml robustness`` scores the held-out phantoms with
all 15 subsets of the BraTS modalities, giving each subset's Dice, the subset average per region (the
DeMoSeg/mmFormer protocol) and each modality's marginal contribution with patient-level bootstrap
intervals. Variants:

* ``ciml``: the brats2020 preset, whose fallback owners give every region a stand-in head in every
  segmentor that does not own it (used only when all its owners are missing);
* ``ciml-shared``: the other layout with no n/a: every segmentor *owns* every region (messages kept),
  so owners' outputs are always averaged, whichever modalities are present;
* ``ensemble``: one U-Net per modality predicting every region, no messages;
* ``joint``: one U-Net on the stacked modalities, trained and run with the absent channels zero-filled.

    python benchmarks/missing_modalities.py --out benchmarks/results/missing_modalities
    python benchmarks/missing_modalities.py --quick --out /tmp/mm   # smoke test, numbers mean nothing

Writes ``results.json`` and ``results.md`` to ``--out`` (each variant's robustness files beside them);
phantoms and runs go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

import accuracy  # benchmarks/accuracy.py: environment record and hardware line
from ciml.evaluation.robustness import evaluate_robustness, modality_subsets, subset_name
from ciml.experiments.brain_demo import BrainDemoConfig, inference_settings, train_settings, write_phantoms
from ciml.files import write_json_atomic, write_text_atomic
from ciml.tasks import load_task
from ciml.training.engine import train

#: variant -> (model name, task spec: preset name or a spec dict)
_BRATS = load_task("brats2020")
SHARED = {
    **_BRATS.to_dict(),
    "name": "brats2020-shared",
    "decomposition": {m: list(_BRATS.region_names) for m in _BRATS.modality_names},
}
SHARED.pop("fallback_owners", None)
VARIANTS: dict[str, tuple[str, Any]] = {
    "ciml": ("ciml", "brats2020"),
    "ciml-shared": ("ciml", SHARED),
    "ensemble": ("ensemble", "brats2020"),
    "joint": ("joint", "brats2020"),
}

#: DeMoSeg's published 15-subset averages on real BraTS2020 (ANCHORS H.2): not comparable numbers.
PUBLISHED = {
    "DeMoSeg": (88.90, 81.58, 69.71),
    "mmFormer": (87.08, 78.69, 64.08),
    "RFNet": (86.98, 78.23, 61.47),
}


@dataclass(frozen=True)
class Settings:
    train_cases: int = 12
    test_cases: int = 4
    iterations: int = 200
    patch: int = 32
    batch: int = 2
    widths: tuple[int, ...] = (8, 16, 32)
    inference_patch: int = 64
    target_spacing_mm: float = 4.0
    modality_dropout: float = 0.5
    bootstrap: int = 1000
    seed: int = 0
    threads: int = 1


QUICK = Settings(train_cases=2, test_cases=1, iterations=3, patch=16, widths=(4, 8), inference_patch=32,
                 bootstrap=50)  # fmt: skip


def run_variant(name: str, settings: Settings, data: tuple[Path, Path], work: Path, out: Path) -> dict:
    """Train one variant with modality dropout and score it on every subset; its summary and times."""
    model, task = VARIANTS[name]
    train_dir, test_dir = data
    config = BrainDemoConfig(
        train_cases=settings.train_cases,
        test_cases=settings.test_cases,
        iterations=settings.iterations,
        patch_size=(settings.patch,) * 3,
        widths=settings.widths,
        batch_size=settings.batch,
        inference_patch=(settings.inference_patch,) * 3,
        model=model,
        seed=settings.seed,
        device="cpu",
    )
    training = replace(
        train_settings(config, train_dir, work / "runs" / name, progress=False, validation_cases=0),
        task=task if isinstance(task, str) else str(_write_spec(work, task)),
        target_spacing=(settings.target_spacing_mm,) * 3,
        modality_dropout=settings.modality_dropout,
    )
    started = time.perf_counter()
    run = train(training)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    result = evaluate_robustness(
        run, test_dir, settings=inference_settings(config), samples=settings.bootstrap, progress=False
    )
    robustness_s = time.perf_counter() - started
    result.write(out / name, overwrite=True)
    print(result.table(), flush=True)
    data_out = result.to_dict()
    for subset in data_out["subsets"].values():
        subset.pop("cases")
    return {**data_out, "model": model, "train_s": round(train_s, 1), "robustness_s": round(robustness_s, 1)}


def _write_spec(work: Path, spec: dict[str, Any]) -> Path:
    """The spec as a YAML file for ``ciml train --task`` (the run records the spec itself)."""
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def render(result: dict[str, Any]) -> str:
    """Markdown: the 15-row table per variant (WT / TC / ET), the averages, contributions, published."""
    regions = ("WT", "TC", "ET")
    variants = result["variants"]
    s = result["settings"]
    lines = [
        "# Missing modalities on the brain phantom",
        "",
        f"{accuracy.hardware(result['environment'], 'cpu')}, {s['threads']} torch thread(s), no GPU; "
        f"{result['environment']['date']}, commit {result['environment']['git_commit']}; "
        f"total {result['total_s']:.0f} s.",
        "",
        f"{s['train_cases']} training / {s['test_cases']} held-out brain phantoms (MNI152 anatomy, 2 mm, "
        f"resampled to {s['target_spacing_mm']:g} mm), {s['iterations']} iterations of batch {s['batch']} "
        f"at {s['patch']}^3, widths {'/'.join(map(str, s['widths']))}, modality dropout "
        f"{s['modality_dropout']:g} for every model, seed {s['seed']}. Dice (x100) per region WT / TC / ET, "
        "mean over the test cases, for every subset of the modalities; `ciml robustness` with "
        f"{s['bootstrap']} patient-level bootstrap resamples.",
        "",
        "| modalities | " + " | ".join(variants) + " |",
        "|" + "---|" * (len(variants) + 1),
    ]
    for subset in modality_subsets(_BRATS.modality_names):
        name = subset_name(subset)
        cells = [" / ".join(_pct(v["subsets"][name]["dice"][r]) for r in regions) for v in variants.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [" / ".join(_pct(v["average"][r]["estimate"]) for r in regions) for v in variants.values()]
    lines.append("| **15-subset average** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    lines += ["", "Subset averages with 95 % bootstrap intervals (x100):", ""]
    lines += ["| variant | WT | TC | ET | mean | train s | robustness s |", "|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        cells = [_interval(v["average"][k]) for k in (*regions, "mean")]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {v['train_s']:.0f} | {v['robustness_s']:.0f} |"
        )
    lines += ["", "Marginal contribution of each modality to the mean Dice (x100, 7 subset pairs each):", ""]
    lines += ["| variant | " + " | ".join(_BRATS.modality_names) + " |", "|" + "---|" * 5]
    for name, v in variants.items():
        cells = [_interval(v["contributions"][m]["mean"]) for m in _BRATS.modality_names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Published 15-subset averages on **real BraTS2020** (RFNet split; ANCHORS H.2), WT / TC / ET: "
        + "; ".join(f"{k} {' / '.join(f'{x:.2f}' for x in v)}" for k, v in PUBLISHED.items())
        + ". Not comparable with the phantom numbers above (synthetic data, minutes of CPU training).",
    ]
    return "\n".join(lines) + "\n"


def _interval(value: dict[str, float | None]) -> str:
    if value["estimate"] is None:
        return "n/a"
    if value["low"] is None:
        return _pct(value["estimate"])
    return f"{_pct(value['estimate'])} [{_pct(value['low'])}, {_pct(value['high'])}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json/.md")
    parser.add_argument("--work", type=Path, default=None, help="phantoms and runs (default: temporary)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of variants")
    parser.add_argument("--iterations", type=int, default=None, help="override the iterations")
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.iterations is not None:
        settings = replace(settings, iterations=args.iterations)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        print(
            f"error: unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
            file=sys.stderr,
        )
        return 1
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        config = BrainDemoConfig(train_cases=settings.train_cases, test_cases=settings.test_cases, seed=0)
        data = (work / "data" / "train", work / "data" / "test")
        if not data[1].is_dir():
            data = write_phantoms(work / "data", config, progress=False)
        result: dict[str, Any] = {
            "environment": accuracy.environment("cpu"),
            "settings": asdict(settings),
            "variants": {},
        }
        for name in variants:
            print(f"== {name}", flush=True)
            result["variants"][name] = run_variant(name, settings, data, work, args.out)
            result["total_s"] = round(time.perf_counter() - started, 1)
            write_json_atomic(args.out / "results.json", result)
            write_text_atomic(args.out / "results.md", render(result))
    print(json.dumps({k: v["average"]["mean"] for k, v in result["variants"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
