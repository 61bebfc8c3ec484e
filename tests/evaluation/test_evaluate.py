"""evaluate_folders and `ciml evaluate` on tiny NIfTI label maps written on the fly."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ciml.cli
from ciml.errors import ParameterError
from ciml.evaluation.evaluate import (
    EvaluationError,
    evaluate_folders,
    reference_files,
    resolve_convention,
)
from ciml.metrics import HD95_EMPTY_PENALTY, brats_case_metrics, hd95_surface
from ciml.tasks import load_task

SPACING = (1.0, 1.2, 2.5)
SHAPE = (12, 12, 10)


def save(path: Path, labels: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-5.0, 3.0, 7.0)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))
    return path


def brats_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:8, 2:8, 2:8] = 2
    labels[3:7, 3:7, 3:7] = 1
    labels[4:6, 4:6, 4:6] = 4
    return labels


def brats_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case id -> (prediction, reference): perfect, missed ET, shifted one voxel along the 2.5 mm axis."""
    ref = brats_labels()
    missed_et = np.where(ref == 4, 1, ref).astype(np.uint8)
    return {"case_a": (ref, ref), "case_b": (missed_et, ref), "case_c": (np.roll(ref, 1, axis=2), ref)}


def write_flat(root: Path, cases, suffix=".nii.gz") -> tuple[Path, Path]:
    for case_id, (pred, ref) in cases.items():
        save(root / "pred" / f"{case_id}{suffix}", pred)
        save(root / "ref" / f"{case_id}{suffix}", ref)
    return root / "pred", root / "ref"


# ------------------------------------------------------------------------------------------ round trip


def test_brats_round_trip_matches_case_metrics_and_writes_json_and_csv(tmp_path):
    cases = brats_cases()
    pred_dir, ref_dir = write_flat(tmp_path, cases)
    result = evaluate_folders(pred_dir, ref_dir, "brats2020")

    assert result.convention == "brats" and result.regions == ("WT", "TC", "ET")
    assert list(result.cases) == sorted(cases)
    spec = load_task("brats2020")
    for case_id, (pred, ref) in cases.items():  # spacing must come from the header
        expected = brats_case_metrics(pred, ref, spec, SPACING)
        for region in result.regions:
            assert result.cases[case_id][region] == pytest.approx(expected[region])
    assert result.cases["case_a"]["ET"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    assert result.cases["case_b"]["ET"]["hd95"] == HD95_EMPTY_PENALTY
    assert result.cases["case_c"]["WT"]["hd95"] == pytest.approx(2.5)
    et_dice = [result.cases[c]["ET"]["dice"] for c in cases]
    stats = result.summary["regions"]["ET"]["dice"]
    assert stats["mean"] == pytest.approx(np.mean(et_dice))
    assert stats["median"] == pytest.approx(np.median(et_dice))
    assert stats["std"] == pytest.approx(np.std(et_dice))
    assert stats["n"] == 3

    out = tmp_path / "out"
    result.write(out / "metrics.json", out / "metrics.csv")
    data = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert data["task"] == "brats2020" and data["n_cases"] == 3
    assert data["cases"]["case_b"]["ET"]["dice"] == 0.0
    assert data["summary"]["regions"]["WT"]["hd95"]["mean"] == pytest.approx(
        result.summary["regions"]["WT"]["hd95"]["mean"]
    )
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    assert list(rows[0]) == ["case", "region", "dice", "hd95", "sensitivity", "specificity"]
    assert float(rows[0]["dice"]) == result.cases[rows[0]["case"]][rows[0]["region"]]["dice"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]  # no temporary files left
    table = result.table()
    assert "WT" in table and "hd95" in table and "3 cases" in table


@pytest.mark.parametrize("layout", ["brats", "labelsTr", "nii"])
def test_reference_layouts_give_the_same_result(tmp_path, layout):
    cases = brats_cases()
    pred_dir, flat_ref = write_flat(tmp_path / "flat", cases)
    expected = evaluate_folders(pred_dir, flat_ref, "brats2020").cases
    ref_root = tmp_path / layout
    for case_id, (_, ref) in cases.items():
        if layout == "brats":  # case_c mimics the Kaggle copy's case 355 seg file name
            name = "W39_1998.09.19_Segm.nii" if case_id == "case_c" else f"{case_id}_seg.nii.gz"
            save(ref_root / case_id / name, ref)
            save(ref_root / case_id / f"{case_id}_flair.nii.gz", np.zeros(SHAPE))
        elif layout == "labelsTr":
            save(ref_root / "labelsTr" / f"{case_id}.nii.gz", ref)
        else:
            save(ref_root / f"{case_id}.nii", ref)
    assert sorted(reference_files(ref_root, "brats2020")) == sorted(cases)
    pred_nii = tmp_path / "pred_nii"
    for case_id, (pred, _) in cases.items():
        save(pred_nii / f"{case_id}.nii", pred)
    assert evaluate_folders(pred_nii, ref_root, "brats2020").cases == expected


# ------------------------------------------------------------------------------------------ conventions


@pytest.mark.parametrize(
    ("task", "convention"),
    [
        ("brats2020", "brats"),
        ("autopet", "autopet"),
        ("hecktor2022", "hecktor"),
        ("shapecomposition", "brats"),
    ],
)
def test_convention_defaults_from_task_name(task, convention):
    assert resolve_convention(load_task(task)).name == convention


def test_unknown_convention_is_an_error():
    with pytest.raises(ParameterError, match="^convention: 'kits'"):
        resolve_convention(load_task("brats2020"), "kits")


def test_hecktor_summary_is_the_aggregated_dice(tmp_path):
    ref, preds = np.zeros((3, *SHAPE), np.uint8), np.zeros((3, *SHAPE), np.uint8)
    ref[0, :2, :5, 0] = 1  # GTVp 10 voxels, found exactly
    preds[0, :2, :5, 0] = 1
    ref[1, 0, :4, 0] = 1  # GTVp 4 voxels, prediction elsewhere (2 voxels)
    preds[1, 5, :2, 0] = 1
    ref[2, 0, 0, :2] = 2  # GTVn 2 voxels, prediction 4 voxels covering them; no GTVp at all
    preds[2, 0, 0, :4] = 2
    cases = {f"CHUP-{i:03d}": (preds[i], ref[i]) for i in range(3)}
    result = evaluate_folders(*write_flat(tmp_path, cases), "hecktor2022")
    agg = result.summary["aggregated_dice"]
    assert agg["GTVp"] == pytest.approx(2 * 10 / (20 + 6))
    assert agg["GTVn"] == pytest.approx(2 * 2 / 6)
    assert agg["mean"] == pytest.approx((20 / 26 + 4 / 6) / 2)
    per_case_mean = result.summary["regions"]["GTVp"]["dice"]["mean"]
    # Per case (both-empty scores 1) it is 2/3: informative, but not the ranking score.
    assert per_case_mean == pytest.approx((1 + 0 + 1) / 3)
    assert result.cases["CHUP-001"]["GTVp"]["pred_mm3"] == pytest.approx(2 * np.prod(SPACING))
    assert "dice_agg" in result.table()


def test_hecktor_class_absent_from_every_case_is_not_computable(tmp_path):
    ref = np.zeros(SHAPE, np.uint8)
    ref[:2, :5, 0] = 1  # GTVp only; no case has a node, predicted or delineated
    result = evaluate_folders(*write_flat(tmp_path, {"CHUP-001": (ref, ref)}), "hecktor2022")
    agg = result.summary["aggregated_dice"]
    assert agg["GTVp"] == 1.0 and math.isnan(agg["GTVn"]) and math.isnan(agg["mean"])
    assert agg["not_computable"] == ["GTVn"]
    assert "GTVn: not computable" in result.table()
    assert result.to_dict()["summary"]["aggregated_dice"]["mean"] is None


def test_autopet_negative_cases_are_null_dice_and_counted_out(tmp_path):
    spacing = (2.0, 2.0, 3.0)
    positive, negative = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    positive[1:3, 1:3, 1:3] = 1
    fp = np.zeros(SHAPE, np.uint8)
    fp[8:10, 8, 8] = 1  # 2 voxels of false positive on the negative case
    for case_id, pred, ref in [("PETCT_pos", positive, positive), ("PETCT_neg", fp, negative)]:
        save(tmp_path / "pred" / f"{case_id}.nii.gz", pred, spacing)
        save(tmp_path / "ref" / f"{case_id}.nii.gz", ref, spacing)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", "autopet")
    assert result.cases["PETCT_neg"]["lesion"]["fp_volume_ml"] == pytest.approx(2 * 12 / 1000)
    assert math.isnan(result.cases["PETCT_neg"]["lesion"]["dice"])
    assert result.summary["regions"]["lesion"]["dice"] == {"mean": 1.0, "median": 1.0, "std": 0.0, "n": 1}
    result.write(tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert data["cases"]["PETCT_neg"]["lesion"]["dice"] is None


# ------------------------------------------------------------------------------------------ bad input


def test_differing_case_lists_name_missing_and_extra_cases(tmp_path):
    ref = brats_labels()
    for case_id in ("a", "b", "extra_pred"):
        save(tmp_path / "pred" / f"{case_id}.nii.gz", ref)
    for case_id in ("a", "b", "only_ref"):
        save(tmp_path / "ref" / f"{case_id}.nii.gz", ref)
    with pytest.raises(
        EvaluationError, match=r"no prediction in .*pred for 1 case\(s\): only_ref.*extra_pred"
    ):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


def test_empty_prediction_folder_is_an_error(tmp_path):
    save(tmp_path / "ref" / "a.nii.gz", brats_labels())
    (tmp_path / "pred").mkdir()
    with pytest.raises(EvaluationError, match="no prediction files"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


def test_shape_mismatch_names_the_file_and_both_shapes(tmp_path):
    save(tmp_path / "ref" / "a.nii.gz", brats_labels())
    save(tmp_path / "pred" / "a.nii.gz", brats_labels()[:, :, :8])
    with pytest.raises(
        EvaluationError, match=r"pred/a\.nii\.gz: shape \(12, 12, 8\) differs .* \(12, 12, 10\)"
    ):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


def test_affine_mismatch_names_the_file_and_both_affines(tmp_path):
    save(tmp_path / "ref" / "a.nii.gz", brats_labels())
    save(tmp_path / "pred" / "a.nii.gz", brats_labels(), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(
        EvaluationError, match=r"pred/a\.nii\.gz: affine \[1 0 0 -5; 0 1 0 3.*\[1 0 0 -5; 0 1.2 0 3"
    ):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


@pytest.mark.parametrize(("value", "message"), [(3, r"label values \[3\]"), (0.5, "non-integer")])
def test_labels_outside_the_spec_are_rejected(tmp_path, value, message):
    pred = brats_labels().astype(np.float32)
    pred[0, 0, 0] = value
    save(tmp_path / "ref" / "a.nii.gz", brats_labels())
    path = tmp_path / "pred" / "a.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(pred, nib.load(str(tmp_path / "ref" / "a.nii.gz")).affine), str(path))
    with pytest.raises(EvaluationError, match=rf"pred/a\.nii\.gz: .*{message}"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


def test_missing_reference_folder_and_unrecognised_layout(tmp_path):
    save(tmp_path / "pred" / "a.nii.gz", brats_labels())
    with pytest.raises(EvaluationError, match="not a folder"):
        evaluate_folders(tmp_path / "pred", tmp_path / "nowhere", "brats2020")
    (tmp_path / "ref" / "a").mkdir(parents=True)
    with pytest.raises(EvaluationError, match="no reference labels found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", "brats2020")


# ------------------------------------------------------------------------------------------ writing


def test_write_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    result = evaluate_folders(*write_flat(tmp_path, brats_cases()), "brats2020")
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    target.write_text("keep me", encoding="utf-8")
    with pytest.raises(ParameterError, match="^overwrite: .*already exists"):
        result.write(target)
    assert target.read_text(encoding="utf-8") == "keep me"
    result.write(target, overwrite=True)
    assert json.loads(target.read_text(encoding="utf-8"))["n_cases"] == 3

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("ciml.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        result.write(tmp_path / "out" / "new.json")
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli(monkeypatch):
    """`ciml` with only this subcommand registered, so other commands' state cannot break these tests."""
    monkeypatch.setattr(ciml.cli, "SUBCOMMANDS", ("evaluate",))
    return ciml.cli.main


def test_cli_writes_outputs_and_refuses_to_overwrite(tmp_path, cli, capsys):
    pred_dir, ref_dir = write_flat(tmp_path, brats_cases())
    out, table = tmp_path / "metrics.json", tmp_path / "metrics.csv"
    argv = [
        "evaluate",
        "--task",
        "brats2020",
        "--pred",
        str(pred_dir),
        "--ref",
        str(ref_dir),
        "--out",
        str(out),
    ]
    assert cli([*argv, "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "WT" in printed and "dice" in printed and "hd95" in printed
    first = out.read_text(encoding="utf-8")
    assert json.loads(first)["n_cases"] == 3 and table.is_file()

    out.write_text("previous run", encoding="utf-8")
    assert cli(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "previous run"
    assert cli([*argv, "--overwrite"]) == 0
    assert out.read_text(encoding="utf-8") == first


def test_cli_reports_bad_input_in_one_line_and_writes_nothing(tmp_path, cli, capsys):
    pred_dir, ref_dir = write_flat(tmp_path, brats_cases())
    (pred_dir / "case_c.nii.gz").unlink()
    out = tmp_path / "metrics.json"
    code = cli(
        ["evaluate", "--task", "brats2020", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciml evaluate: error: case lists differ") and "case_c" in err and "\n" not in err
    assert not out.exists()


def test_cli_help_explains_options(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--task", "--pred", "--ref", "--out", "--csv", "--convention", "--overwrite"):
        assert option in text


# --------------------------------------------------------------------------- references in any layout


def _lesion(value: int = 1) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:7, 3:7, 3:6] = value
    return labels


def test_references_from_autopet_study_folders_with_appledouble_files(tmp_path):
    root = tmp_path / "FDG-PET-CT-Lesions"
    cases = {
        "PETCT_0af7ffe12a_08-12-2005-NA-PET-CT-96698": _lesion(),
        "PETCT_1285b86bea_03-05-2004-NA-43210": None,
    }
    for case_id, seg in cases.items():
        patient, study = case_id.split("_", 2)[:2], case_id.split("_", 2)[2]
        folder = root / "_".join(patient) / study
        for name in ("SUV", "CTres"):
            save(folder / f"{name}.nii.gz", np.ones(SHAPE))
        save(folder / "SEG.nii.gz", np.zeros(SHAPE, np.uint8) if seg is None else seg)  # negative study
        (folder / "._SEG.nii.gz").write_bytes(b"\x00\x05\x16\x07")
        save(tmp_path / "pred" / f"{case_id}.nii.gz", np.zeros(SHAPE, np.uint8) if seg is None else seg)
    (tmp_path / "pred" / "._PETCT_x.nii.gz").write_bytes(b"\x00")
    assert set(reference_files(root, "autopet")) == set(cases)
    result = evaluate_folders(tmp_path / "pred", root, "autopet")
    assert result.cases["PETCT_0af7ffe12a_08-12-2005-NA-PET-CT-96698"]["lesion"]["dice"] == 1.0


def test_references_from_brats2023_seg_files(tmp_path):
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    ref = _lesion(3)
    ref[3, 3, 3] = 1
    for case_id in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
        save(root / case_id / f"{case_id}-t1c.nii.gz", np.ones(SHAPE))
        save(root / case_id / f"{case_id}-seg.nii.gz", ref)
        (root / case_id / f"._{case_id}-seg.nii.gz").write_bytes(b"\x00")
        save(tmp_path / "pred" / f"{case_id}.nii.gz", ref)
    result = evaluate_folders(tmp_path / "pred", root, "brats2023")
    assert result.convention == "brats2023" and result.regions == ("WT", "TC", "ET")
    assert all(result.cases[c]["ET"]["dice"] == 1.0 for c in result.cases)


def test_references_from_a_dataset_root_pick_the_labels_folder_of_the_predictions(tmp_path):
    root = tmp_path / "Dataset500_Lesions"
    info = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(info | {"file_ending": ".nii.gz"}), encoding="utf-8")
    save(root / "imagesTr" / "train_001_0000.nii.gz", np.ones(SHAPE))
    save(root / "labelsTr" / "train_001.nii.gz", _lesion())
    save(root / "labelsTs" / "test_001.nii.gz", _lesion())
    save(tmp_path / "pred" / "test_001.nii.gz", _lesion())
    result = evaluate_folders(tmp_path / "pred", root)  # no task: the spec comes from dataset.json
    assert result.task == "Dataset500_Lesions" and list(result.cases) == ["test_001"]
    assert result.cases["test_001"]["lesion"]["dice"] == 1.0
    assert sorted(reference_files(root)) == ["train_001"]


def test_references_from_msd_labels(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    root.mkdir()
    info = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    }
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    save(root / "imagesTr" / "BRATS_001.nii.gz", np.ones((*SHAPE, 4)))
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00")
    save(root / "labelsTr" / "BRATS_001.nii.gz", _lesion(2))
    save(tmp_path / "pred" / "BRATS_001.nii.gz", _lesion(2))
    result = evaluate_folders(tmp_path / "pred", root, "msd_braintumour")
    assert result.cases["BRATS_001"]["TC"]["dice"] == 1.0


# ------------------------------------------------------------------------------------------ BraTS 2023+

BRATS2023_SPEC = """\
name: brats2023
modalities: {t1c: mri, t1n: mri, t2f: mri, t2w: mri}
regions: {WT: [1, 2, 3], TC: [1, 3], ET: [3]}
decomposition: {t2f: [WT], t1n: [TC], t2w: [WT, TC], t1c: [TC, ET]}
assembly: [[WT, 2], [TC, 1], [ET, 3]]
"""


def brats2023_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One case found exactly; one whose second ET lesion is missed and a false-positive blob added."""
    ref = np.zeros((40, 40, 16), np.uint8)  # far enough apart for the 3-voxel dilation
    ref[1:8, 1:8, 1:6] = 2
    ref[2:7, 2:7, 2:5] = 1
    ref[3:6, 3:6, 2:5] = 3  # 27 voxels = 81 mm^3, above the 50 mm^3 threshold
    second = ref.copy()
    second[20:23, 20:23, 8:11] = 3  # a 27-voxel ET lesion = 81 mm^3 > 50 (1 x 1.2 x 2.5 mm voxels)
    pred = ref.copy()
    pred[35:37, 2:4, 12:14] = 3  # false positive, far from every lesion
    return {"BraTS-GLI-00001-000": (ref, ref), "BraTS-GLI-00002-000": (pred, second)}


def test_brats2023_defaults_to_lesionwise_and_legacy_with_surface_hd95(tmp_path):
    spec = tmp_path / "brats2023.yaml"
    spec.write_text(BRATS2023_SPEC)
    result = evaluate_folders(*write_flat(tmp_path, brats2023_cases()), spec)
    assert (result.convention, result.metric_set, result.hd95) == ("brats2023", "all", "surface")
    assert result.regions == ("WT", "TC", "ET")
    perfect, flawed = result.cases["BraTS-GLI-00001-000"]["ET"], result.cases["BraTS-GLI-00002-000"]["ET"]
    assert perfect["lesionwise_dice"] == 1.0 and perfect["hd95"] == 0.0
    # ET lesions: the first found exactly, the second missed, one false positive -> (1 + 0 + 0) / 3
    assert flawed["lesionwise_dice"] == pytest.approx(1 / 3)
    assert flawed["lesionwise_hd95"] == pytest.approx((0 + 374 + 374) / 3)
    assert (flawed["n_tp"], flawed["n_fp"], flawed["n_fn"]) == (1, 1, 1)
    assert result.summary["regions"]["ET"]["lesionwise_dice"]["mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert "lesionwise_dice" in result.table() and "sensitivity" in result.table()

    legacy = evaluate_folders(tmp_path / "pred", tmp_path / "ref", spec, metrics="legacy")
    assert set(legacy.cases["BraTS-GLI-00002-000"]["ET"]) == {"dice", "hd95", "sensitivity", "specificity"}
    assert legacy.cases["BraTS-GLI-00002-000"]["ET"]["dice"] == pytest.approx(flawed["dice"])


def test_lesionwise_refuses_conventions_without_rules_and_mismatched_labels(tmp_path):
    pred_dir, ref_dir = write_flat(tmp_path, brats_cases())
    with pytest.raises(ParameterError, match="^metrics: .*no lesion-wise rules"):
        evaluate_folders(pred_dir, ref_dir, "brats2020", metrics="lesionwise")
    with pytest.raises(ParameterError, match=r"^convention: .*label values \[1, 2, 3\].*brats2020"):
        evaluate_folders(pred_dir, ref_dir, "brats2020", convention="brats2023")
    with pytest.raises(ParameterError, match="^hd95: .*reports no HD95"):
        evaluate_folders(pred_dir, ref_dir, "hecktor2022", hd95="surface")


def test_brats2020_can_use_the_surface_hd95(tmp_path):
    cases = brats_cases()
    result = evaluate_folders(*write_flat(tmp_path, cases), "brats2020", hd95="surface")
    pred, ref = cases["case_c"]
    spec = load_task("brats2020")
    wt = spec.labels_to_regions(pred)[0], spec.labels_to_regions(ref)[0]
    assert result.cases["case_c"]["WT"]["hd95"] == pytest.approx(hd95_surface(*wt, SPACING))
    assert result.cases["case_b"]["ET"]["hd95"] == HD95_EMPTY_PENALTY  # the 2020 penalty stays


def test_cli_metrics_flag_and_errors_in_flags(tmp_path, capsys):
    spec = tmp_path / "brats2023.yaml"
    spec.write_text(BRATS2023_SPEC)
    pred_dir, ref_dir = write_flat(tmp_path, brats2023_cases())
    out = tmp_path / "m.json"
    args = ["evaluate", "--task", str(spec), "--pred", str(pred_dir), "--ref", str(ref_dir)]
    args += ["--out", str(out)]
    assert ciml.cli.main([*args, "--metrics", "lesionwise"]) == 0
    data = json.loads(out.read_text())
    assert data["metrics"] == "lesionwise" and data["hd95"] == "surface"
    assert set(data["cases"]["BraTS-GLI-00002-000"]["ET"]) == {
        "lesionwise_dice",
        "lesionwise_hd95",
        "n_tp",
        "n_fp",
        "n_fn",
    }
    capsys.readouterr()
    legacy_task = [*args[:2], "brats2020", *args[3:-1], str(tmp_path / "x.json")]
    assert ciml.cli.main([*legacy_task, "--metrics", "lesionwise"]) == 1
    err = capsys.readouterr().err
    assert "error: --metrics: 'lesionwise'" in err and "brats2023" in err
    assert not (tmp_path / "x.json").exists()
