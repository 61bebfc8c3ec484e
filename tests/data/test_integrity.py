"""Integrity check: every kind of broken file gives its own message naming the file; CLI exit codes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ciml.data.integrity as integrity
from ciml.cli import main
from ciml.data.cases import Case
from ciml.data.integrity import (
    ERROR,
    NOTE,
    WARNING,
    DatasetIntegrityError,
    IntegrityReport,
    Problem,
    check_dataset,
    check_folder,
    ensure_dataset_ok,
)
from ciml.data.layouts import read_dataset
from ciml.tasks import load_task

SHAPE = (10, 9, 8)
MODALITIES = ("flair", "t1", "t1ce", "t2")
SPEC = load_task("brats2020")


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine), path)
    return path


def _image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


def _label(values: tuple[int, ...] = (0, 1, 2, 4), dtype: type = np.uint8) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=dtype)
    for i, value in enumerate(values):
        label[i, 2:5, 2:5] = value
    return label


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A clean BraTS-layout dataset with two cases of 10x9x8 voxels."""
    root = tmp_path / "brats"
    for n in (1, 2):
        cid = f"BraTS20_Training_00{n}"
        (root / cid).mkdir(parents=True)
        for i, modality in enumerate(MODALITIES):
            _save(root / cid / f"{cid}_{modality}.nii.gz", _image(10 * n + i))
        _save(root / cid / f"{cid}_seg.nii.gz", _label())
    return root


def _file(root: Path, modality: str, n: int = 1) -> Path:
    return root / f"BraTS20_Training_00{n}" / f"BraTS20_Training_00{n}_{modality}.nii.gz"


def _check(root: Path, **kwargs: object) -> IntegrityReport:
    return check_dataset(
        read_dataset(root, SPEC, check_unique=False), SPEC, source=root, progress=False, **kwargs
    )


def _only_problem(report: IntegrityReport, severity: str = ERROR) -> Problem:
    assert len(report.problems) == 1, report.problems
    (problem,) = report.problems
    assert problem.severity == severity
    return problem


def test_clean_dataset_has_no_problems(dataset: Path) -> None:
    report = _check(dataset)
    assert report.problems == []
    assert report.ok
    assert (report.n_cases, report.n_files) == (2, 10)
    assert "checked 2 cases (10 files): 0 errors, 0 warnings, 0 notes; OK" in report.summary()


def test_each_file_is_read_exactly_once(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[Path] = Counter()
    real = integrity.load_image

    def counting(path: Path):
        calls[Path(path)] += 1
        return real(path)

    monkeypatch.setattr(integrity, "load_image", counting)
    _check(dataset)
    assert len(calls) == 10
    assert set(calls.values()) == {1}


def test_missing_file(dataset: Path) -> None:
    _file(dataset, "t2").unlink()
    problem = _only_problem(_check(dataset))
    assert problem.file == str(_file(dataset, "t2"))
    assert problem.reason == "t2: file not found"


def test_truncated_gzip_with_intact_header(dataset: Path) -> None:
    path = _file(dataset, "flair")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    nib.load(path)  # the header alone still reads: only decompressing the data finds the damage
    problem = _only_problem(_check(dataset))
    assert problem.file == str(path)
    assert problem.reason.startswith("flair: truncated or corrupt compressed data")


def test_zero_length_and_non_image_files(dataset: Path) -> None:
    _file(dataset, "t1").write_bytes(b"")
    _file(dataset, "t1", 2).write_bytes(b"<html>not an image</html>" * 20)
    report = _check(dataset)
    reasons = {Path(p.file).name: p.reason for p in report.errors}
    assert reasons == {
        "BraTS20_Training_001_t1.nii.gz": "t1: empty file (0 bytes)",
        "BraTS20_Training_002_t1.nii.gz": reasons["BraTS20_Training_002_t1.nii.gz"],
    }
    assert "not gzip-compressed" in reasons["BraTS20_Training_002_t1.nii.gz"]


def test_shape_mismatch_between_modalities(dataset: Path) -> None:
    _save(_file(dataset, "t1ce"), _image(0, shape=(10, 9, 9)))
    problem = _only_problem(_check(dataset))
    assert problem.file == str(_file(dataset, "t1ce"))
    assert "t1ce: grid differs from flair (BraTS20_Training_001_flair.nii.gz)" in problem.reason
    assert "shape (10, 9, 9) vs (10, 9, 8)" in problem.reason


def test_label_on_another_grid(dataset: Path) -> None:
    seg = dataset / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    _save(seg, _label(), affine=np.diag([1.0, 1.0, 1.2, 1.0]))
    problem = _only_problem(_check(dataset))
    assert problem.file == str(seg)
    assert "label: grid differs from flair" in problem.reason
    assert "spacing (1, 1, 1.2) mm vs (1, 1, 1) mm" in problem.reason


def test_origin_shift_is_an_affine_mismatch(dataset: Path) -> None:
    shifted = np.eye(4)
    shifted[:3, 3] = (0.0, 2.0, 0.0)
    _save(_file(dataset, "t2"), _image(3), affine=shifted)
    problem = _only_problem(_check(dataset))
    assert problem.file == str(_file(dataset, "t2"))
    assert "affine origin 2 mm apart" in problem.reason


def test_orientation_mismatch(dataset: Path) -> None:
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 9.0  # same voxels in space, stored left-right flipped
    _save(_file(dataset, "t1"), _image(1), affine=flipped)
    problem = _only_problem(_check(dataset))
    assert "orientation LAS vs RAS" in problem.reason


def test_float_noise_in_the_header_is_tolerated(dataset: Path) -> None:
    noisy = np.eye(4)
    noisy[:3, :3] *= 1 + 1e-6
    noisy[:3, 3] = (1e-4, -1e-4, 2e-4)
    _save(_file(dataset, "t1"), _image(1), affine=noisy)
    assert _check(dataset).problems == []


def test_nan_and_inf_voxels(dataset: Path) -> None:
    data = _image(2)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    _save(_file(dataset, "t1ce", 2), data)
    problem = _only_problem(_check(dataset))
    assert problem.file == str(_file(dataset, "t1ce", 2))
    assert problem.reason == f"t1ce: 3 NaN and 1 inf voxels (of {data.size})"


def test_constant_modality(dataset: Path) -> None:
    _save(_file(dataset, "flair"), np.zeros(SHAPE, dtype=np.int16))
    problem = _only_problem(_check(dataset))
    assert problem.file == str(_file(dataset, "flair"))
    assert problem.reason == "flair: constant image: every voxel is 0 (zero variance)"


def test_label_value_not_in_the_task(dataset: Path) -> None:
    seg = dataset / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    _save(seg, _label((0, 1, 2, 3)))
    problem = _only_problem(_check(dataset))
    assert problem.file == str(seg)
    assert problem.reason == "label: label values 3 are not in task 'brats2020' label values (0, 1, 2, 4)"


def test_non_integer_label_values(dataset: Path) -> None:
    seg = dataset / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    label = _label(dtype=np.float32)
    label[9, 0, 0] = 0.5
    _save(seg, label)
    problem = _only_problem(_check(dataset))
    assert problem.reason == "label: non-integer label values (0.5)"


def test_float_label_with_integer_values_is_fine(dataset: Path) -> None:
    _save(dataset / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz", _label(dtype=np.float32))
    assert _check(dataset).problems == []


def test_background_only_label_is_a_warning(dataset: Path) -> None:
    seg = dataset / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    _save(seg, _label((0,)))
    report = _check(dataset)
    problem = _only_problem(report, WARNING)
    assert problem.file == str(seg)
    assert "only background" in problem.reason
    assert report.ok


def test_case_without_label(dataset: Path) -> None:
    (dataset / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").unlink()
    problem = _only_problem(_check(dataset), WARNING)
    assert problem.reason == "case 'BraTS20_Training_002' has no label file"
    assert _check(dataset, require_labels=False).problems == []
    (dataset / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz").unlink()
    assert _only_problem(_check(dataset), NOTE).reason.endswith("usable for inference only")
    assert "training needs labels" in _only_problem(_check(dataset, require_labels=True)).reason


def test_duplicate_case_ids(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "more" / "BraTS20_Training_001"
    copy.parent.mkdir()
    (dataset / "BraTS20_Training_001").rename(copy)
    (dataset / "BraTS20_Training_002").rename(dataset / "BraTS20_Training_001")
    for path in (dataset / "BraTS20_Training_001").iterdir():
        path.rename(path.with_name(path.name.replace("_002_", "_001_")))
    cases = read_dataset(dataset, SPEC, check_unique=False) + read_dataset(tmp_path / "more", SPEC)
    problem = _only_problem(check_dataset(cases, SPEC, progress=False))
    assert (
        problem.reason == f"duplicate case id 'BraTS20_Training_001' (also used by {_file(dataset, 'flair')})"
    )
    assert problem.file == str(copy / "BraTS20_Training_001_flair.nii.gz")


def test_empty_dataset_and_empty_folder(tmp_path: Path) -> None:
    report = check_dataset([], SPEC, source=tmp_path, progress=False)
    assert _only_problem(report).reason == "no cases found (empty dataset)"
    report = check_folder(tmp_path, SPEC, progress=False)
    problem = _only_problem(report)
    assert (problem.file, problem.reason) == (str(tmp_path), "empty folder, no cases to read")


def test_case_lacking_a_modality(dataset: Path) -> None:
    case = read_dataset(dataset, SPEC)[0]
    partial = Case(case.case_id, {m: p for m, p in case.images.items() if m != "t2"}, case.label)
    problem = _only_problem(check_dataset([partial], SPEC, progress=False))
    assert problem.reason == "case 'BraTS20_Training_001' has no file for modality 't2'"


def test_problems_are_all_collected(dataset: Path) -> None:
    _file(dataset, "t2").unlink()
    _save(_file(dataset, "flair", 2), np.ones(SHAPE, dtype=np.float32))
    report = _check(dataset)
    assert {Path(p.file).name for p in report.errors} == {
        "BraTS20_Training_001_t2.nii.gz",
        "BraTS20_Training_002_flair.nii.gz",
    }
    assert "2 errors" in report.summary()


# ------------------------------------------------------------------------------ HECKTOR (two grids)


def _hecktor_case(root: Path, pet_affine: np.ndarray, label_affine: np.ndarray | None = None) -> None:
    """CT at 1 mm (16^3) and PET at 2 mm (8^3) over the same field of view, label on the CT grid."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _save(root / "imagesTr" / "CHUM-001__CT.nii.gz", _image(0, (16, 16, 16)))
    _save(root / "imagesTr" / "CHUM-001__PT.nii.gz", _image(1, (8, 8, 8)), affine=pet_affine)
    label = np.zeros((16, 16, 16), dtype=np.uint8)
    label[4:8, 4:8, 4:8], label[10:12, 10:12, 10:12] = 1, 2
    _save(root / "labelsTr" / "CHUM-001.nii.gz", label, affine=label_affine)


def test_hecktor_pet_on_coarser_overlapping_grid_is_only_a_note(tmp_path: Path) -> None:
    pet = np.diag([2.0, 2.0, 2.0, 1.0])
    pet[:3, 3] = 0.5
    _hecktor_case(tmp_path, pet)
    report = check_folder(tmp_path, "hecktor2022", progress=False)
    problem = _only_problem(report, NOTE)
    assert problem.file == str(tmp_path / "imagesTr" / "CHUM-001__PT.nii.gz")
    assert "pet: on a different grid than ct" in problem.reason
    assert "overlap (100% of the smaller one)" in problem.reason
    assert report.ok


def test_cli_lists_notes_only_when_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _hecktor_case(tmp_path, np.diag([2.0, 2.0, 2.0, 1.0]))
    args = ["check-data", "--task", "hecktor2022", "--data", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1 note(s) not listed (pass --verbose), e.g. note: ")
    assert main([*args, "--verbose"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        f"note: {tmp_path / 'imagesTr' / 'CHUM-001__PT.nii.gz'}: pet: on a different grid"
    )
    assert out[1].endswith("0 errors, 0 warnings, 1 note; OK")


def test_hecktor_pet_outside_the_ct_is_an_error(tmp_path: Path) -> None:
    pet = np.diag([2.0, 2.0, 2.0, 1.0])
    pet[:3, 3] = 500.0
    _hecktor_case(tmp_path, pet)
    problem = _only_problem(check_folder(tmp_path, "hecktor2022", progress=False))
    assert "does not overlap ct" in problem.reason


def test_hecktor_label_must_match_a_modality_grid(tmp_path: Path) -> None:
    _hecktor_case(tmp_path, np.diag([2.0, 2.0, 2.0, 1.0]), label_affine=np.diag([1.0, 1.0, 1.5, 1.0]))
    report = check_folder(tmp_path, "hecktor2022", progress=False)
    assert [p.file for p in report.errors] == [str(tmp_path / "labelsTr" / "CHUM-001.nii.gz")]
    assert "label: grid differs from ct" in report.errors[0].reason


def test_two_grids_are_an_error_outside_hecktor(dataset: Path) -> None:
    _save(_file(dataset, "t1"), _image(1, (5, 5, 4)), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    assert _only_problem(_check(dataset)).severity == ERROR


# ----------------------------------------------------------------------------- ensure_dataset_ok


def test_ensure_dataset_ok_refuses_bad_data_and_names_the_file(dataset: Path) -> None:
    cases = read_dataset(dataset, SPEC)
    assert ensure_dataset_ok(cases, SPEC, progress=False).ok
    _save(_file(dataset, "t2", 2), np.full(SHAPE, np.nan, dtype=np.float32))
    with pytest.raises(
        DatasetIntegrityError, match=r"1 error.*BraTS20_Training_002_t2\.nii\.gz: t2: \d+ NaN"
    ):
        ensure_dataset_ok(cases, SPEC, source=dataset, progress=False)


def test_parallel_workers_find_the_same_problems(dataset: Path) -> None:
    _file(dataset, "t2").unlink()
    _save(_file(dataset, "flair", 2), np.ones(SHAPE, dtype=np.float32))
    cases = read_dataset(dataset, SPEC)
    serial = check_dataset(cases, SPEC, progress=False)
    parallel = check_dataset(cases, SPEC, progress=False, workers=2)
    assert parallel.problems == serial.problems
    assert len(serial.errors) == 2
    assert parallel.n_files == serial.n_files == 10


def test_progress_bar_over_cases(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_dataset(read_dataset(dataset, SPEC), SPEC, progress=True)
    assert "checking cases" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- CLI


def _listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_cli_exit_codes_and_writes_nothing(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    assert main(["check-data", "--task", "brats2020", "--data", str(dataset), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "checked 2 cases (10 files): 0 errors" in out

    _file(dataset, "t1", 2).write_bytes(b"")
    before = _listing(tmp_path)
    assert (
        main(["check-data", "--task", "brats2020", "--data", str(dataset), "--layout", "brats", "--quiet"])
        == 1
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"error: {_file(dataset, 't1', 2)}: t1: empty file (0 bytes)"
    assert lines[-1].endswith("1 error, 0 warnings, 0 notes; NOT usable until the errors are fixed")
    assert _listing(tmp_path) == before


def test_cli_json_report_is_written_atomically_and_not_overwritten(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    _file(dataset, "t1").unlink()
    args = ["check-data", "--task", "brats2020", "--data", str(dataset), "--json", str(out), "--quiet"]
    assert main(args) == 1
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["task"] == "brats2020"
    assert report["ok"] is False
    assert report["counts"] == {"error": 1, "warning": 0, "note": 0}
    assert report["problems"][0]["file"] == str(_file(dataset, "t1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats", "report.json"]  # no temporary left

    out.write_text("keep", encoding="utf-8")
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "keep"
    assert main([*args, "--overwrite"]) == 1
    assert json.loads(out.read_text(encoding="utf-8"))["n_cases"] == 2


def test_cli_require_labels_fails_a_set_without_labels(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seg in dataset.glob("*/*_seg.nii.gz"):
        seg.unlink()
    args = ["check-data", "--task", "brats2020", "--data", str(dataset), "--quiet"]
    assert main(args) == 0
    assert main([*args, "--require-labels"]) == 1
    assert "no case has a label file; training needs labels" in capsys.readouterr().out


def test_cli_bad_folder_and_bad_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["check-data", "--task", "brats2020", "--data", str(tmp_path / "empty"), "--quiet"]) == 1
    assert f"error: {tmp_path / 'empty'}: empty folder" in capsys.readouterr().out
    assert main(["check-data", "--task", "nosuchtask", "--data", str(tmp_path), "--quiet"]) == 1
    assert "nosuchtask" in capsys.readouterr().err


def test_negative_autopet_studies_are_summarised_in_one_line(tmp_path: Path) -> None:
    """autoPET has hundreds of negative controls (empty SEG): one line names them, not one warning each."""
    root = tmp_path / "FDG-PET-CT-Lesions"
    for i in range(7):
        study = root / f"PETCT_{i:010x}" / "08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-96698"
        study.mkdir(parents=True)
        _save(study / "SUV.nii.gz", np.abs(_image(i)))
        _save(study / "CTres.nii.gz", _image(i + 10))
        _save(study / "SEG.nii.gz", _label((0, 1)) if i == 0 else np.zeros(SHAPE, np.uint8))
    report = check_folder(root, "autopet", progress=False)
    assert report.ok
    (problem,) = report.problems
    assert problem.severity == WARNING and problem.file == str(root)
    assert problem.reason.startswith("6 cases have a label with only background (0), e.g. negative studies: ")
    assert "PETCT_0000000001_08-12-2005" in problem.reason and "(1 more)" in problem.reason
