"""Lesion-wise BraTS scores on hand-built cases, against the rules of the official 2023/2024 code."""

from __future__ import annotations

import numpy as np
import pytest

from ciml.metrics import LESIONWISE_RULES, lesionwise_case_metrics
from ciml.metrics.lesionwise import merge_touching, merged_lesions

SHAPE = (48, 40, 20)
GLI_2023, GLI_2024 = LESIONWISE_RULES["brats2023"], LESIONWISE_RULES["brats2024"]


def cube(labels: np.ndarray, corner: tuple[int, int, int], size: int, value: int) -> np.ndarray:
    x, y, z = corner
    labels[x : x + size, y : y + size, z : z + size] = value
    return labels


def empty() -> np.ndarray:
    return np.zeros(SHAPE, np.uint8)


def et(labels_2023: np.ndarray, spacing=(1.0, 1.0, 1.0), rules=GLI_2023) -> dict[str, float]:
    """Score a reference/prediction pair whose only tissue is ET (label 3)."""
    return lesionwise_case_metrics(*labels_2023, rules, spacing)["ET"]


def test_missed_lesion_scores_dice_0_and_the_penalty():
    ref = cube(cube(empty(), (2, 2, 2), 4, 3), (30, 30, 10), 4, 3)  # two 64-voxel lesions
    pred = cube(empty(), (2, 2, 2), 4, 3)  # finds the first exactly
    row = et((pred, ref))
    assert row["lesionwise_dice"] == pytest.approx((1 + 0) / 2)
    assert row["lesionwise_hd95"] == pytest.approx((0 + 374) / 2)
    assert (row["n_tp"], row["n_fp"], row["n_fn"]) == (1, 0, 1)
    assert row["dice"] == pytest.approx(2 * 64 / (64 + 128))  # legacy Dice over the whole tissue


def test_false_positive_blob_adds_a_zero_lesion_and_the_penalty():
    ref = cube(empty(), (2, 2, 2), 4, 3)
    pred = cube(cube(empty(), (2, 2, 2), 4, 3), (30, 30, 10), 2, 3)
    row = et((pred, ref))
    assert row["lesionwise_dice"] == pytest.approx(1 / 2)
    assert row["lesionwise_hd95"] == pytest.approx(374 / 2)
    assert (row["n_tp"], row["n_fp"], row["n_fn"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("gap", "n_lesions", "expected_dice"),
    [
        (2, 1, 2 * 64 / (64 + 128)),  # dilated 3 voxels each, they meet: one lesion, half of it found
        (12, 2, (1 + 0) / 2),  # too far apart: two lesions, one found, one missed
    ],
)
def test_lesions_closer_than_the_dilation_are_one_lesion(gap, n_lesions, expected_dice):
    ref = cube(cube(empty(), (2, 2, 2), 4, 3), (2 + 4 + gap, 2, 2), 4, 3)
    pred = cube(empty(), (2, 2, 2), 4, 3)
    assert int(merged_lesions(ref == 3, 3).max()) == n_lesions
    row = et((pred, ref))
    assert row["lesionwise_dice"] == pytest.approx(expected_dice)
    assert row["n_fn"] == n_lesions - 1


@pytest.mark.parametrize(
    ("spacing", "expected_dice", "n_fn"),
    [
        ((1.0, 1.0, 1.0), 1.0, 0),  # 27 voxels = 27 mm^3 <= 50: left out of the score
        ((2.0, 2.0, 2.0), 0.5, 1),  # 27 voxels = 216 mm^3 > 50: a missed lesion
    ],
)
def test_reference_lesions_at_most_the_threshold_in_mm3_are_left_out(spacing, expected_dice, n_fn):
    ref = cube(cube(empty(), (2, 2, 2), 5, 3), (30, 30, 10), 3, 3)
    pred = cube(empty(), (2, 2, 2), 5, 3)
    row = et((pred, ref), spacing)
    assert row["lesionwise_dice"] == pytest.approx(expected_dice)
    assert row["n_fn"] == n_fn


def test_a_prediction_of_a_small_reference_lesion_is_not_a_false_positive():
    ref = cube(cube(empty(), (2, 2, 2), 5, 3), (30, 30, 10), 3, 3)
    row = et((ref.copy(), ref))
    assert (row["lesionwise_dice"], row["n_tp"], row["n_fp"]) == (1.0, 1, 0)


def test_nothing_anywhere_is_a_perfect_score():
    row = et((empty(), empty()))
    assert row == {
        "lesionwise_dice": 1.0,
        "lesionwise_hd95": 0.0,
        "n_tp": 0,
        "n_fp": 0,
        "n_fn": 0,
        "dice": 1.0,
        "hd95": 0.0,
        "sensitivity": 1.0,
        "specificity": 1.0,
    }


@pytest.mark.parametrize(
    ("blob_size", "rules", "n_fp"),
    [
        (2, GLI_2023, 1),  # 2023: every predicted component counts
        (2, GLI_2024, 0),  # 2024: 8 voxels <= 10 (ET): dropped before matching
        (3, GLI_2024, 1),  # 2024: 27 voxels > 10: a false positive
    ],
)
def test_2024_drops_small_predicted_lesions(blob_size, rules, n_fp):
    ref = cube(empty(), (2, 2, 2), 5, 3)
    pred = cube(ref.copy(), (30, 30, 10), blob_size, 3)
    assert et((pred, ref), rules=rules)["n_fp"] == n_fp


def test_2024_resection_cavity_is_its_own_tissue_outside_wt_and_tc():
    ref = cube(empty(), (2, 2, 2), 6, 4)  # only a cavity
    scores = lesionwise_case_metrics(ref.copy(), ref, GLI_2024)
    assert list(scores) == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert scores["RC"]["lesionwise_dice"] == 1.0 and scores["RC"]["n_tp"] == 1
    assert scores["WT"]["n_tp"] == 0 and scores["WT"]["lesionwise_dice"] == 1.0  # nothing to find
    missed = lesionwise_case_metrics(empty(), ref, GLI_2024)["RC"]
    assert missed["lesionwise_hd95"] == 337.0 and missed["hd95"] == 337.0  # 2024 penalty


def test_2024_lesions_touching_the_same_lesion_of_another_tissue_merge():
    """Two NETC lesions 14 voxels apart (beyond NETC's dilation 5) both touch one ET bar: one lesion."""
    ref = empty()
    ref[4:40, 10:12, 5:9] = 3  # ET bar
    ref[4:8, 12:16, 5:9] = 1  # NETC lesion A, touching the bar
    ref[26:30, 12:16, 5:9] = 1  # NETC lesion B, 18 voxels further along
    pred = np.where(ref == 3, 3, 0).astype(np.uint8)
    pred[4:8, 12:16, 5:9] = 1  # finds A only
    netc_alone = merged_lesions(ref == 1, 5)
    assert int(netc_alone.max()) == 2
    assert len(np.unique(merge_touching(netc_alone, merged_lesions(ref == 3, 3)))) == 2  # 0 + one lesion
    row = lesionwise_case_metrics(pred, ref, GLI_2024)["NETC"]
    assert row["lesionwise_dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert (row["n_tp"], row["n_fn"]) == (1, 0)


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="shapes differ"):
        lesionwise_case_metrics(empty(), empty()[:-1], GLI_2023)
    with pytest.raises(ValueError, match="spacing"):
        lesionwise_case_metrics(empty(), empty(), GLI_2023, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="metrics"):
        lesionwise_case_metrics(empty(), empty(), GLI_2023, metrics="both")
