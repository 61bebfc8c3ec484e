"""Preprocessing: plan, per-type normalisation, grids, inversion and the cache, on tiny generated NIfTIs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ciml.data import preprocessing as pp
from ciml.data.cases import Case
from ciml.data.preprocessing import (
    PreprocessedCache,
    PreprocessingError,
    PreprocessingPlan,
    invert_to_original,
    load_volume,
    plan_preprocessing,
    preprocess_case,
)
from ciml.tasks.spec import load_task

SHAPE = (20, 24, 16)
# Voxel axes i, j, k run along -A (1.0 mm), +S (1.5 mm) and -R (3.0 mm): flipped, permuted, anisotropic.
FLIPPED = np.array([[0, 0, -3.0, 30.0], [-1.0, 0, 0, 20.0], [0, 1.5, 0, -10.0], [0, 0, 0, 1]])
RAS_SPACING = (3.0, 1.0, 1.5)
BODY = (slice(3, 17), slice(4, 21), slice(2, 14))


def write(path: Path, array: np.ndarray, affine: np.ndarray = FLIPPED) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def brats_labels() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[6:13, 8:15, 5:10] = 2
    label[8:11, 10:13, 6:9] = 1
    label[9, 11, 7] = 4
    return label


def make_brats_case(
    folder: Path, case_id: str = "case1", seed: int = 0, affine: np.ndarray = FLIPPED
) -> Case:
    """Four MRI contrasts with a zero background outside BODY, and a 0/1/2/4 label."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    body = np.zeros(SHAPE, bool)
    body[BODY] = True
    images = {}
    for i, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        values = np.where(body, rng.normal(300 + 50 * i, 40 + 5 * i, SHAPE), 0).astype(np.float32)
        images[modality] = write(folder / f"{case_id}_{modality}.nii.gz", values, affine)
    label = write(folder / f"{case_id}_seg.nii.gz", brats_labels(), affine)
    return Case(case_id, images, label)


@pytest.fixture
def brats():
    return load_task("brats2020")


@pytest.fixture
def hecktor():
    return load_task("hecktor2022")


# ------------------------------------------------------------------------------------------------ plan


def test_plan_round_trips_through_json(tmp_path, hecktor):
    case = make_petct_case(tmp_path)
    plan = plan_preprocessing([case], hecktor)
    back = PreprocessingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert back.plan_hash() == plan.plan_hash()
    assert back.to_dict() == plan.to_dict()


def test_default_target_spacing_is_the_median_ras_spacing(tmp_path, brats):
    cases = []
    for i, scale in enumerate((1.0, 2.0, 4.0)):
        affine = FLIPPED.copy()
        affine[:3, 2] *= scale  # the k axis (R) gets 3, 6, 12 mm
        cases.append(make_brats_case(tmp_path / f"c{i}", f"c{i}", affine=affine))
    plan = plan_preprocessing(cases, brats)
    assert plan.median_spacing == (6.0, 1.0, 1.5)
    assert plan.target_spacing == (6.0, 1.0, 1.5)
    assert plan.median_shape == (16, 20, 24)
    assert plan_preprocessing(cases, brats, target_spacing=(1, 1, 1)).target_spacing == (1.0, 1.0, 1.0)


def test_plan_records_a_scheme_per_modality_type(tmp_path, brats, hecktor):
    mri_plan = plan_preprocessing([make_brats_case(tmp_path / "b")], brats)
    assert {n.scheme for n in mri_plan.normalization.values()} == {"zscore_nonzero"}
    petct_plan = plan_preprocessing([make_petct_case(tmp_path / "h")], hecktor)
    assert petct_plan.normalization["ct"].scheme == "ct_clip_zscore"
    assert petct_plan.normalization["pet"].scheme == "pet_clip_scale"
    assert petct_plan.statistics_from == "label"


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d.pop("target_spacing"), "target_spacing"),
        (lambda d: d.update(target_spacing=[1, 0, 1]), "target_spacing"),
        (lambda d: d["normalization"]["ct"].update(scheme="minmax"), "scheme"),
        (lambda d: d["normalization"]["ct"]["params"].pop("std"), "params.std"),
        (lambda d: d["normalization"].pop("pet"), "normalization.pet"),
        (lambda d: d.update(version=99), "version"),
    ],
)
def test_bad_plan_dicts_name_the_key(tmp_path, hecktor, change, key):
    data = plan_preprocessing([make_petct_case(tmp_path)], hecktor).to_dict()
    change(data)
    with pytest.raises(PreprocessingError, match=key.replace(".", r"\.")):
        PreprocessingPlan.from_dict(data, source="plan.json")


def test_plan_needs_cases(brats):
    with pytest.raises(PreprocessingError, match="no cases"):
        plan_preprocessing([], brats)


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_grid_and_labels_exactly(tmp_path, brats):
    case = make_brats_case(tmp_path)
    plan = plan_preprocessing([case], brats)  # target = the case's own spacing
    pre = preprocess_case(case, brats, plan)
    # RAS with the cropped body box: BODY is i=3:17 (A, flipped), j=4:21 (S), k=2:14 (R, flipped).
    assert pre.image.shape == (4, 12, 14, 17)
    assert pre.label.dtype == np.uint8
    assert np.asarray(pre.meta["preprocessed_affine"])[:3, :3].diagonal().tolist() == list(RAS_SPACING)
    back = invert_to_original(pre.label, pre.meta)
    assert back.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_array_equal(back, brats_labels())
    np.testing.assert_allclose(pre.meta["original_affine"], nib.load(case.label).affine)
    json.dumps(pre.meta)  # JSON-ready


def test_uncrop_pads_with_zeros_in_the_original_voxel_order(tmp_path, brats):
    case = make_brats_case(tmp_path)
    pre = preprocess_case(case, brats, plan_preprocessing([case], brats))
    ones = np.ones(pre.image.shape[1:], np.float32)
    back = invert_to_original(ones, pre.meta)
    expected = np.zeros(SHAPE, np.float32)
    expected[BODY] = 1
    np.testing.assert_array_equal(back, expected)


def test_round_trip_through_another_spacing_restores_the_grid(tmp_path, brats):
    case = make_brats_case(tmp_path)
    plan = plan_preprocessing([case], brats, target_spacing=(2.0, 2.0, 2.0))
    pre = preprocess_case(case, brats, plan)
    assert pre.image.shape[1:] == tuple(pre.meta["preprocessed_shape"])
    assert pre.image.shape[1:] != (12, 14, 17)
    back = invert_to_original(pre.label, pre.meta)
    assert back.shape == SHAPE
    original = brats_labels()
    inter = np.logical_and(back > 0, original > 0).sum()
    assert 2 * inter / ((back > 0).sum() + (original > 0).sum()) > 0.8
    probabilities = invert_to_original(pre.regions(brats).astype(np.float32), pre.meta)
    assert probabilities.shape == (3, *SHAPE) and probabilities.dtype == np.float32
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0


def test_invert_rejects_a_wrong_shape(tmp_path, brats):
    case = make_brats_case(tmp_path)
    pre = preprocess_case(case, brats, plan_preprocessing([case], brats))
    with pytest.raises(ValueError, match="spatial shape"):
        invert_to_original(np.zeros((5, 5, 5)), pre.meta)


# ------------------------------------------------------------------------------------- normalisation


def test_mri_is_z_scored_over_the_foreground_of_each_case(tmp_path, brats):
    case = make_brats_case(tmp_path)
    pre = preprocess_case(case, brats, plan_preprocessing([case], brats))
    for channel in pre.image:
        inside = channel[channel != 0]
        assert abs(inside.mean()) < 1e-4
        assert abs(inside.std() - 1) < 1e-3
    background = invert_to_original(pre.image[0], pre.meta)
    mask = np.ones(SHAPE, bool)
    mask[BODY] = False
    assert np.all(background[mask] == 0)


def make_petct_case(folder: Path, case_id: str = "h1", pet_affine: np.ndarray | None = None) -> Case:
    """CT in HU (air -1000, body ~40, metal 3000 outlier), PET in SUV, label 1 (GTVp) and 2 (GTVn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[BODY] = rng.normal(40, 30, ct[BODY].shape)
    ct[4, 5, 3] = 3000.0
    label = np.zeros(SHAPE, np.uint8)
    label[6:12, 8:14, 5:9] = 1
    label[13:15, 15:18, 10:12] = 2
    ct[label > 0] = rng.normal(60, 20, (label > 0).sum())
    pet = np.where(ct > -500, rng.gamma(2.0, 0.5, SHAPE), 0).astype(np.float32)
    pet[label > 0] = rng.uniform(4, 20, (label > 0).sum())
    pet[3:5, 4:6, 2:4] = 0.0  # body without uptake
    images = {"ct": write(folder / f"{case_id}__CT.nii.gz", ct)}
    images["pet"] = write(
        folder / f"{case_id}__PT.nii.gz", pet, FLIPPED if pet_affine is None else pet_affine
    )
    return Case(case_id, images, write(folder / f"{case_id}.nii.gz", label))


def test_ct_is_clipped_to_dataset_percentiles_then_z_scored(tmp_path, hecktor):
    case = make_petct_case(tmp_path)
    plan = plan_preprocessing([case], hecktor)
    params = plan.normalization["ct"].params
    ct, label = nib.load(case.images["ct"]).get_fdata(), nib.load(case.label).get_fdata()
    foreground = ct[label > 0]
    np.testing.assert_allclose(
        [params["clip_low"], params["clip_high"]], np.percentile(foreground, [0.5, 99.5])
    )
    np.testing.assert_allclose(
        [params["mean"], params["std"]], [foreground.mean(), foreground.std()], rtol=1e-6
    )
    pre = preprocess_case(case, hecktor, plan)
    back = invert_to_original(pre.image[0], pre.meta)  # same spacing: no interpolation
    expected = (np.clip(ct, params["clip_low"], params["clip_high"]) - params["mean"]) / params["std"]
    np.testing.assert_allclose(back[BODY], expected[BODY], rtol=1e-5, atol=1e-5)
    assert back[4, 5, 3] == pytest.approx((params["clip_high"] - params["mean"]) / params["std"], rel=1e-5)


def test_pet_keeps_suv_clipped_and_scaled_never_z_scored(tmp_path, hecktor):
    case = make_petct_case(tmp_path)
    plan = plan_preprocessing([case], hecktor)
    params = plan.normalization["pet"].params
    pre = preprocess_case(case, hecktor, plan)
    pet_channel = pre.image[1]
    assert pet_channel.min() >= 0.0
    assert (pet_channel == 0).any()  # no uptake stays exactly 0: no mean was subtracted
    suv = nib.load(case.images["pet"]).get_fdata()
    back = invert_to_original(pet_channel, pre.meta)
    np.testing.assert_allclose(
        back[BODY], np.clip(suv, 0, params["clip_high"])[BODY] / params["scale"], rtol=1e-5
    )
    assert params["clip_high"] == pytest.approx(
        np.percentile(suv[nib.load(case.label).get_fdata() > 0], 99.5)
    )


def test_synthetic_is_z_scored_per_case(tmp_path):
    spec = load_task("shapecomposition")
    rng = np.random.default_rng(3)
    images = {
        m: write(tmp_path / f"{m}.nii.gz", rng.normal(5, 3, SHAPE).astype(np.float32) + 1)
        for m in spec.modalities
    }
    case = Case("s", images, None)
    pre = preprocess_case(case, spec, plan_preprocessing([case], spec))
    assert pre.label is None
    for channel in pre.image:
        assert abs(channel.mean()) < 1e-4 and abs(channel.std() - 1) < 1e-3


# ------------------------------------------------------------------------------------------------ grids


def test_modalities_on_different_grids_are_resampled_onto_the_first(tmp_path, hecktor):
    # PET at 2 x 3 x 3 mm (half the voxels along i and j), covering the same field of view.
    pet_affine = FLIPPED.copy()
    pet_affine[:3, 0] *= 2
    pet_affine[:3, 1] *= 2
    pet_affine[:3, 3] += 0.5 * (pet_affine[:3, 0] / 2 + pet_affine[:3, 1] / 2)  # align voxel edges
    case = make_petct_case(tmp_path, pet_affine=pet_affine)
    hot_ct_voxels = np.zeros(SHAPE, np.float32)
    hot_ct_voxels[8:12, 10:14, 4:8] = 1  # the same physical block on the CT grid
    pet = np.zeros((10, 12, 16), np.float32)
    pet[4:6, 5:7, 4:8] = 10.0  # 2x2 PET voxels = 4x4 CT voxels along i and j
    write(case.images["pet"], pet, pet_affine)
    write(case.label, hot_ct_voxels.astype(np.uint8))
    plan = plan_preprocessing([case], hecktor)
    pre = preprocess_case(case, hecktor, plan)
    assert pre.meta["reference_modality"] == "ct"
    assert pre.image.shape[0] == 2
    back = invert_to_original(pre.image[1], pre.meta)
    assert back.shape == SHAPE
    hot = back > 0.5 * back.max()
    assert np.array_equal(hot, hot_ct_voxels > 0)


def test_label_on_another_grid_is_resampled_with_nearest(tmp_path, brats):
    case = make_brats_case(tmp_path)
    coarse = FLIPPED.copy()
    coarse[:3, 0] *= 2
    coarse[:3, 3] += 0.5 * coarse[:3, 0] / 2
    label = np.zeros((10, 24, 16), np.uint8)
    label[3:5, 8:12, 4:8] = 4
    write(case.label, label, coarse)
    pre = preprocess_case(case, brats, plan_preprocessing([case], brats))
    back = invert_to_original(pre.label, pre.meta)
    assert set(np.unique(back)) == {0, 4}
    assert (back == 4).sum() == 2 * (label == 4).sum()


def test_mha_files_load_like_nifti(tmp_path):
    array = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nifti = load_volume(write(tmp_path / "a.nii.gz", array))
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0]) @ FLIPPED[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ FLIPPED[:3, 3]).tolist())
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    mha = load_volume(tmp_path / "a.mha")
    np.testing.assert_array_equal(mha.numpy(), nifti.numpy())
    np.testing.assert_allclose(mha.affine.numpy(), nifti.affine.numpy(), atol=1e-6)
    affine, shape = pp.read_geometry(tmp_path / "a.mha")
    assert shape == SHAPE
    np.testing.assert_allclose(affine, FLIPPED, atol=1e-6)


# ----------------------------------------------------------------------------------------------- errors


def test_unexpected_label_values_name_the_file(tmp_path, brats):
    case = make_brats_case(tmp_path)
    label = brats_labels()
    label[0, 0, 0] = 3
    write(case.label, label)
    with pytest.raises(PreprocessingError, match=r"case1_seg\.nii\.gz.*unexpected label values \[3\]"):
        preprocess_case(case, brats, plan_preprocessing([case], brats))


def test_nan_and_missing_files_name_the_file(tmp_path, brats):
    case = make_brats_case(tmp_path)
    plan = plan_preprocessing([case], brats)
    bad = np.zeros(SHAPE, np.float32)
    bad[1, 1, 1] = np.nan
    write(case.images["t2"], bad)
    with pytest.raises(PreprocessingError, match=r"case1_t2\.nii\.gz: contains NaN"):
        preprocess_case(case, brats, plan)
    case.images["t2"].unlink()
    with pytest.raises(PreprocessingError, match=r"case1_t2\.nii\.gz: file not found"):
        preprocess_case(case, brats, plan)


def test_a_missing_modality_fails_unless_allowed(tmp_path, brats):
    full = make_brats_case(tmp_path)
    plan = plan_preprocessing([full], brats)
    images = {m: p for m, p in full.images.items() if m != "flair"}
    partial = Case("case1", images, full.label)
    with pytest.raises(PreprocessingError, match="case1.*flair"):
        preprocess_case(partial, brats, plan)
    pre = preprocess_case(partial, brats, plan, allow_missing=True)
    assert pre.meta["missing_modalities"] == ["flair"] and pre.meta["reference_modality"] == "t1"
    assert np.all(pre.image[0] == 0) and np.any(pre.image[1] != 0)


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hit_reads_no_image_file(tmp_path, brats, monkeypatch):
    case = make_brats_case(tmp_path / "raw")
    plan = plan_preprocessing([case], brats)
    cache = PreprocessedCache(tmp_path / "cache", brats, plan)
    assert "case1" not in cache
    first = cache.get(case)
    assert "case1" in cache
    for path in [*case.images.values(), case.label]:
        path.unlink()

    def no_reading(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr("ciml.data.preprocessing.load.load_volume", no_reading)  # where load_case finds it
    second = cache.get(case)
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.label, first.label)
    assert second.meta == first.meta
    np.testing.assert_array_equal(cache.load("case1").image, first.image)
    files = sorted(p.name for p in cache.root.iterdir())
    assert files == ["case1.json", "case1_image.npy", "case1_label.npy", "plan.json"]
    assert cache.root.name == f"plan-{plan.plan_hash()}"


def test_cache_recomputes_when_a_source_changes_or_the_plan_differs(tmp_path, brats):
    case = make_brats_case(tmp_path / "raw")
    plan = plan_preprocessing([case], brats)
    cache = PreprocessedCache(tmp_path / "cache", brats, plan)
    first = cache.get(case)
    label = brats_labels()
    label[label == 4] = 1
    write(case.label, label)
    assert 4 not in cache.get(case).label and 4 in first.label
    other_plan = plan_preprocessing([case], brats, target_spacing=(2, 2, 2))
    other = PreprocessedCache(tmp_path / "cache", brats, other_plan)
    assert "case1" not in other
    assert other.prepare([case], progress=False) == ["case1"]
    assert other.load("case1").image.shape != first.image.shape


def test_cache_load_of_an_unknown_case_names_it(tmp_path, brats):
    case = make_brats_case(tmp_path / "raw")
    cache = PreprocessedCache(tmp_path / "cache", brats, plan_preprocessing([case], brats))
    with pytest.raises(PreprocessingError, match="nope"):
        cache.load("nope")


def test_cache_file_names_are_safe_for_any_case_id(tmp_path, brats):
    case = make_brats_case(tmp_path / "raw")
    odd = Case("PETCT_0a/08-12-2005", case.images, case.label)
    cache = PreprocessedCache(tmp_path / "cache", brats, plan_preprocessing([case], brats))
    cache.get(odd)
    assert odd.case_id in cache
    assert all(p.parent == cache.root for p in cache.root.rglob("*"))
    assert cache.load(odd.case_id).meta["case_id"] == odd.case_id
