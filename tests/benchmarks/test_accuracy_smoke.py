"""Smoke test of benchmarks/accuracy.py: the quick setting trains, predicts and scores two models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import accuracy

MODELS = ("ciml", "joint")
REGIONS = ("WT", "TC", "ET")


@pytest.mark.slow
def test_quick_run_scores_every_model_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    threads = torch.get_num_threads()
    args = ["--quick", "--models", ",".join(MODELS), "--out", str(out), "--work", str(work)]
    try:
        assert accuracy.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets 1 thread for itself
    printed = capsys.readouterr().out
    assert "1/2 ciml" in printed and "2/2 joint" in printed and "| ciml |" in printed

    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert result["status"] == "complete" and result["settings"]["setting"] == "quick"
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["cpu_model"]
    rows = {row["model"]: row for row in result["models"]}
    assert tuple(rows) == MODELS
    for name, row in rows.items():
        for region in REGIONS:
            assert math.isfinite(row["dice"][region]) and 0.0 <= row["dice"][region] <= 1.0, (name, region)
            assert math.isfinite(row["hd95"][region]), (name, region)
        assert row["params"] > 0 and row["fwd_gflops"] > 0 and row["train_s"] > 0
        assert row["mean_dice"] == pytest.approx(sum(row["dice"].values()) / 3)
    assert rows["ciml"]["params"] > rows["joint"]["params"]  # four segmentors at the same widths

    ciml = result["robustness"]["ciml"]["subsets"]
    assert len(ciml) == 15 and not any(subset["note"] for subset in ciml.values())
    assert 0.0 <= ciml["flair+t1+t1ce+t2"]["dice"]["ET"] <= 1.0
    assert ciml["flair"]["dice"]["ET"] is not None  # ET's owner T1CE is missing: its fallback owners
    assert result["robustness"]["ciml"]["average"]["ET"]["estimate"] is not None
    joint = result["robustness"]["joint"]["subsets"]
    assert sum(bool(subset["note"]) for subset in joint.values()) == 14  # needs every modality
    assert result["shapes"]["source"].startswith("benchmarks/results/shapecomposition/results.json")

    markdown = (out / "results.md").read_text(encoding="utf-8")
    for name in MODELS:
        assert f"| {name} |" in markdown
    assert "| flair+t1+t1ce+t2 |" in markdown and "| t2 |" in markdown and "n/a" in markdown  # joint
    assert "| **subset average** |" in markdown
    assert "## ShapeComposition" in markdown and not list(out.glob(".*.tmp*"))

    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md")}
    assert accuracy.main([*args[:-2], "--work", str(tmp_path / "work2")]) == 1
    error = capsys.readouterr().err
    assert "--overwrite" in error and str(out / "results.json") in error
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (tmp_path / "work2").exists()  # refused before any work


def test_unknown_model_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = accuracy.main(["--quick", "--models", "ciml,unet9", "--out", str(tmp_path / "r")])
    assert code == 1
    assert "unet9" in capsys.readouterr().err and not (tmp_path / "r").exists()
