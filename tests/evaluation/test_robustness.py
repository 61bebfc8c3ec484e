"""Per-subset robustness table on 2 tiny HECKTOR cases (ct, pet: 3 subsets), scored like `ciml evaluate`."""

from __future__ import annotations

import csv
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
from ciml.evaluation.robustness import evaluate_robustness, modality_subsets
from ciml.inference import InferenceSettings, predict_folder
from ciml.models import build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import load_task

SHAPE = (16, 20, 12)
AFFINE = np.array([[-1.0, 0, 0, 10.0], [0, 1.5, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
PATCH = (16, 16, 16)
CPU = InferenceSettings(device="cpu")



@pytest.fixture(scope="module")
def spec():
    return load_task("hecktor2022")


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


def make_run(folder: Path, spec, data: Path, name: str) -> RunFolder:
    torch.manual_seed(0)
    model = build_model(name, spec, widths=(4, 8), spatial_dims=3)
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
    assert [r[0] for r in rows[1:]] == ["ct+pet", "ct", "pet"]
    assert rows[2][2] == "n/a" and rows[2][1] != "n/a"
    record = json.loads((out / "robustness.json").read_text(encoding="utf-8"))
    assert record["subsets"]["ct"]["dice"]["GTVn"] is None and record["dice"] == "aggregated Dice over cases"
    assert "| ct | " in (out / "robustness.md").read_text(encoding="utf-8")
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_networks_that_need_every_modality_get_na_rows_with_their_reason(tmp_path, spec, data):
    run = make_run(tmp_path / "run", spec, data, "joint")
    result = evaluate_robustness(run, data, settings=CPU, progress=False)
    full, ct_only, pet_only = result.rows
    assert not math.isnan(full.mean) and not full.note
    for row in (ct_only, pet_only):
        assert all(math.isnan(v) for v in row.dice.values())
        assert "cannot run without" in row.note
    assert "cannot run without pet" in result.table()
