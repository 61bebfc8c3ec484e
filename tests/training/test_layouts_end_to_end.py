"""Datasets as distributed, end to end through the CLI: check-data, train, predict, evaluate (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ciml.cli import main

TINY = ["--patch", "16", "16", "16", "--widths", "4", "8", "--batch-size", "2", "--no-progress"]
TRAIN = ["--device", "cpu", "--iterations", "2", "--validate-every", "2", *TINY]
SHAPE = (16, 16, 12)
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), path)


def _tumour(rng: np.random.Generator) -> np.ndarray:
    """Nested labels: 1 outside, 2 inside, 3 at the centre (MSD: edema, non-enhancing, enhancing)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - rng.uniform([6, 6, 5], [10, 10, 7]), axis=-1)
    return np.select([distance < 2, distance < 3.5, distance < 5], [3, 2, 1], 0).astype(np.uint8)


def write_msd(root: Path, train: int = 3) -> Path:
    """Task01_BrainTumour as its tar unpacks: 4D images, labelsTr, imagesTs without labels, ._* twins."""
    rng = np.random.default_rng(0)
    info = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": train,
        "numTest": 1,
    }
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(info, indent=4), encoding="utf-8")
    (root / "._dataset.json").write_bytes(APPLEDOUBLE)
    for i in range(1, train + 2):
        folder = "imagesTr" if i <= train else "imagesTs"
        label = _tumour(rng)
        image = np.stack([100 + 20 * k * (label > 0) + rng.normal(0, 5, SHAPE) for k in range(1, 5)], axis=-1)
        _save(root / folder / f"BRATS_{i:03d}.nii.gz", image.astype(np.float32))
        (root / folder / f"._BRATS_{i:03d}.nii.gz").write_bytes(APPLEDOUBLE)
        if folder == "imagesTr":
            _save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label)
            (root / "labelsTr" / f"._BRATS_{i:03d}.nii.gz").write_bytes(APPLEDOUBLE)
    return root


def test_msd_task01_check_train_predict_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_msd(tmp_path / "Task01_BrainTumour")
    assert main(["check-data", "--task", "msd_braintumour", "--data", str(data), "--quiet"]) == 0
    assert "checked 3 cases (6 files): 0 errors" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--task", "msd_braintumour", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    test_out = tmp_path / "pred_ts"
    assert main(["predict", "--run", str(run), "--input", str(data / "imagesTs"), "--output", str(test_out),
                 "--device", "cpu"]) == 0  # fmt: skip
    written = nib.load(test_out / "BRATS_004.nii.gz")
    assert written.shape == SHAPE and set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}
    pred = tmp_path / "pred_tr"
    assert (
        main(["predict", "--run", str(run), "--input", str(data), "--output", str(pred), "--device", "cpu"])
        == 0
    )
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--task", "msd_braintumour", "--pred", str(pred), "--ref", str(data),
                 "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 3 and set(metrics["summary"]["regions"]) == {"WT", "TC", "ET"}


def write_autopet_nnunet(root: Path, channel_names: dict[str, str], cases: int = 3) -> Path:
    """nnU-Net's Dataset221 conversion: _0000 CTres, _0001 SUV, labelsTr, and one labelled test case."""
    rng = np.random.default_rng(1)
    info = {"channel_names": channel_names, "labels": {"background": 0, "tumor": 1}, "numTraining": cases}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(info | {"file_ending": ".nii.gz"}), encoding="utf-8")
    for i in range(cases + 1):
        split = "Tr" if i < cases else "Ts"
        cid = f"PETCT_{i:010x}_08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-{i:05d}"
        lesion = (_tumour(rng) > 0).astype(np.uint8)
        _save(
            root / f"images{split}" / f"{cid}_0000.nii.gz", (rng.normal(0, 30, SHAPE) - 50).astype(np.float32)
        )
        _save(
            root / f"images{split}" / f"{cid}_0001.nii.gz",
            (1 + 8 * lesion + rng.random(SHAPE)).astype(np.float32),
        )
        _save(root / f"labels{split}" / f"{cid}.nii.gz", lesion)
    return root


def test_nnunet_autopet_without_task_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """channel_names CT and PET: the spec comes from dataset.json, and PET is never read as CT."""
    data = write_autopet_nnunet(tmp_path / "Dataset221_AutoPETII_2023", {"0": "CT", "1": "PET"})
    assert main(["check-data", "--data", str(data), "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["task"]["modalities"] == {"ct": "ct", "pet": "pet"}
    assert info["task"]["regions"] == {"tumor": [1]}
    pred = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(data / "imagesTs"), "--output", str(pred),
                 "--device", "cpu"]) == 0  # fmt: skip
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["n_cases"] == 1


def test_nnunet_autopet_channels_both_named_ct_refused_then_mapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_autopet_nnunet(tmp_path / "Dataset221_AutoPETII_2023", {"0": "CT", "1": "CT"}, cases=2)
    run = tmp_path / "run"
    assert main(["train", "--task", "autopet", "--data", str(data), "--out", str(run), *TRAIN]) == 1
    err = capsys.readouterr().err
    assert "channels are 0 CT, 1 CT, the task's modalities pet, ct" in err
    assert "--channels pet=ID,ct=ID" in err
    assert not run.exists()
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 1
    assert "share the name 'CT'" in capsys.readouterr().err
    assert (
        main(["check-data", "--task", "autopet", "--data", str(data), "--channels", "pet=1,ct=0", "--quiet"])
        == 0
    )


def test_training_refuses_unlabelled_cases_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_msd(tmp_path / "Task01_BrainTumour")
    (data / "labelsTr" / "BRATS_002.nii.gz").unlink()
    (data / "labelsTr" / "BRATS_003.nii.gz").unlink()
    brats = tmp_path / "brats"
    rng = np.random.default_rng(2)
    for cid, seg in (("BraTS2021_00000", True), ("BraTS2021_00001", True), ("BraTS2021_00002", False)):
        for m in ("flair", "t1", "t1ce", "t2"):
            _save(brats / cid / f"{cid}_{m}.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
        if seg:
            _save(brats / cid / f"{cid}_seg.nii.gz", np.where(_tumour(rng) > 0, 2, 0).astype(np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--task", "brats2020", "--data", str(brats), "--out", str(run), *TRAIN]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 cases have no label file" in err and "BraTS2021_00002" in err
    assert not run.exists()
    assert main(["train", "--task", "msd_braintumour", "--data", str(data), "--out", str(run), *TRAIN]) == 1
    err = capsys.readouterr().err
    assert "2 of 3 cases have no label file" in err and "BRATS_002, BRATS_003." in err
    assert not run.exists()


def write_brats_gli(root: Path, cases: int = 3, cavity: bool = False) -> Path:
    """BraTS 2023/2024 GLI as distributed: BraTS-GLI-NNNNN-NNN/<case>-{t1c,t1n,t2f,t2w,seg}.nii.gz.

    Labels 1 NCR/NETC, 2 SNFH, 3 ET; with ``cavity`` (2024 post-treatment) also 4 RC, a blob apart.
    """
    rng = np.random.default_rng(1)
    for i in range(cases):
        case = f"BraTS-GLI-{i:05d}-000"
        labels = _tumour(rng)
        labels = np.select([labels == 1, labels == 2, labels == 3], [2, 1, 3], 0).astype(np.uint8)
        if cavity:
            labels[1:4, 1:4, 1:4] = 4
        for k, modality in enumerate(("t1c", "t1n", "t2f", "t2w"), start=1):
            image = 100 + 15 * k * (labels > 0) + rng.normal(0, 5, SHAPE)
            _save(root / case / f"{case}-{modality}.nii.gz", image.astype(np.float32))
        _save(root / case / f"{case}-seg.nii.gz", labels)
        (root / case / f"._{case}-seg.nii.gz").write_bytes(APPLEDOUBLE)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task, cavity", [("brats2023", False), ("brats2024", True)])
def test_brats_gli_check_train_predict_evaluate_lesionwise(tmp_path, capsys, task: str, cavity: bool) -> None:
    data = write_brats_gli(tmp_path / "ASNR-MICCAI-BraTS-GLI-TrainingData", cavity=cavity)
    assert main(["check-data", "--task", task, "--data", str(data), "--quiet"]) == 0
    assert "checked 3 cases" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--task", task, "--data", str(data), "--out", str(run), *TRAIN]) == 0
    pred = tmp_path / "pred"
    assert (
        main(["predict", "--run", str(run), "--input", str(data), "--output", str(pred), "--device", "cpu"])
        == 0
    )
    written = np.asarray(nib.load(pred / "BraTS-GLI-00000-000.nii.gz").dataobj)
    assert set(np.unique(written)) <= ({0, 1, 2, 3, 4} if cavity else {0, 1, 2, 3})
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--task", task, "--pred", str(pred), "--ref", str(data), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 3 and metrics["convention"] == task and metrics["metrics"] == "all"
    et = metrics["cases"]["BraTS-GLI-00000-000"]["ET"]
    assert {"dice", "hd95", "lesionwise_dice", "lesionwise_hd95"} <= set(et)
