"""Dataset readers: each layout, generated on disk in its exact naming, becomes the right list of cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ciml.data.integrity import check_dataset, check_folder
from ciml.data.layouts import (
    ChannelMappingError,
    DatasetLayoutError,
    detect_layout,
    read_dataset,
    resolve_task,
)
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


def test_brats2021_folders(tmp_path: Path) -> None:
    root = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021"
    for cid in ("BraTS2021_00000", "BraTS2021_00002"):
        _brats_case(root, cid)
    assert detect_layout(root) == "brats"
    cases = read_dataset(root, "brats2020")
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].images["t1ce"].name == "BraTS2021_00000_t1ce.nii.gz"
    assert cases[0].label.name == "BraTS2021_00000_seg.nii.gz"
    assert check_dataset(cases, load_task("brats2020"), progress=False).ok


BRATS2023_TOKENS = ("t1c", "t1n", "t2f", "t2w")


def _brats2023_case(folder: Path, cid: str, labels: tuple[int, ...] = (0, 1, 2, 3), seg: bool = True) -> Path:
    """A BraTS 2023+ case as distributed, with the macOS ``._*`` twin of every file that tars carry."""
    for token in BRATS2023_TOKENS:
        _nii(folder / cid / f"{cid}-{token}.nii.gz")
        (folder / cid / f"._{cid}-{token}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    if seg:
        _nii(folder / cid / f"{cid}-seg.nii.gz", _label(labels))
        (folder / cid / f"._{cid}-seg.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (folder / f"._{cid}").write_bytes(b"\x00")
    return folder / cid


def test_brats2023_gli_folders_with_appledouble_files(tmp_path: Path) -> None:
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    _brats2023_case(root, "BraTS-GLI-00000-000")
    _brats2023_case(root, "BraTS-GLI-00002-000")
    _brats2023_case(
        tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData", "BraTS-GLI-00001-000", seg=False
    )
    assert detect_layout(root) == "brats"
    cases = read_dataset(tmp_path, "brats2023")
    assert [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-GLI-00001-000"]
    first = cases[0]
    assert {m: p.name for m, p in first.images.items()} == {
        m: f"BraTS-GLI-00000-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")
    }
    assert first.label.name == "BraTS-GLI-00000-000-seg.nii.gz"
    assert first.extra["challenge"] == "GLI" and first.extra["naming"] == "BraTS 2023+"
    assert cases[2].label is None
    assert check_dataset(cases, load_task("brats2023"), progress=False).ok
    # the 2017-2021 names of a spec find the same files: t2f is FLAIR, t1c is T1CE
    brats2020_case = read_dataset(root, "brats2020")[0]
    assert brats2020_case.images["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert brats2020_case.images["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"


def test_label_3_refused_by_brats2020_accepted_by_brats2023(tmp_path: Path) -> None:
    _brats2023_case(tmp_path, "BraTS-GLI-00000-000", labels=(0, 1, 2, 3))
    assert check_folder(tmp_path, "brats2023", progress=False).ok
    report = check_folder(tmp_path, "brats2020", progress=False)
    assert [p.reason for p in report.errors] == [
        "label: label values 3 are not in task 'brats2020' label values (0, 1, 2, 4)"
    ]


@pytest.mark.parametrize(("preset", "unexpected"), [("brats2020", "3"), ("brats2023", "4")])
def test_brats2024_case_with_a_cavity_is_refused_by_older_presets(
    tmp_path: Path, preset: str, unexpected: str
):
    _brats2023_case(tmp_path, "BraTS-GLI-02073-100", labels=(0, 1, 2, 3, 4))
    report = check_folder(tmp_path, preset, progress=False)
    assert not report.ok
    assert [p.reason for p in report.errors] == [
        f"label: label values {unexpected} are not in task '{preset}' label values "
        f"({', '.join(map(str, load_task(preset).label_values))})"
    ]
    assert check_folder(tmp_path, "brats2024", progress=False).ok


def test_brats2024_cavity_is_its_own_region_never_tumour() -> None:
    spec = load_task("brats2024")
    regions = spec.labels_to_regions(np.array([1, 2, 3, 4]))
    assert dict(zip(spec.region_names, regions.tolist(), strict=True)) == {
        "WT": [True, True, True, False],
        "TC": [True, False, True, False],
        "ET": [False, False, True, False],
        "RC": [False, False, False, True],
    }
    assert spec.owners("RC") == ("t1n", "t2w")
    assert spec.regions_to_labels(regions).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("challenge", ["MEN", "MET", "SSA", "PED"])
def test_other_2023_sub_challenges_are_detected(tmp_path: Path, challenge: str) -> None:
    cid = f"BraTS-{challenge}-00008-000"
    _brats2023_case(tmp_path / f"BraTS2024-{challenge}-Challenge-TrainingData", cid)
    assert detect_layout(tmp_path) == "brats"
    spec = {
        "name": f"my_{challenge.lower()}",
        "modalities": {"t1c": "mri", "t2f": "mri"},
        "regions": {"lesion": [1, 2, 3]},
        "decomposition": {"t1c": ["lesion"], "t2f": ["lesion"]},
        "assembly": [["lesion", 1]],
    }
    (case,) = read_dataset(tmp_path, spec)
    assert case.extra["challenge"] == challenge and case.images["t2f"].name == f"{cid}-t2f.nii.gz"
    if challenge == "PED":  # PED 2024 codes 1 ET, 2 NETC, 3 CC, 4 ED: not the GLI presets' tissues
        with pytest.raises(DatasetLayoutError, match="BraTS-PED labels depend on the release"):
            read_dataset(tmp_path, "brats2024")
    else:
        assert read_dataset(tmp_path, "brats2023")[0].case_id == cid


def test_2017_2021_files_are_refused_by_a_spec_where_4_is_the_cavity(tmp_path: Path) -> None:
    """In BraTS 2020 files 4 is ET; brats2024 would learn every enhancing tumour as resection cavity."""
    _brats_case(tmp_path, "BraTS20_Training_001")
    with pytest.raises(DatasetLayoutError, match="label values mean other things.*conflicting: 4"):
        read_dataset(tmp_path, "brats2024")
    with pytest.raises(DatasetLayoutError, match="conflicting: 1, 2"):
        read_dataset(tmp_path, "msd_braintumour")
    unnamed = load_task("brats2024").to_dict()
    unnamed.pop("labels")
    with pytest.raises(DatasetLayoutError, match="code 1 NCR/NET, 2 ED, 4 ET and never use label 3"):
        read_dataset(tmp_path, unnamed)


# --------------------------------------------------------------------------------------------- MSD

MSD_JSON = {
    "name": "BRATS",
    "description": "Gliomas segmentation tumour and oedema in on brain images",
    "tensorImageSize": "4D",
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    "numTraining": 2,
    "numTest": 1,
    "training": [
        {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"},
        {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"},
    ],
    "test": ["./imagesTs/BRATS_485.nii.gz"],
}


def write_msd(root: Path) -> Path:
    """Task01_BrainTumour as the MSD tar unpacks: 4D images whose volume k has the value 100 * (k + 1)."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(MSD_JSON, indent=4), encoding="utf-8")
    (root / "._dataset.json").write_bytes(b"\x00\x05\x16\x07")
    noise = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    volumes = np.stack([noise + 100 * (k + 1) for k in range(4)], axis=-1)
    for folder, cid in (("imagesTr", "BRATS_001"), ("imagesTr", "BRATS_002"), ("imagesTs", "BRATS_485")):
        _nii(root / folder / f"{cid}.nii.gz", volumes)
        (root / folder / f"._{cid}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
        if folder == "imagesTr":
            _nii(root / "labelsTr" / f"{cid}.nii.gz", _label((0, 1, 2, 3)))
            (root / "labelsTr" / f"._{cid}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    return root


def test_msd_brain_tumour_read_as_distributed(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task01_BrainTumour")
    assert detect_layout(root) == "msd"
    cases = read_dataset(root, "msd_braintumour")
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    first = cases[0]
    assert set(first.images.values()) == {root / "imagesTr" / "BRATS_001.nii.gz"}
    assert first.volumes == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}  # t1gd is T1CE
    assert first.label == root / "labelsTr" / "BRATS_001.nii.gz"
    report = check_dataset(cases, load_task("msd_braintumour"), progress=False)
    assert report.ok and report.n_files == 4, report.problems  # one 4D image and one label per case
    from ciml.data.preprocessing import load_volume

    assert float(load_volume(first.images["t1ce"], first.volumes["t1ce"]).mean()) == pytest.approx(300, abs=1)
    (test_case,) = read_dataset(root / "imagesTs", "msd_braintumour")
    assert test_case.case_id == "BRATS_485" and test_case.label is None


def test_msd_labels_are_not_brats_labels(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task01_BrainTumour")
    with pytest.raises(DatasetLayoutError, match=r"conflicting: 1, 2\); choose the task"):
        read_dataset(root, "brats2023")  # 1 edema here, necrosis there
    unnamed = load_task("msd_braintumour").to_dict()
    unnamed.pop("labels")
    with pytest.raises(DatasetLayoutError, match="does not say what its label values mean"):
        read_dataset(root, unnamed)
    info = dict(MSD_JSON, modality={"0": "FLAIR", "1": "T1w", "2": "T1w", "3": "T2w"})
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(ChannelMappingError, match="0 FLAIR, 1 T1w, 2 T1w, 3 T2w"):
        read_dataset(root, "msd_braintumour")
    (case, _) = read_dataset(root, "msd_braintumour", channels={"flair": 0, "t1": 1, "t1ce": 2, "t2": 3})
    assert case.volumes["t1ce"] == 2


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
    """nnU-Net's Dataset137 (BraTS 2021): T1, T1ce, T2, FLAIR; labels remapped to 1 ED, 2 NCR, 3 ET."""
    root = tmp_path / "Dataset137_BraTS2021"
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    channels = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    _nnunet(
        root, channels, ("BraTS2021_00000", "BraTS2021_00002"), labels=regions, regions_class_order=[1, 2, 3]
    )
    spec = {
        "name": "brats_2017_names",
        "modalities": {"flair": "mri", "t1": "mri", "t1gd": "mri", "t2": "mri"},
        "regions": {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]},
        "decomposition": {"flair": ["WT"], "t1": ["TC"], "t2": ["WT", "TC"], "t1gd": ["TC", "ET"]},
        "assembly": [["WT", 1], ["TC", 2], ["ET", 3]],
    }
    assert detect_layout(root) == "nnunet"
    cases = read_dataset(root, spec)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].images["flair"].name == "BraTS2021_00000_0003.nii.gz"
    assert cases[0].images["t1gd"].name == "BraTS2021_00000_0001.nii.gz"  # T1ce and t1gd: the same contrast
    assert cases[0].label == root / "labelsTr" / "BraTS2021_00000.nii.gz"
    assert cases[0].extra["channels"] == "flair=0003,t1=0000,t1gd=0001,t2=0002"


def test_nnunet_regions_of_another_coding_are_refused(tmp_path: Path) -> None:
    """brats2020's TC is {1, 4}; in Dataset137 1 is edema: training on it would learn edema as core."""
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    _nnunet(tmp_path, {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, ("c1",), labels=regions,
            regions_class_order=[1, 2, 3])  # fmt: skip
    with pytest.raises(DatasetLayoutError, match=r"regions WT \[1, 2, 4\].* not regions of this dataset"):
        read_dataset(tmp_path, "brats2020")


def test_nnunet_spec_from_dataset_json_with_regions(tmp_path: Path) -> None:
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    _nnunet(tmp_path, {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, ("c1",), labels=regions,
            regions_class_order=[1, 2, 3], name="Dataset137_BraTS2021")  # fmt: skip
    spec = resolve_task(None, tmp_path)
    assert spec.name == "Dataset137_BraTS2021"
    assert spec.modalities == {"t1": "mri", "t1ce": "mri", "t2": "mri", "flair": "mri"}
    assert spec.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
    assert [(s.regions, s.label) for s in spec.assembly] == [
        (("whole tumor",), 1), (("tumor core",), 2), (("enhancing tumor",), 3)
    ]  # fmt: skip
    assert all(spec.owners(r) == spec.modality_names for r in spec.regions)
    assert spec.regions_to_labels(spec.labels_to_regions(np.array([0, 1, 2, 3]))).tolist() == [0, 1, 2, 3]
    assert resolve_task("dataset.json", tmp_path) == spec
    assert resolve_task(tmp_path / "dataset.json", tmp_path / "elsewhere") == spec
    (case,) = read_dataset(tmp_path, spec)
    assert case.images["flair"].name == "c1_0003.nii.gz"
    _edit_json(tmp_path, regions_class_order=None)
    with pytest.raises(DatasetLayoutError, match="'regions_class_order' is missing"):
        resolve_task(None, tmp_path)


def test_task_is_needed_outside_nnunet(tmp_path: Path) -> None:
    _brats_case(tmp_path, "BraTS20_Training_001")
    with pytest.raises(DatasetLayoutError, match="no task spec given.*brats dataset: name a preset"):
        resolve_task(None, tmp_path)


AUTOPET_CASE = "PETCT_0af7ffe12a_08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-96698"


def _autopet_nnunet(root: Path, channel_names: dict[str, str]) -> None:
    """nnU-Net's Dataset221 conversion: _0000 is CTres (values around -1000..1000), _0001 is SUV (0..20)."""
    info = {"channel_names": channel_names, "labels": {"background": 0, "tumor": 1}, "numTraining": 1}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(info | {"file_ending": ".nii.gz"}), encoding="utf-8")
    noise = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    _nii(root / "imagesTr" / f"{AUTOPET_CASE}_0000.nii.gz", noise * 100 - 1000)
    _nii(root / "imagesTr" / f"{AUTOPET_CASE}_0001.nii.gz", np.abs(noise))
    _nii(root / "labelsTr" / f"{AUTOPET_CASE}.nii.gz", _label((0, 1)))


def test_nnunet_autopet_channels_by_name_never_by_position(tmp_path: Path) -> None:
    """The autopet preset lists pet first; nnU-Net's files put CT first. Names decide, not positions."""
    _autopet_nnunet(tmp_path / "named", {"0": "CT", "1": "PET"})
    (case,) = read_dataset(tmp_path / "named", "autopet")
    assert case.images["pet"].name.endswith("_0001.nii.gz")
    assert case.images["ct"].name.endswith("_0000.nii.gz")
    assert case.case_id == AUTOPET_CASE


def test_nnunet_autopet_both_named_ct_is_refused_then_mapped_explicitly(tmp_path: Path) -> None:
    root = tmp_path / "Dataset221_AutoPETII_2023"
    _autopet_nnunet(root, {"0": "CT", "1": "CT"})
    with pytest.raises(ChannelMappingError) as info:
        read_dataset(root, "autopet")
    message = str(info.value)
    assert "0 CT, 1 CT" in message and "pet, ct" in message and "channels={'pet': ID, 'ct': ID}" in message
    report = check_folder(root, "autopet", progress=False, channels={"pet": 1, "ct": 0})
    assert report.ok, report.problems
    (case,) = read_dataset(root, "autopet", channels={"pet": 1, "ct": 0})
    assert case.images["pet"].name.endswith("_0001.nii.gz")
    with pytest.raises(DatasetLayoutError, match="channels: no channel for ct; no channel 5"):
        read_dataset(root, "autopet", channels={"pet": 5})
    with pytest.raises(DatasetLayoutError, match="given to two modalities"):
        read_dataset(root, "autopet", channels={"pet": 0, "ct": 0})
    with pytest.raises(DatasetLayoutError, match="share the name 'CT'"):
        resolve_task(None, root)


def test_nnunet_dataset_key_lists_files_as_the_brats2024_conversion_does(tmp_path: Path) -> None:
    """nnU-Net's Dataset226 links the BraTS 2024 files from dataset.json's `dataset` instead of copying."""
    source = tmp_path / "training_data1"
    cid = "BraTS-GLI-02073-100"
    for token in ("t1n", "t1c", "t2w", "t2f"):
        _nii(source / cid / f"{cid}-{token}.nii.gz")
    _nii(source / cid / f"{cid}-seg.nii.gz", _label((0, 1, 2, 3, 4)))
    root = tmp_path / "Dataset226_BraTS2024-BraTS-GLI"
    root.mkdir()
    files = [str(source / cid / f"{cid}-{t}.nii.gz") for t in ("t1n", "t1c", "t2w", "t2f")]
    info = {
        "channel_names": {"0": "T1", "1": "T1C", "2": "T2W", "3": "T2F"},
        "labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "dataset": {cid: {"label": str(source / cid / f"{cid}-seg.nii.gz"), "images": files}},
    }
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    (case,) = read_dataset(root, "brats2024")
    assert case.images["t2f"].name == f"{cid}-t2f.nii.gz" and case.images["t1n"].name == f"{cid}-t1n.nii.gz"
    assert check_dataset([case], load_task("brats2024"), progress=False).ok
    with pytest.raises(DatasetLayoutError, match="label values mean other things.*conflicting: 1, 2"):
        read_dataset(root, "msd_braintumour")  # MSD's 1 edema / 2 non-enhancing are not 2024's


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
