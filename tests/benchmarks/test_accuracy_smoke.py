"""Smoke test of benchmarks/accuracy.py: the quick setting trains, predicts and scores three models,
compares them, and trains CIML and a zero-filled joint U-Net with modality dropout for the 15 subsets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import accuracy

MODELS = ("ciml", "joint", "ensemble")
REGIONS = ("WT", "TC", "ET")


@pytest.mark.slow
def test_quick_run_scores_compares_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    threads = torch.get_num_threads()
    args = ["--quick", "--models", ",".join(MODELS), "--robustness", "ciml,joint"]
    args += ["--out", str(out), "--work", str(work)]
    try:
        assert accuracy.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets 1 thread for itself
    printed = capsys.readouterr().out
    assert "budget probe" in printed and "estimated total" in printed
    assert "1/5 ciml seed 0" in printed and "5/5 joint+dropout seed 0" in printed and "| ciml |" in printed

    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert result["status"] == "complete" and result["settings"]["setting"] == "quick"
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["cpu_model"]
    assert result["estimate"]["total_s"] > 0 and set(result["estimate"]["models"]) == {
        *MODELS,
        "ciml+dropout",
        "joint+dropout",
    }
    runs = {run["key"]: run for run in result["runs"]}
    assert tuple(runs) == MODELS and all(run["seed"] == 0 for run in runs.values())
    for name, run in runs.items():
        assert [c["iteration"] for c in run["curve"]] == [2, 4], name  # validate_every 4 // 2
        assert not run["plateau"]["converged"] and "needs at least" in run["plateau"]["reason"]
        assert set(run["cases"]) == {"BraTS20_Training_901", "BraTS20_Training_902"}
    rows = {row["key"]: row for row in result["models"]}
    assert tuple(rows) == MODELS
    for name, row in rows.items():
        for region in REGIONS:
            assert math.isfinite(row["dice"][region]) and 0.0 <= row["dice"][region] <= 1.0, (name, region)
            assert math.isfinite(row["hd95"][region]), (name, region)
        assert row["params"] > 0 and row["fwd_gflops"] > 0 and row["train_s"] > 0
        assert row["dice"]["mean"] == pytest.approx(sum(row["dice"][r] for r in REGIONS) / 3)
        assert row["dice_std"]["mean"] == 0.0 and not row["converged"]
    assert rows["ciml"]["params"] > rows["joint"]["params"]  # four segmentors at the same widths
    comparisons = {(c["a"], c["b"]): c for c in result["comparisons"]}
    assert set(comparisons) == {("ciml", "ensemble"), ("ciml", "joint")}
    for comparison in comparisons.values():
        mean = comparison["keys"]["mean"]
        assert mean["cases"] == 2 and mean["low"] <= mean["estimate"] <= mean["high"]
        assert mean["verdict"] in ("wins", "ties", "loses")
    difference = rows["ciml"]["dice"]["mean"] - rows["joint"]["dice"]["mean"]
    assert comparisons[("ciml", "joint")]["keys"]["mean"]["estimate"] == pytest.approx(difference)

    ciml = result["robustness"]["ciml+dropout"]["subsets"]
    assert len(ciml) == 15 and not any(subset["note"] for subset in ciml.values())
    assert 0.0 <= ciml["flair+t1+t1ce+t2"]["dice"]["ET"] <= 1.0
    assert ciml["flair"]["dice"]["ET"] is not None  # ET's owner T1CE is missing: its fallback owners
    joint = result["robustness"]["joint+dropout"]["subsets"]
    assert len(joint) == 15 and not any(subset["note"] for subset in joint.values())  # zero-filled
    assert result["robustness"]["joint+dropout"]["average"]["mean"]["estimate"] is not None
    assert [run["key"] for run in result["robustness_runs"]] == ["ciml+dropout", "joint+dropout"]
    assert result["shapes"]["source"].startswith("benchmarks/results/shapecomposition/results.json")

    markdown = (out / "results.md").read_text(encoding="utf-8")
    for name in MODELS:
        assert f"| {name} |" in markdown
    assert "| ciml - ensemble |" in markdown and "| ciml - joint |" in markdown
    assert (
        "## Convergence" in markdown
        and "| joint (modality dropout 0.5, zero-filled) (WT/TC/ET) |" in markdown
    )
    assert "| flair+t1+t1ce+t2 |" in markdown and "| t2 |" in markdown
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


def test_estimate_only_times_every_model_and_writes_no_results(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r"
    threads = torch.get_num_threads()
    try:
        code = accuracy.main(["--quick", "--estimate", "--models", "joint", "--robustness", "none"])
        code_out = accuracy.main(["--quick", "--estimate", "--models", "joint", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and code_out == 0
    printed = capsys.readouterr().out
    assert "  joint " in printed and "estimated total" in printed and "+dropout" not in printed
    assert not out.exists()


@pytest.mark.slow
def test_runs_in_two_worker_processes_give_the_numbers_of_one_process(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    results = {}
    try:
        for jobs in (1, 2):
            out = tmp_path / f"jobs{jobs}"
            args = ["--quick", "--models", "ciml,joint", "--robustness", "none", "--jobs", str(jobs)]
            assert accuracy.main([*args, "--out", str(out), "--work", str(tmp_path / f"work{jobs}")]) == 0
            results[jobs] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    finally:
        torch.set_num_threads(threads)
    one, two = results[1], results[2]
    assert two["status"] == "complete" and two["settings"]["jobs"] == 2
    assert [run["key"] for run in two["runs"]] == ["ciml", "joint"]  # the study's order, not finishing order
    for alone, pooled in zip(one["runs"], two["runs"], strict=True):
        assert pooled["curve"] == alone["curve"] and pooled["cases"] == alone["cases"], alone["key"]
    assert two["comparisons"][0]["keys"] == one["comparisons"][0]["keys"]


@pytest.mark.slow
def test_resume_keeps_finished_runs_trains_the_rest_and_refuses_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r"
    threads = torch.get_num_threads()
    base = ["--quick", "--robustness", "none", "--out", str(out)]
    try:
        assert accuracy.main([*base, "--models", "joint", "--work", str(tmp_path / "w1")]) == 0
        first = json.loads((out / "results.json").read_text(encoding="utf-8"))
        capsys.readouterr()
        code = accuracy.main([*base, "--models", "joint,ciml", "--resume", "--work", str(tmp_path / "w2")])
        assert code == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "kept 1 finished run(s)" in printed and "1/2 joint" not in printed and "2/2 ciml" in printed
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert result["status"] == "complete" and [run["key"] for run in result["runs"]] == ["joint", "ciml"]
    assert result["runs"][0] == first["runs"][0]  # kept as it was, not trained again
    assert [(c["a"], c["b"]) for c in result["comparisons"]] == [("ciml", "joint")]
    assert result["resumed_from"][0]["runs"] == ["joint seed 0"]
    assert "Kept from an earlier invocation" in (out / "results.md").read_text(encoding="utf-8")

    before = (out / "results.json").read_bytes()
    assert accuracy.main([*base, "--models", "joint", "--resume", "--iterations", "6"]) == 1
    error = capsys.readouterr().err
    assert "other settings" in error and "iterations 4 there, 6 now" in error
    assert accuracy.main(["--quick", "--resume", "--out", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert accuracy.main([*base, "--models", "ciml", "--resume"]) == 1  # would drop the joint run
    assert "leaves out (joint seed 0)" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
