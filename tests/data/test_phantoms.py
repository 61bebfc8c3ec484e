"""Phantoms: exact layouts, label sets, intensities per tissue, determinism, safe writing, CLI."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ciml.cli import main
from ciml.data.phantoms import (
    brats_affine,
    brats_phantom_case,
    make_autopet_phantom,
    make_brats_phantom,
    make_hecktor_phantom,
    write_nifti,
)
from ciml.data.phantoms.petct import autopet_phantom_case, hecktor_phantom_case
from ciml.errors import CimlError

BRATS_FILES = ("flair", "t1", "t1ce", "t2", "seg")
SMALL_PET = {"shape": (64, 64, 48), "spacing": (8.0, 8.0, 10.0)}
SMALL_HECKTOR = {"ct_shape": (64, 64, 48), "ct_spacing": (4.0, 4.0, 6.0), "pet_spacing": (8.0, 8.0, 8.0)}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image.affine


def _world_box(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """World box spanned by a grid's outer voxel edges."""
    corners = np.array(
        [
            [i, j, k]
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _to_grid(mask: np.ndarray, mask_affine, shape, affine) -> np.ndarray:
    """Nearest-neighbour resampling of ``mask`` onto another grid (what a reader does for HECKTOR)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    source = world @ np.linalg.inv(mask_affine)[:3, :3].T + np.linalg.inv(mask_affine)[:3, 3]
    values = ndimage.map_coordinates(mask.astype(np.uint8), source.T, order=0, mode="constant")
    return values.reshape(shape).astype(bool)


# --------------------------------------------------------------------------------------------------
# BraTS
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats_case():
    return brats_phantom_case(seed=0, index=1, spacing_mm=2.0)


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("brats")
    cases = make_brats_phantom(out, n_cases=1, seed=0, spacing_mm=2.0)
    return out, cases


def test_brats_affine_matches_brats_files():
    affine, shape = brats_affine(1.0)
    assert shape == (240, 240, 155)
    np.testing.assert_allclose(affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    affine2, shape2 = brats_affine(2.0)
    assert shape2 == (120, 120, 78)
    # The 2 mm grid covers the same physical box as BraTS's (up to the half slice 155 -> 156 mm).
    lo1, hi1 = _world_box(shape, affine)
    lo2, hi2 = _world_box(shape2, affine2)
    np.testing.assert_allclose(lo2[:2], lo1[:2])
    np.testing.assert_allclose(hi2[:2], hi1[:2])
    assert lo2[2] == lo1[2]
    affine3, shape3 = brats_affine(3.0)
    assert shape3 == (80, 80, 52)
    lo3, hi3 = _world_box(shape3, affine3)
    np.testing.assert_allclose(lo3[:2], lo1[:2])
    np.testing.assert_allclose(hi3[:2], hi1[:2])


def test_brats_3mm_case_keeps_every_label_and_the_brain_volume_of_2mm():
    """At 3 mm the tumour is drawn on the coarse grid itself (no resampled labels): every label is present,
    and the brain has the volume it has at 2 mm."""
    fine = brats_phantom_case(seed=0, index=1, spacing_mm=2.0)
    coarse = brats_phantom_case(seed=0, index=1, spacing_mm=3.0)
    assert coarse.label.shape == (80, 80, 52)
    assert set(np.unique(coarse.label)) == {0, 1, 2, 4}
    np.testing.assert_allclose(np.abs(np.diag(coarse.affines["label"])[:3]), 3.0)
    brain_fine = 8.0 * float(np.sum(sum(fine.tissue.values())))
    brain_coarse = 27.0 * float(np.sum(sum(coarse.tissue.values())))
    assert 0.8 < brain_coarse / brain_fine < 1.25  # the same anatomy, in mm^3, up to pose and scale


def test_brats_layout_and_files(brats_dir, brats_case):
    out, cases = brats_dir
    assert [p.name for p in out.iterdir()] == ["BraTS20_Training_001"]
    folder = out / "BraTS20_Training_001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"BraTS20_Training_001_{k}.nii.gz" for k in BRATS_FILES
    )
    (case,) = cases
    assert case.case_id == "BraTS20_Training_001"
    assert set(case.images) == {"flair", "t1", "t1ce", "t2"}
    assert case.label == folder / "BraTS20_Training_001_seg.nii.gz"
    affine, shape = brats_affine(2.0)
    for name in BRATS_FILES:
        data, file_affine = _load(folder / f"BraTS20_Training_001_{name}.nii.gz")
        assert data.shape == shape
        np.testing.assert_allclose(file_affine, affine)
        expected = brats_case.label if name == "seg" else brats_case.images[name]
        assert data.dtype == expected.dtype
        # Written by a separate call with the same seed: identical arrays (determinism).
        np.testing.assert_array_equal(data, expected)


def test_brats_labels_exact_and_inside_brain(brats_case):
    label = brats_case.label
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}
    for value in (1, 2, 4):
        assert np.count_nonzero(label == value) > 20, value
    brain = brats_case.images["t1"] > 0
    assert np.all(brain[label > 0])
    # Skull-stripped like BraTS: every contrast is exactly 0 outside the brain, positive in it.
    for image in brats_case.images.values():
        assert image.min() >= 0
        assert np.count_nonzero(image) > 0.05 * image.size


def test_brats_contrasts_follow_the_decomposition(brats_case):
    label, tissue = brats_case.label, brats_case.tissue
    normal = label == 0
    regions = {
        "wm": normal & (tissue["wm"] > 0.9),
        "gm": normal & (tissue["gm"] > 0.8),
        "csf": normal & (tissue["csf"] > 0.8),
        "edema": label == 2,
        "necrosis": label == 1,
        "enhancing": label == 4,
    }
    assert all(np.count_nonzero(m) > 10 for m in regions.values())
    mean = {
        m: {r: float(image[mask].mean()) for r, mask in regions.items()}
        for m, image in brats_case.images.items()
    }
    flair, t1, t1ce, t2 = mean["flair"], mean["t1"], mean["t1ce"], mean["t2"]
    assert flair["edema"] > 1.5 * flair["wm"]  # FLAIR: edema bright
    assert t2["edema"] > 1.5 * t2["wm"]  # T2: edema bright
    assert flair["csf"] < flair["wm"]  # CSF dark in FLAIR ...
    assert t2["csf"] > t2["gm"] > t2["wm"]  # ... and the brightest in T2
    assert t1["wm"] > t1["gm"] > t1["csf"]  # WM brightest normal tissue in T1
    assert t1["necrosis"] < t1["wm"]
    assert t1ce["necrosis"] < t1ce["wm"]
    # Enhancement: relative to white matter, the rim is brighter in T1CE than in T1.
    assert t1ce["enhancing"] / t1ce["wm"] > 1.3 * t1["enhancing"] / t1["wm"]
    assert t1ce["enhancing"] > t1ce["wm"]


def test_brats_seed_changes_case(brats_case):
    other = brats_phantom_case(seed=1, index=1, spacing_mm=2.0)
    assert not np.array_equal(other.label, brats_case.label)
    assert not np.array_equal(other.images["flair"], brats_case.images["flair"])


def test_brats_refuses_non_empty_case_folder(tmp_path):
    folder = tmp_path / "BraTS20_Training_002"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(CimlError, match="BraTS20_Training_002.*not empty.*overwrite"):
        make_brats_phantom(tmp_path, n_cases=2, seed=0, spacing_mm=2.0)
    # Refused before anything was generated: case 001 was not written either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BraTS20_Training_002"]
    assert (folder / "mine.txt").read_text(encoding="utf-8") == "keep me"


def test_brats_rejects_bad_arguments(tmp_path):
    with pytest.raises(CimlError, match="spacing_mm"):
        brats_phantom_case(seed=0, spacing_mm=1.5)
    with pytest.raises(CimlError, match="n_cases"):
        make_brats_phantom(tmp_path, n_cases=0)
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(CimlError, match="not a folder"):
        make_brats_phantom(tmp_path / "file", n_cases=1)


# --------------------------------------------------------------------------------------------------
# Safe writing
# --------------------------------------------------------------------------------------------------


def test_write_nifti_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.nii.gz"
    write_nifti(np.ones((4, 4, 4), np.int16), np.eye(4), target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]

    def crash(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(np.zeros((4, 4, 4), np.int16), np.eye(4), target)
    # The old file is intact and no temporary file is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
    assert np.all(np.asanyarray(nib.load(str(target)).dataobj) == 1)


# --------------------------------------------------------------------------------------------------
# autoPET
# --------------------------------------------------------------------------------------------------


def test_autopet_layout_patients_and_studies(tmp_path):
    cases = make_autopet_phantom(tmp_path, n_cases=3, seed=0, second_study_probability=1.0, **SMALL_PET)
    patients = sorted(p.name for p in tmp_path.iterdir())
    assert len(patients) == 2 and all(re.fullmatch(r"PETCT_[0-9a-f]{10}", p) for p in patients)
    studies = sorted(s for p in patients for s in (tmp_path / p).iterdir())
    assert len(studies) == 3
    for study in studies:
        assert re.fullmatch(r"\d\d-\d\d-\d{4}-NA-PET-CT Ganzkoerper  primaer mit KM-\d{5}", study.name)
        assert sorted(p.name for p in study.iterdir()) == ["CTres.nii.gz", "SEG.nii.gz", "SUV.nii.gz"]
        suv, a1 = _load(study / "SUV.nii.gz")
        ct, a2 = _load(study / "CTres.nii.gz")
        seg, a3 = _load(study / "SEG.nii.gz")
        assert suv.shape == ct.shape == seg.shape == SMALL_PET["shape"]
        np.testing.assert_allclose(a1, a2)
        np.testing.assert_allclose(a1, a3)
        np.testing.assert_allclose(np.abs(np.diag(a1)[:3]), SMALL_PET["spacing"])
        assert suv.dtype == np.float32 and ct.dtype == np.int16
        assert set(np.unique(seg).tolist()) == {0, 1}
    # Two studies of the first patient share its group, so splits keep them together.
    assert [c.patient for c in cases].count(cases[0].patient) == 2
    assert {c.images["pet"].name for c in cases} == {"SUV.nii.gz"}
    assert all(c.label.parent == c.images["ct"].parent for c in cases)


def test_autopet_intensities_hu_and_suv():
    case = autopet_phantom_case(seed=0, patient_index=0)
    ct, pet, tissue, label = case.images["ct"], case.images["pet"], case.tissue, case.label
    hu = {name: float(ct[mask].mean()) for name, mask in tissue.items()}
    assert hu["air"] < -950
    assert -900 < hu["lung"] < -650
    assert -200 < hu["fat"] < -50
    assert hu["lung"] < hu["fat"] < hu["muscle"] < hu["bone"]
    assert 0 < hu["muscle"] < 100 and hu["bone"] > 250
    suv = {name: float(pet[mask].mean()) for name, mask in tissue.items()}
    assert 0.3 < suv["muscle"] < 1.2
    assert suv["liver"] > suv["muscle"] and suv["urine"] > 2 * suv["liver"]
    assert float(pet[label == 1].mean()) > 2 * suv["muscle"]
    assert float(pet[label == 1].max()) > 3.0


def test_autopet_deterministic_follow_up_and_negative():
    a = autopet_phantom_case(seed=5, patient_index=1, **SMALL_PET)
    b = autopet_phantom_case(seed=5, patient_index=1, **SMALL_PET)
    for name in ("pet", "ct"):
        np.testing.assert_array_equal(a.images[name], b.images[name])
    np.testing.assert_array_equal(a.label, b.label)
    other = autopet_phantom_case(seed=6, patient_index=1, **SMALL_PET)
    assert not np.array_equal(a.images["pet"], other.images["pet"])
    follow_up = autopet_phantom_case(seed=5, patient_index=1, study_index=1, **SMALL_PET)
    assert not np.array_equal(follow_up.label, a.label)
    # Same patient: same anatomy up to positioning, so about the same body volume.
    body, body_follow_up = (
        np.count_nonzero(a.images["ct"] > -500),
        np.count_nonzero(follow_up.images["ct"] > -500),
    )
    assert abs(body_follow_up - body) < 0.05 * body
    negative = autopet_phantom_case(seed=5, patient_index=1, negative=True, **SMALL_PET)
    assert not np.any(negative.label)


# --------------------------------------------------------------------------------------------------
# HECKTOR
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hecktor_case():
    return hecktor_phantom_case(seed=0, index=1)


def test_hecktor_layout(tmp_path):
    cases = make_hecktor_phantom(tmp_path, n_cases=2, seed=0, **SMALL_HECKTOR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTr", "labelsTr"]
    ids = [c.case_id for c in cases]
    assert all(re.fullmatch(r"(CHUM|CHUP|CHUS|CHUV|HGJ|HMR|MDA)-\d{3}", i) for i in ids)
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == sorted(
        f"{i}__{m}.nii.gz" for i in ids for m in ("CT", "PT")
    )
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    for case in cases:
        label, label_affine = _load(case.label)
        ct, ct_affine = _load(case.images["ct"])
        pet, pet_affine = _load(case.images["pet"])
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        assert label.shape == ct.shape and np.allclose(label_affine, ct_affine)
        assert pet.shape != ct.shape


def test_hecktor_grids_differ_and_overlap(hecktor_case):
    ct_affine, pet_affine = hecktor_case.affines["ct"], hecktor_case.affines["pet"]
    np.testing.assert_allclose(np.abs(np.diag(ct_affine)[:3]), (2.0, 2.0, 3.0))
    np.testing.assert_allclose(np.abs(np.diag(pet_affine)[:3]), (4.0, 4.0, 4.0))
    ct_lo, ct_hi = _world_box(hecktor_case.images["ct"].shape, ct_affine)
    pet_lo, pet_hi = _world_box(hecktor_case.images["pet"].shape, pet_affine)
    assert not np.allclose(ct_lo, pet_lo) and not np.allclose(ct_hi, pet_hi)
    overlap = np.prod(np.clip(np.minimum(ct_hi, pet_hi) - np.maximum(ct_lo, pet_lo), 0, None))
    assert overlap > 0.8 * np.prod(ct_hi - ct_lo)


def test_hecktor_labels_and_intensities(hecktor_case):
    label, ct, pet, tissue = (
        hecktor_case.label,
        hecktor_case.images["ct"],
        hecktor_case.images["pet"],
        hecktor_case.tissue,
    )
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    hu = {name: float(ct[mask].mean()) for name, mask in tissue.items()}
    assert hu["air"] < -900 and hu["lung"] < hu["fat"] < hu["muscle"] < hu["bone"]
    shape, ct_affine, pet_affine = pet.shape, hecktor_case.affines["ct"], hecktor_case.affines["pet"]
    muscle = _to_grid(tissue["muscle"], ct_affine, shape, pet_affine)
    background = float(pet[muscle].mean())
    assert 0.3 < background < 1.5
    for value in (1, 2):  # GTVp and GTVn are hot in PET (after resampling the label to the PET grid)
        lesion = _to_grid(label == value, ct_affine, shape, pet_affine)
        assert np.any(lesion)
        assert float(pet[lesion].mean()) > 2 * background


def test_hecktor_deterministic_per_seed(hecktor_case):
    again = hecktor_phantom_case(seed=0, index=1)
    for name in ("ct", "pet"):
        np.testing.assert_array_equal(again.images[name], hecktor_case.images[name])
    np.testing.assert_array_equal(again.label, hecktor_case.label)
    other = hecktor_phantom_case(seed=1, index=1)
    assert not np.array_equal(other.label, hecktor_case.label)


def test_hecktor_refuses_then_overwrites(tmp_path):
    make_hecktor_phantom(tmp_path, n_cases=1, seed=0, **SMALL_HECKTOR)
    (label_file,) = (tmp_path / "labelsTr").iterdir()
    before = label_file.stat().st_mtime_ns
    with pytest.raises(CimlError, match="already exists.*set overwrite"):
        make_hecktor_phantom(tmp_path, n_cases=1, seed=0, **SMALL_HECKTOR)
    assert label_file.stat().st_mtime_ns == before
    make_hecktor_phantom(tmp_path, n_cases=1, seed=0, overwrite=True, **SMALL_HECKTOR)
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == [label_file.name]
    assert label_file.stat().st_mtime_ns != before
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "imagesTr").iterdir())


# --------------------------------------------------------------------------------------------------
# Readers see what the generators say they wrote
# --------------------------------------------------------------------------------------------------


def test_layout_readers_find_the_written_cases(tmp_path, brats_dir):
    from ciml.data.layouts import read_dataset
    from ciml.tasks import load_task

    written = {
        "brats2020": brats_dir,
        "autopet": (
            tmp_path / "a",
            make_autopet_phantom(tmp_path / "a", 3, 0, second_study_probability=1.0, **SMALL_PET),
        ),
        "hecktor2022": (tmp_path / "h", make_hecktor_phantom(tmp_path / "h", 2, 0, **SMALL_HECKTOR)),
    }
    for task, (folder, cases) in written.items():
        found = read_dataset(folder, load_task(task))
        summary = sorted((c.case_id, c.patient, tuple(sorted(c.images.items())), c.label) for c in cases)
        assert (
            sorted((c.case_id, c.patient, tuple(sorted(c.images.items())), c.label) for c in found) == summary
        )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["phantom", "brats", "--out", str(out), "--cases", "1", "--spacing", "2", "--seed", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 BraTS2020 phantom case" in last and str(out) in last and "2 mm" in last
    flair, _ = _load(out / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz")
    assert flair.shape == (120, 120, 78)
    np.testing.assert_array_equal(flair, brats_phantom_case(seed=3, index=1, spacing_mm=2.0).images["flair"])


def test_cli_refuses_existing_and_bad_options(tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["phantom", "hecktor", "--out", str(out), "--cases", "1"]) == 0
    assert main(["phantom", "hecktor", "--out", str(out), "--cases", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["phantom", "hecktor", "--out", str(out), "--cases", "1", "--overwrite"]) == 0
    assert main(["phantom", "autopet", "--out", str(tmp_path / "a"), "--cases", "1", "--spacing", "2"]) == 1
    assert "--spacing applies to brats only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
