"""Dataset readers: each layout, generated on disk in its exact naming, becomes the right list of cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ciml.data.integrity import check_dataset
from ciml.data.layouts import DatasetLayoutError, detect_layout, read_dataset
from ciml.tasks import load_task

SHAPE = (8, 8, 8)
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")


def _nii(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    """A tiny NIfTI: random image by default, or the given data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(len(str(path))).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _label(values: tuple[int, ...] = (0, 1, 2, 4)) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    for i, value in enumerate(values):
        label[i, :2, :2] = value
    return label


def _brats_case(folder: Path, cid: str, suffix: str = ".nii.gz", seg: bool = True) -> Path:
    for modality in BRATS_MODALITIES:
        _nii(folder / cid / f"{cid}_{modality}{suffix}")
    if seg:
        _nii(folder / cid / f"{cid}_seg{suffix}", _label())
    return folder / cid


# ------------------------------------------------------------------------------------------- BraTS


def test_brats_training_and_validation_folders(tmp_path: Path) -> None:
    train, val = tmp_path / "MICCAI_BraTS2020_TrainingData", tmp_path / "MICCAI_BraTS2020_ValidationData"
    _brats_case(train, "BraTS20_Training_001")
    _brats_case(train, "BraTS20_Training_002", suffix=".nii")
    _brats_case(val, "BraTS20_Validation_001", seg=False)
    (train / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\n", encoding="utf-8")

    assert detect_layout(tmp_path) == "brats"
    cases = {c.case_id: c for c in read_dataset(tmp_path, "brats2020")}
    assert set(cases) == {"BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Validation_001"}
    first = cases["BraTS20_Training_001"]
    assert list(first.images) == list(BRATS_MODALITIES)
    assert first.images["t1ce"] == train / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz"
    assert first.label == train / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    assert all(p.name.endswith(".nii") for p in cases["BraTS20_Training_002"].images.values())
    assert cases["BraTS20_Training_002"].label.name == "BraTS20_Training_002_seg.nii"
    assert cases["BraTS20_Validation_001"].label is None
    # the training folder alone reads the same training cases
    assert [c.case_id for c in read_dataset(train, "brats2020")] == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
    ]
    report = check_dataset(list(cases.values()), load_task("brats2020"), progress=False)
    assert report.ok, report.problems


def test_brats_kaggle_label_alias_of_case_355(tmp_path: Path) -> None:
    folder = _brats_case(tmp_path, "BraTS20_Training_355", suffix=".nii", seg=False)
    _nii(folder / "W39_1998.09.19_Segm.nii", _label())
    (case,) = read_dataset(tmp_path, "brats2020")
    assert case.label == folder / "W39_1998.09.19_Segm.nii"
    assert case.extra["label_alias"] == "W39_1998.09.19_Segm.nii"


def test_brats_missing_modality_is_kept_as_expected_path(tmp_path: Path) -> None:
    folder = _brats_case(tmp_path, "BraTS20_Training_001")
    (folder / "BraTS20_Training_001_t2.nii.gz").unlink()
    (case,) = read_dataset(tmp_path, "brats2020")
    assert case.images["t2"] == folder / "BraTS20_Training_001_t2.nii.gz"
    assert not case.images["t2"].exists()


def test_brats_with_a_spec_using_some_modalities_and_aliases(tmp_path: Path) -> None:
    _brats_case(tmp_path, "BraTS20_Training_001")
    spec = {
        "name": "two",
        "modalities": {"FLAIR": "mri", "t1gd": "mri"},
        "regions": {"WT": [1, 2, 4]},
        "decomposition": {"FLAIR": ["WT"], "t1gd": ["WT"]},
        "assembly": [["WT", 1]],
    }
    (case,) = read_dataset(tmp_path, spec)
    assert case.images["FLAIR"].name == "BraTS20_Training_001_flair.nii.gz"
    assert case.images["t1gd"].name == "BraTS20_Training_001_t1ce.nii.gz"
    spec["modalities"] = {"dwi": "mri"}
    spec["decomposition"] = {"dwi": ["WT"]}
    with pytest.raises(DatasetLayoutError, match="modality 'dwi' has no file in the brats layout"):
        read_dataset(tmp_path, spec)


# ----------------------------------------------------------------------------------------- autoPET


def _autopet_study(folder: Path, seg: bool = True) -> Path:
    _nii(folder / "SUV.nii.gz")
    _nii(folder / "CTres.nii.gz")
    if seg:
        _nii(folder / "SEG.nii.gz", _label((0, 1)))
    return folder


def test_autopet_patient_study_folders_group_by_patient(tmp_path: Path) -> None:
    root = tmp_path / "FDG-PET-CT-Lesions"
    _autopet_study(root / "PETCT_0af7ffe12a" / "08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-96698")
    _autopet_study(root / "PETCT_0af7ffe12a" / "10-01-2006-NA-PET-CT Ganzkoerper  primaer mit KM-12345")
    _autopet_study(root / "PETCT_1285b86bea" / "03-05-2004-NA-PET-CT-43210", seg=False)
    (root / "fdg_metadata.csv").write_text("Subject ID\n", encoding="utf-8")

    assert detect_layout(root) == "autopet"
    cases = read_dataset(root, "autopet")
    assert len(cases) == 3
    assert [c.group for c in cases] == ["PETCT_0af7ffe12a", "PETCT_0af7ffe12a", "PETCT_1285b86bea"]
    assert cases[0].case_id.startswith("PETCT_0af7ffe12a_08-12-2005")
    assert cases[0].images["pet"].name == "SUV.nii.gz"
    assert cases[0].images["ct"].name == "CTres.nii.gz"
    assert cases[0].label.name == "SEG.nii.gz"
    assert cases[2].label is None
    assert check_dataset(cases, load_task("autopet"), progress=False).ok


def test_autopet_flat_study_folders(tmp_path: Path) -> None:
    _autopet_study(tmp_path / "study_a")
    _autopet_study(tmp_path / "study_b")
    cases = read_dataset(tmp_path, "autopet", layout="autopet")
    assert [c.case_id for c in cases] == ["study_a", "study_b"]
    assert [c.patient for c in cases] == ["study_a", "study_b"]


# ----------------------------------------------------------------------------------------- HECKTOR


def _hecktor(root: Path, folder: str, cid: str, label: bool) -> None:
    _nii(root / folder / f"{cid}__CT.nii.gz")
    _nii(root / folder / f"{cid}__PT.nii.gz")
    if label:
        _nii(root / folder.replace("images", "labels") / f"{cid}.nii.gz", _label((0, 1, 2)))


def test_hecktor_training_and_test_folders(tmp_path: Path) -> None:
    _hecktor(tmp_path, "imagesTr", "CHUM-001", label=True)
    _hecktor(tmp_path, "imagesTr", "MDA-103", label=True)
    _hecktor(tmp_path, "imagesTs", "CHB-007", label=False)

    assert detect_layout(tmp_path) == "hecktor"
    cases = read_dataset(tmp_path, "hecktor2022")
    assert [c.case_id for c in cases] == ["CHUM-001", "MDA-103"]
    assert cases[0].images == {
        "ct": tmp_path / "imagesTr" / "CHUM-001__CT.nii.gz",
        "pet": tmp_path / "imagesTr" / "CHUM-001__PT.nii.gz",
    }
    assert cases[0].label == tmp_path / "labelsTr" / "CHUM-001.nii.gz"
    (test_case,) = read_dataset(tmp_path / "imagesTs", "hecktor2022")
    assert test_case.case_id == "CHB-007"
    assert test_case.label is None


def test_hecktor_missing_label_in_labels_folder_is_kept_as_expected_path(tmp_path: Path) -> None:
    _hecktor(tmp_path, "imagesTr", "CHUM-001", label=True)
    _hecktor(tmp_path, "imagesTr", "CHUM-002", label=False)
    cases = read_dataset(tmp_path, "hecktor2022")
    assert cases[1].label == tmp_path / "labelsTr" / "CHUM-002.nii.gz"
    assert not cases[1].label.exists()


# ----------------------------------------------------------------------------------------- nnU-Net


def _nnunet(root: Path, channels: dict[str, str], cases: tuple[str, ...], **extra: object) -> None:
    info = {"channel_names": channels, "labels": {"background": 0, "a": 1}, "numTraining": len(cases)}
    info |= {"file_ending": ".nii.gz"} | extra
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    for cid in cases:
        for channel in channels:
            _nii(root / "imagesTr" / f"{cid}_{int(channel):04d}.nii.gz")
        _nii(root / "labelsTr" / f"{cid}.nii.gz", _label((0, 1, 2, 4)))


def test_nnunet_channels_map_by_name_in_any_order(tmp_path: Path) -> None:
    root = tmp_path / "Dataset137_BraTS2021"
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    channels = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    _nnunet(
        root, channels, ("BraTS2021_00000", "BraTS2021_00002"), labels=regions, regions_class_order=[1, 2, 3]
    )

    assert detect_layout(root) == "nnunet"
    cases = read_dataset(root, "brats2020")
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].images["flair"].name == "BraTS2021_00000_0003.nii.gz"
    assert cases[0].images["t1ce"].name == "BraTS2021_00000_0001.nii.gz"
    assert cases[0].label == root / "labelsTr" / "BraTS2021_00000.nii.gz"
    assert cases[0].extra["channels"] == "flair=0003,t1=0000,t1ce=0001,t2=0002"


def test_nnunet_channels_map_by_order_when_names_differ(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _nnunet(tmp_path, {"0": "CT", "1": "CT"}, ("autopet_001",))
    with caplog.at_level(logging.WARNING, logger="ciml.data.layouts"):
        (case,) = read_dataset(tmp_path, "autopet")
    assert case.images["pet"].name == "autopet_001_0000.nii.gz"
    assert case.images["ct"].name == "autopet_001_0001.nii.gz"
    assert "mapping them by order" in caplog.text


def test_nnunet_channel_count_mismatch(tmp_path: Path) -> None:
    _nnunet(tmp_path, {"0": "CT", "1": "PET"}, ("c1",))
    with pytest.raises(
        DatasetLayoutError, match=r"dataset\.json: 'channel_names' lists 2 channels .* 4 modalities"
    ):
        read_dataset(tmp_path, "brats2020")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: _edit_json(root, numTraining=5), "'numTraining' is 5 but .* holds 1 cases"),
        (lambda root: _edit_json(root, file_ending=None), "'file_ending': missing required key"),
        (lambda root: _edit_json(root, channel_names={"0": "CT", "2": "PT"}), "ids must be 0..1"),
        (lambda root: (root / "dataset.json").write_text("{oops", encoding="utf-8"), "not valid JSON"),
        (lambda root: _nii(root / "imagesTr" / "c1.nii.gz"), r"c1\.nii\.gz: not named CASE_XXXX\.nii\.gz"),
        (lambda root: _nii(root / "imagesTr" / "c1_0002.nii.gz"), "channel 0002, but .* lists 2 channels"),
    ],
)
def test_nnunet_malformed_dataset(tmp_path: Path, change, message: str) -> None:
    _nnunet(tmp_path, {"0": "CT", "1": "PT"}, ("c1",))
    change(tmp_path)
    with pytest.raises(DatasetLayoutError, match=message):
        read_dataset(tmp_path, "hecktor2022", layout="nnunet")


def _edit_json(root: Path, **changes: object) -> None:
    info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            info.pop(key)
        else:
            info[key] = value
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")


def test_nnunet_with_itk_file_ending_and_test_folder(tmp_path: Path) -> None:
    """SimpleITK formats (here .mha) are read as well; imagesTs gives unlabelled cases."""
    info = {
        "channel_names": {"0": "CT", "1": "PT"},
        "labels": {"background": 0, "GTVp": 1},
        "file_ending": ".mha",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "imagesTs").mkdir()
    for channel in (0, 1):
        image = sitk.GetImageFromArray(np.random.default_rng(channel).normal(size=SHAPE).astype(np.float32))
        sitk.WriteImage(image, str(tmp_path / "imagesTs" / f"HN_001_{channel:04d}.mha"))
    (case,) = read_dataset(tmp_path / "imagesTs", "hecktor2022")
    assert case.images["ct"].name == "HN_001_0000.mha"
    assert case.label is None
    assert check_dataset([case], load_task("hecktor2022"), progress=False).errors == []


# --------------------------------------------------------------------------------------------- CSV


def test_csv_list_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    flair, t1, t1ce, t2 = (_nii(tmp_path / "scans" / f"{m}.nii.gz") for m in BRATS_MODALITIES)
    seg = _nii(tmp_path / "scans" / "seg.nii.gz", _label())
    listing = tmp_path / "lists" / "cases.csv"
    listing.parent.mkdir()
    listing.write_text(
        "case_id,FLAIR,t1,t1ce,t2,label,group\n"
        f"p1,../scans/flair.nii.gz,../scans/t1.nii.gz,{t1ce},../scans/t2.nii.gz,../scans/seg.nii.gz,patient1\n"
        f"p2,{flair},{t1},{t1ce},{t2},,\n",
        encoding="utf-8",
    )
    assert detect_layout(listing) == "csv"
    first, second = read_dataset(listing, "brats2020")
    assert first.images["flair"].resolve() == flair.resolve()
    assert first.images["t1ce"] == t1ce
    assert first.label.resolve() == seg.resolve()
    assert first.group == "patient1"
    assert second.label is None
    assert second.patient == "p2"
    assert check_dataset([first, second], load_task("brats2020"), progress=False).ok


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case_id,flair,t1,t1ce\nc1,a,b,c\n", r"missing column\(s\) t2"),
        ("case_id,flair,t1,t1ce,t2\n,a,b,c,d\n", "line 2: empty case_id"),
        ("case_id,flair,t1,t1ce,t2\nc1,a,b,c,d\nc1,e,f,g,h\n", "duplicate case id 'c1'"),
    ],
)
def test_csv_list_errors(tmp_path: Path, text: str, message: str) -> None:
    listing = tmp_path / "cases.csv"
    listing.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetLayoutError, match=message) as info:
        read_dataset(listing, "brats2020")
    assert str(listing) in str(info.value)


# ---------------------------------------------------------------------------------- read_dataset


def test_unreadable_folders_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="empty folder"):
        read_dataset(tmp_path / "empty", "brats2020")
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        read_dataset(tmp_path / "absent", "brats2020")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DatasetLayoutError, match=r"odd: unrecognised dataset layout \(holds readme\.txt\)"):
        read_dataset(tmp_path / "odd", "brats2020")
    with pytest.raises(DatasetLayoutError, match="unknown layout 'kaggle'"):
        read_dataset(tmp_path / "odd", "brats2020", layout="kaggle")
    with pytest.raises(DatasetLayoutError, match="no cases found for layout 'autopet'"):
        read_dataset(tmp_path / "odd", "autopet", layout="autopet")


def test_duplicate_case_ids_across_folders_are_refused_unless_asked(tmp_path: Path) -> None:
    _brats_case(tmp_path / "a", "BraTS20_Training_001")
    _brats_case(tmp_path / "b", "BraTS20_Training_001")
    with pytest.raises(DatasetLayoutError, match="duplicate case id 'BraTS20_Training_001'"):
        read_dataset(tmp_path, "brats2020")
    assert len(read_dataset(tmp_path, "brats2020", check_unique=False)) == 2
