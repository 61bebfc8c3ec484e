"""Challenge-exact metrics against hand computations, a brute-force HD95 and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage
from scipy.spatial.distance import cdist

from ciml.metrics import (
    HD95_EMPTY_PENALTY,
    AggregatedDice,
    autopet_case_metrics,
    brats_case_metrics,
    dice,
    hd95,
    missed_component_voxels,
    sensitivity,
    specificity,
    voxel_volume_ml,
)
from ciml.tasks import load_task

ANISO = (0.8, 1.5, 3.0)

# MONAI 1.6.1 warns about its own deprecated argument inside compute_hausdorff_distance.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def blobs(seed: int, shape=(14, 16, 12), threshold=0.1) -> np.ndarray:
    """Smooth random blobs; thresholded low enough that some touch the volume border."""
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, 1.5) > threshold


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Independent reference: explicit face-neighbour surfaces, all pairwise distances in mm."""

    def surface_points(mask):
        padded = np.pad(mask, 1)  # outside the volume is background
        inner = tuple(slice(1, -1) for _ in mask.shape)
        on_edge = np.zeros_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                on_edge |= mask & ~np.roll(padded, step, axis=axis)[inner]
        return np.argwhere(on_edge) * np.asarray(spacing, dtype=float)

    distances = cdist(surface_points(pred), surface_points(ref))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    as_batch = lambda m: torch.from_numpy(m)[None, None]  # noqa: E731
    out = compute_hausdorff_distance(
        as_batch(pred), as_batch(ref), include_background=True, percentile=95, spacing=spacing
    )
    return float(out.item())


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_hand_computed_and_empty_conventions():
    pred, ref = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    assert dice(pred, ref) == 1.0  # both empty: BraTS scores a perfect 1, MONAI/nnU-Net give NaN
    ref[0, 0, :3] = True
    assert dice(pred, ref) == 0.0
    assert dice(ref, pred) == 0.0
    pred[0, 0, 1:] = True  # |P|=3, |G|=3, |P&G|=2
    assert dice(pred, ref) == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", range(4))
def test_dice_matches_monai_on_random_masks(seed):
    pred, ref = blobs(seed), blobs(seed + 100)
    expected = compute_dice(
        torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None], include_background=True
    )
    assert dice(pred, ref) == pytest.approx(float(expected.item()), abs=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------ HD95


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (0.5, 4.0, 1.2)])
def test_hd95_of_two_single_voxels_is_their_distance_in_mm(spacing):
    pred, ref = np.zeros((8, 8, 12), bool), np.zeros((8, 8, 12), bool)
    pred[2, 3, 4] = True
    ref[5, 3, 8] = True  # 3 voxels along axis 0, 4 along axis 2
    expected = math.hypot(3 * spacing[0], 4 * spacing[2])
    assert hd95(pred, ref, spacing) == pytest.approx(expected)
    assert hd95(ref, pred, spacing) == pytest.approx(expected)


@pytest.mark.parametrize(("axis", "expected"), [(0, 1.0), (1, 2.0), (2, 3.0)])
def test_hd95_of_cube_shifted_by_one_voxel_is_that_axis_spacing(axis, expected):
    cube = np.zeros((12, 12, 12), bool)
    cube[4:8, 4:8, 4:8] = True
    shifted = np.roll(cube, 1, axis=axis)
    assert hd95(cube, shifted, (1.0, 2.0, 3.0)) == pytest.approx(expected)


def test_hd95_empty_conventions():
    empty, one = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    one[2, 2, 2] = True
    assert hd95(empty, empty, ANISO) == 0.0
    assert hd95(one, empty, ANISO) == pytest.approx(373.12866, abs=1e-5)
    assert hd95(empty, one, ANISO) == HD95_EMPTY_PENALTY
    assert hd95(one, one, ANISO) == 0.0


def test_hd95_masks_touching_the_border_do_not_depend_on_the_field_of_view():
    """Padding the volume must not change anything: the border is not a surface of its own."""
    full = np.ones((6, 7, 5), bool)
    assert hd95(full, full, ANISO) == 0.0
    slab, thicker = np.zeros((6, 7, 5), bool), np.zeros((6, 7, 5), bool)
    slab[:, :, :2] = True
    thicker[:, :, :3] = True
    padded = [np.pad(m, 3) for m in (slab, thicker)]
    assert hd95(slab, thicker, ANISO) == pytest.approx(hd95(*padded, ANISO))
    assert hd95(slab, thicker, ANISO) == pytest.approx(brute_force_hd95(slab, thicker, ANISO))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force_and_monai_on_random_masks(seed):
    pred, ref = blobs(seed), blobs(seed + 50)
    assert pred.any() and ref.any()
    assert pred[0].any() or pred[-1].any()  # these masks do touch the border
    ours = hd95(pred, ref, ANISO)
    assert ours == pytest.approx(brute_force_hd95(pred, ref, ANISO), rel=1e-9)
    assert ours == pytest.approx(monai_hd95(pred, ref, ANISO), rel=1e-5)


def test_hd95_is_spacing_aware_on_random_masks():
    pred, ref = blobs(7), blobs(8)
    assert hd95(pred, ref, (1.0, 1.0, 3.0)) != pytest.approx(hd95(pred, ref, (1.0, 1.0, 1.0)))
    assert hd95(pred, ref, (2.0, 2.0, 2.0)) == pytest.approx(2 * hd95(pred, ref, (1.0, 1.0, 1.0)))


def test_hd95_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))


# ------------------------------------------------------------------------------- sensitivity, specificity


def test_sensitivity_and_specificity_hand_computed():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], bool)
    assert sensitivity(pred, ref) == pytest.approx(3 / 4)
    assert specificity(pred, ref) == pytest.approx(4 / 6)


def test_sensitivity_and_specificity_empty_conventions():
    empty, some, full = np.zeros(5, bool), np.array([0, 1, 0, 0, 0], bool), np.ones(5, bool)
    assert sensitivity(empty, empty) == 1.0
    assert sensitivity(some, empty) == 0.0
    assert sensitivity(empty, some) == 0.0
    assert specificity(full, full) == 1.0  # reference without background: nothing to get wrong
    assert specificity(some, full) == 0.0
    assert specificity(empty, empty) == 1.0


def test_brats_case_metrics_scores_nested_regions():
    spec = load_task("brats2020")
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 2
    ref[3:7, 3:7, 3:7] = 1
    ref[4:6, 4:6, 4:6] = 4
    pred = ref.copy()
    pred[pred == 4] = 1  # ET missed, but still inside TC and WT
    out = brats_case_metrics(pred, ref, spec, (1.0, 1.0, 2.0))
    assert list(out) == ["WT", "TC", "ET"]
    assert out["WT"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    assert out["TC"]["dice"] == 1.0
    assert out["ET"]["dice"] == 0.0
    assert out["ET"]["hd95"] == HD95_EMPTY_PENALTY
    assert out["ET"]["sensitivity"] == 0.0


# ------------------------------------------------------------------------------------------------ autoPET


def test_autopet_false_positive_and_negative_volumes_of_known_components():
    spacing = (2.0, 2.0, 3.0)  # 12 mm^3 = 0.012 ml per voxel
    ref, pred = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    ref[1:3, 1:3, 1:3] = True  # lesion A: 8 voxels, found
    ref[8, 8, 2:5] = True  # lesion B: 3 voxels, missed -> FNV
    pred[2:4, 2:4, 2:4] = True  # overlaps lesion A: 8 voxels, not a false positive
    pred[8:10, 1:6, 8] = True  # 10 voxels touching no lesion -> FPV
    out = autopet_case_metrics(pred, ref, spacing)
    assert voxel_volume_ml(spacing) == pytest.approx(0.012)
    assert out["fp_volume_ml"] == pytest.approx(10 * 0.012)
    assert out["fn_volume_ml"] == pytest.approx(3 * 0.012)
    assert out["dice"] == pytest.approx(2 * 1 / (11 + 18))


def test_autopet_negative_case_scores_only_false_positives():
    ref, pred = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    pred[1:3, 1:3, 1] = True
    out = autopet_case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert math.isnan(out["dice"])
    assert out["fp_volume_ml"] == pytest.approx(4 / 1000)
    assert out["fn_volume_ml"] == 0.0


def test_autopet_connectivity_decides_which_voxels_are_one_component():
    """A voxel touching a true lesion only at a corner is its own component under 18-connectivity."""
    ref, pred = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    ref[1, 1, 1] = pred[1, 1, 1] = True
    pred[2, 2, 2] = True  # corner neighbour of the true positive
    assert missed_component_voxels(pred, ref, connectivity=18) == 1  # the challenge's cc3d setting
    assert missed_component_voxels(pred, ref, connectivity=26) == 0
    pred[2, 2, 2], pred[2, 2, 1] = False, True  # edge neighbour: joined under 18 too
    assert missed_component_voxels(pred, ref, connectivity=18) == 0
    assert missed_component_voxels(pred, ref, connectivity=6) == 1
    with pytest.raises(ValueError, match="connectivity"):
        missed_component_voxels(pred, ref, connectivity=8)


# ------------------------------------------------------------------------------------------------ HECKTOR


def test_aggregated_dice_differs_from_mean_of_cases_and_matches_hand_computation():
    def mask(start: int, stop: int) -> np.ndarray:  # 1D masks: only sizes and overlaps matter here
        return np.isin(np.arange(20), np.arange(start, stop))

    cases = [
        (mask(0, 10), mask(0, 10)),  # |P|=10, |G|=10, overlap 10: Dice 1
        (mask(0, 2), mask(2, 6)),  # |P|=2, |G|=4, overlap 0: Dice 0
        (mask(0, 3), mask(0, 1)),  # |P|=3, |G|=1, overlap 1: Dice 0.5
    ]
    agg = AggregatedDice()
    for pred, ref in cases:
        agg.update("GTVp", pred, ref)
    expected = 2 * (10 + 0 + 1) / ((10 + 10) + (2 + 4) + (3 + 1))
    per_case_mean = np.mean([dice(p, r) for p, r in cases])
    assert agg.per_class()["GTVp"] == pytest.approx(expected)  # 22/30
    assert per_case_mean == pytest.approx((1 + 0 + 0.5) / 3)
    assert agg.per_class()["GTVp"] != pytest.approx(per_case_mean)

    agg.add_volumes("GTVn", 0, 0, 0)  # a case without nodes adds nothing ...
    agg.add_volumes("GTVn", 3, 4, 4)
    assert agg.per_class()["GTVn"] == pytest.approx(6 / 8)
    assert agg.mean() == pytest.approx((22 / 30 + 6 / 8) / 2)
    agg.add_volumes("empty", 0, 0, 0)  # ... but a class absent everywhere is not computable,
    assert math.isnan(agg.per_class()["empty"])  # and is not averaged in silently
    assert agg.not_computable() == ["empty"]
    assert math.isnan(agg.mean())


def test_aggregated_dice_sums_mm3_when_cases_have_different_voxel_sizes():
    """Hand computation in mm^3 (HECKTOR 2022 notebook: counts x voxel volume, summed over cases)."""
    fine, coarse = (1.0, 1.0, 1.0), (2.0, 2.0, 3.0)  # 1 mm^3 and 12 mm^3 voxels
    ref_a, pred_a = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    ref_a[0, 0, :4] = True  # 4 voxels = 4 mm^3, found exactly
    pred_a[0, 0, :4] = True
    ref_b, pred_b = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    ref_b[0, 0, :2] = True  # 2 voxels = 24 mm^3, missed; prediction 1 voxel = 12 mm^3 elsewhere
    pred_b[3, 3, 3] = True
    agg = AggregatedDice()
    agg.update("GTVp", pred_a, ref_a, fine)
    agg.update("GTVp", pred_b, ref_b, coarse)
    in_mm3 = 2 * 4 / ((4 + 4) + (12 + 24))  # 8/44 = 0.1818
    in_voxels = 2 * 4 / ((4 + 4) + (1 + 2))  # 8/11 = 0.7273: what summing voxels gave
    assert agg.per_class()["GTVp"] == pytest.approx(in_mm3)
    assert abs(in_voxels - in_mm3) > 0.5
