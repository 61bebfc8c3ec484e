"""Per-subset robustness table on 2 tiny HECKTOR cases (ct, pet: 3 subsets), scored like `ciml evaluate`;
its subset average and marginal contributions against hand-computed tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ciml.cli import main
from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import plan_preprocessing
from ciml.evaluation import evaluate_folders, robustness
from ciml.evaluation.robustness import (
    RobustnessResult,
    SubsetScores,
    evaluate_robustness,
    modality_subsets,
    summarize_subsets,
)
from ciml.inference import InferenceSettings, Predictor, predict_folder
from ciml.models import build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import load_task

SHAPE = (16, 20, 12)
AFFINE = np.array([[-1.0, 0, 0, 10.0], [0, 1.5, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
PATCH = (16, 16, 16)
CPU = InferenceSettings(device="cpu")


@pytest.fixture(scope="module")
def preset():
    return load_task("hecktor2022")


@pytest.fixture(scope="module")
def spec(preset):
    """HECKTOR's decomposition without the preset's fallback owner: GTVn is orphaned without PET."""
    return dataclasses.replace(preset, fallback_owners={})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """HECKTOR layout: imagesTr/<id>__CT.nii.gz, __PT.nii.gz, labelsTr/<id>.nii.gz (GTVp 1, GTVn 2)."""
    root = tmp_path_factory.mktemp("hecktor")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    for n in range(2):
        rng = np.random.default_rng(n)
        label = np.zeros(SHAPE, np.uint8)
        label[4:9, 5:11, 3:7] = 1
        label[11:14, 13:17, 7:10] = 2
        ct = np.full(SHAPE, -1000.0, np.float32)
        ct[2:14, 2:18, 1:11] = rng.normal(40, 20, (12, 16, 10))
        ct[label == 1] += 30
        pet = np.where(ct > -500, rng.gamma(2.0, 0.5, SHAPE), 0).astype(np.float32)
        pet[label > 0] = rng.uniform(5, 15, int((label > 0).sum()))
        for array, path in (
            (ct, f"imagesTr/CHUM-00{n}__CT.nii.gz"),
            (pet, f"imagesTr/CHUM-00{n}__PT.nii.gz"),
            (label, f"labelsTr/CHUM-00{n}.nii.gz"),
        ):
            nib.save(nib.Nifti1Image(array, AFFINE), str(root / path))
    return root


def make_run(folder: Path, spec, data: Path, name: str, zero_fill: bool = False) -> RunFolder:
    torch.manual_seed(0)
    model = build_model(name, spec, widths=(4, 8), spatial_dims=3, zero_fill_missing=zero_fill)
    for gate in getattr(model, "gates", {}).values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)  # messages that matter
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 2, *PATCH))  # settle the gates' running statistics
    run = RunFolder(folder)
    save_checkpoint({"model": model.state_dict(), "config": model.config}, run.checkpoint(0, "last"))
    plan = plan_preprocessing(read_dataset(data, spec), spec)
    run.write_info(
        {
            "task": spec.to_dict(),
            "model": model.config,
            "preprocessing": plan.to_dict(),
            "patch_size": list(PATCH),
            "data": {"path": str(data), "layout": "hecktor"},
            "train": {},
        }
    )
    return run


def test_subsets_are_every_non_empty_combination_largest_first():
    assert modality_subsets(["ct", "pet"]) == [("ct", "pet"), ("ct",), ("pet",)]
    brats = modality_subsets(["flair", "t1", "t1ce", "t2"])
    assert len(brats) == len(set(brats)) == 15 and brats[0] == ("flair", "t1", "t1ce", "t2")


def test_one_row_per_subset_with_na_for_unpredictable_regions(tmp_path, spec, data, monkeypatch):
    run = make_run(tmp_path / "run", spec, data, "ciml")
    calls = []
    original = robustness.preprocess_case
    monkeypatch.setattr(robustness, "preprocess_case", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = evaluate_robustness(run, data, settings=CPU, progress=False)
    assert len(calls) == 2  # each case preprocessed once for all 3 subsets
    assert [row.modalities for row in result.rows] == [("ct", "pet"), ("ct",), ("pet",)]
    assert result.convention == "hecktor" and result.n_cases == 2
    full, ct_only, pet_only = result.rows
    assert math.isnan(ct_only.dice["GTVn"]) and ct_only.predictable == ("GTVp",)  # only pet owns GTVn
    assert all(0.0 <= d <= 1.0 for row in result.rows for r, d in row.dice.items() if r in row.predictable)
    assert math.isnan(ct_only.mean) and not math.isnan(full.mean)
    assert all(math.isnan(case["GTVn"]["dice"]) for case in ct_only.cases.values())

    # the full row is what `ciml predict` + `ciml evaluate` give
    predict_folder(run, data, tmp_path / "pred", settings=CPU, progress=False)
    evaluated = evaluate_folders(tmp_path / "pred", data / "labelsTr", spec)
    for region in spec.region_names:
        assert full.dice[region] == pytest.approx(evaluated.summary["aggregated_dice"][region])


def test_cli_writes_json_csv_markdown_and_refuses_to_overwrite(tmp_path, spec, data, capsys):
    run = make_run(tmp_path / "run", spec, data, "ciml")
    out = tmp_path / "table"
    args = ["robustness", "--run", str(run.path), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert "ct+pet" in capsys.readouterr().out
    rows = list(csv.reader((out / "robustness.csv").open(encoding="utf-8")))
    assert rows[0] == ["modalities", "GTVp", "GTVn", "mean"]
    assert [r[0] for r in rows[1:]] == ["ct+pet", "ct", "pet", "subset average"]
    assert rows[2][2] == "n/a" and rows[2][1] != "n/a"
    assert rows[4][1] != "n/a" and rows[4][2] == "n/a"  # GTVn's average needs every subset
    record = json.loads((out / "robustness.json").read_text(encoding="utf-8"))
    assert record["subsets"]["ct"]["dice"]["GTVn"] is None and record["dice"] == "aggregated Dice over cases"
    assert record["average"]["GTVn"]["estimate"] is None
    assert record["bootstrap"] == {"samples": 1000, "seed": 0, "confidence": 0.95, "unit": "case"}
    assert record["contributions"]["pet"]["GTVp"]["pairs"] == 1  # ct -> ct+pet
    assert record["contributions"]["pet"]["GTVn"]["pairs"] == 0  # GTVn is n/a from ct alone
    markdown = (out / "robustness.md").read_text(encoding="utf-8")
    assert "| ct | " in markdown and "GTVn average n/a: not predictable from ct" in markdown
    assert "ct: GTVn n/a, its owners and fallback owners (pet) are all missing" in markdown
    assert record["subsets"]["ct"]["not_predictable"] == {"GTVn": ["pet"]}
    assert "| pet | " in markdown.split("Marginal contribution")[1]
    contributions = list(csv.reader((out / "robustness_contributions.csv").open(encoding="utf-8")))
    assert contributions[0] == ["modality", "region", "estimate", "low", "high", "pairs"]
    assert {(r[0], r[1]) for r in contributions[1:]} == {
        (m, k) for m in ("ct", "pet") for k in ("GTVp", "GTVn", "mean")
    }
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_the_preset_fallback_owner_fills_every_cell(tmp_path, preset, data):
    run = make_run(tmp_path / "run", preset, data, "ciml")
    result = evaluate_robustness(run, data, settings=CPU, samples=50, progress=False)
    assert all(row.predictable == ("GTVp", "GTVn") for row in result.rows)
    assert "n/a" not in result.table()
    assert all(not math.isnan(result.average[k].estimate) for k in ("GTVp", "GTVn", "mean"))


@pytest.mark.parametrize("task", ["brats2020", "autopet", "hecktor2022"])
@pytest.mark.parametrize("name", ["ciml", "ciml-nomsg", "ensemble"])
def test_default_presets_predict_every_region_from_every_subset(task, name):
    spec = load_task(task)
    model = build_model(name, spec, widths=(4, 8), spatial_dims=3)
    predictor = Predictor(spec, plan=None, models=[model], patch_size=PATCH, settings=CPU)  # type: ignore[arg-type]
    for subset in modality_subsets(spec.modality_names):
        assert predictor.unpredictable_regions(subset) == {}, subset


def test_networks_that_need_every_modality_get_na_rows_with_their_reason(tmp_path, spec, data):
    run = make_run(tmp_path / "run", spec, data, "joint")
    result = evaluate_robustness(run, data, settings=CPU, progress=False)
    full, ct_only, pet_only = result.rows
    assert not math.isnan(full.mean) and not full.note
    for row in (ct_only, pet_only):
        assert all(math.isnan(v) for v in row.dice.values())
        assert "cannot run without" in row.note
    assert "cannot run without pet" in result.table()


def test_stacked_networks_trained_with_dropout_run_zero_filled(tmp_path, spec, data):
    run = make_run(tmp_path / "run", spec, data, "joint", zero_fill=True)
    result = evaluate_robustness(run, data, settings=CPU, samples=20, progress=False)
    assert all(not row.note and row.predictable == ("GTVp", "GTVn") for row in result.rows)
    full, ct_only, _ = result.rows
    assert ct_only.cases != full.cases  # the PET channel was zeroed, not ignored


# ------------------------------------------------------------------------------ summaries by hand


def _scores(modalities, dice_by_case, regions=("A", "B")) -> SubsetScores:
    """A row from case -> region -> Dice (None: the region is not predictable from this subset)."""
    predictable = tuple(r for r in regions if next(iter(dice_by_case.values()))[r] is not None)
    cases = {
        c: {r: {"dice": math.nan if d is None else d} for r, d in row.items()}
        for c, row in dice_by_case.items()
    }
    dice = {r: math.nan if r not in predictable else sum(row[r] for row in dice_by_case.values()) / len(cases)
            for r in regions}  # fmt: skip
    return SubsetScores(tuple(modalities), dice, predictable, cases)


#: Two modalities, two cases, two regions; B is not predictable from y alone.
TABLE = [
    _scores(("x", "y"), {"c1": {"A": 0.9, "B": 0.8}, "c2": {"A": 0.7, "B": 0.6}}),  # A 0.8, B 0.7
    _scores(("x",), {"c1": {"A": 0.6, "B": 0.5}, "c2": {"A": 0.4, "B": 0.3}}),  # A 0.5, B 0.4
    _scores(("y",), {"c1": {"A": 0.3, "B": None}, "c2": {"A": 0.1, "B": None}}),  # A 0.2, B n/a
]


def test_subset_average_and_contributions_equal_a_hand_computation():
    summary = summarize_subsets(TABLE, ("A", "B"), ("x", "y"), samples=0)
    assert summary.average["A"].estimate == pytest.approx((0.8 + 0.5 + 0.2) / 3)
    assert math.isnan(summary.average["B"].estimate)  # one subset cannot predict B: no 3-subset mean
    assert math.isnan(summary.average["mean"].estimate)
    x, y = summary.contributions["x"], summary.contributions["y"]
    assert x["A"].estimate == pytest.approx(0.8 - 0.2) and x["A"].pairs == 1  # y -> x+y
    assert y["A"].estimate == pytest.approx(0.8 - 0.5) and y["B"].estimate == pytest.approx(0.7 - 0.4)
    assert y["mean"].estimate == pytest.approx((0.8 + 0.7) / 2 - (0.5 + 0.4) / 2)
    assert math.isnan(x["B"].estimate) and x["B"].pairs == 0  # without x, B is n/a: no pair to compare
    assert math.isnan(x["A"].low)  # no resamples, no interval


def test_three_modalities_average_over_seven_subsets_and_three_pairs():
    subsets = modality_subsets(("a", "b", "c"))
    value = {s: 0.1 * len(s) + (0.05 if "a" in s else 0.0) for s in subsets}  # a adds 0.05 everywhere
    rows = [_scores(s, {"c1": {"A": value[s]}, "c2": {"A": value[s]}}, regions=("A",)) for s in subsets]
    summary = summarize_subsets(rows, ("A",), ("a", "b", "c"), samples=0)
    assert summary.average["A"].estimate == pytest.approx(sum(value.values()) / 7)
    a, b = summary.contributions["a"]["A"], summary.contributions["b"]["A"]
    assert a.pairs == b.pairs == 3  # b, c, b+c gain a
    assert a.estimate == pytest.approx(0.15)
    # b: a -> a+b, c -> b+c, a+c -> all: +0.1 each
    assert b.estimate == pytest.approx(0.1)


def test_aggregated_dice_is_recomputed_from_overlap_counts():
    def counts(i, p, r):
        return {"GTVp": {"dice": math.nan, "intersection_mm3": i, "pred_mm3": p, "ref_mm3": r}}

    rows = [
        SubsetScores(
            ("ct", "pet"), {"GTVp": 0.0}, ("GTVp",), {"a": counts(10, 10, 20), "b": counts(0, 0, 10)}
        ),
        SubsetScores(("ct",), {"GTVp": 0.0}, ("GTVp",), {"a": counts(5, 10, 20), "b": counts(5, 10, 10)}),
        SubsetScores(("pet",), {"GTVp": 0.0}, ("GTVp",), {"a": counts(0, 0, 20), "b": counts(0, 0, 10)}),
    ]
    summary = summarize_subsets(rows, ("GTVp",), ("ct", "pet"), aggregated=True, samples=0)
    both, ct, pet = 2 * 10 / 40, 2 * 10 / 50, 0.0  # sums over cases, not means of case Dice
    assert summary.average["GTVp"].estimate == pytest.approx((both + ct + pet) / 3)
    assert summary.contributions["pet"]["GTVp"].estimate == pytest.approx(both - ct)


def test_bootstrap_is_seeded_and_its_interval_holds_the_estimate():
    rng = np.random.default_rng(3)
    subsets = modality_subsets(("x", "y"))
    cases = [f"c{i}" for i in range(12)]
    rows = [
        _scores(s, {c: {"A": float(rng.uniform(0.2, 0.9)), "B": float(rng.uniform(0.2, 0.9))} for c in cases})
        for s in subsets
    ]
    first = summarize_subsets(rows, ("A", "B"), ("x", "y"), samples=200, seed=7)
    again = summarize_subsets(rows, ("A", "B"), ("x", "y"), samples=200, seed=7)
    other = summarize_subsets(rows, ("A", "B"), ("x", "y"), samples=200, seed=8)
    assert first == again and first != other
    point = summarize_subsets(rows, ("A", "B"), ("x", "y"), samples=0)
    intervals = [*first.average.values(), *(i for c in first.contributions.values() for i in c.values())]
    estimates = [*point.average.values(), *(i for c in point.contributions.values() for i in c.values())]
    for interval, estimate in zip(intervals, estimates, strict=True):
        assert interval.estimate == pytest.approx(estimate.estimate)  # resampling leaves the estimate alone
        assert interval.low <= interval.estimate <= interval.high and interval.low < interval.high


def test_result_tables_show_the_average_row_and_contributions():
    result = RobustnessResult("toy", "brats", "mean Dice over cases", ("A", "B"), TABLE, 2, ("x", "y"), 0)
    grid = result.grid()
    assert grid[-1][:2] == ["subset average", f"{(0.8 + 0.5 + 0.2) / 3:.4f}"] and grid[-1][2] == "n/a"
    assert "B average n/a: not predictable from y" in result.table()
    assert result.contribution_grid()[1] == ["x", "0.6000", "n/a", "n/a", "1"]
