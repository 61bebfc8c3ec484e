"""Choosing postprocessing on hand-built validation masks (BraTS 2020: labels 2 edema, 1 necrosis, 4 ET).

At 5 mm voxels (125 mm^3) the volume candidates 50..1000 mm^3 are 1, 2, 4 and 8 voxels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciml.inferers import Postprocessing, RegionRule
from ciml.tasks import load_task
from ciml.training.postprocessing import (
    MARGIN,
    ValidationMasks,
    choose_postprocessing,
    mean_dice,
    min_volume_candidates,
)

SPEC = load_task("brats2020")
SHAPE = (10, 10, 10)
SPACING = (5.0, 5.0, 5.0)


def tumour(et: bool = False) -> np.ndarray:
    """Edema around a necrotic core; with ``et`` an 8-voxel enhancing block inside the core."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:7, 1:7, 1:7] = 2
    labels[2:6, 2:6, 2:6] = 1
    if et:
        labels[2:4, 2:4, 2:4] = 4
    return labels


def case(predicted: np.ndarray, reference: np.ndarray) -> ValidationMasks:
    return ValidationMasks.cropped(SPEC.labels_to_regions(predicted), SPEC.labels_to_regions(reference))


def test_candidates_are_physical_volumes_in_voxels_or_a_plain_voxel_grid():
    assert min_volume_candidates(SPACING) == (1, 2, 4, 8)
    assert min_volume_candidates((1.0, 1.0, 1.0)) == (50, 100, 200, 500, 1000)
    assert min_volume_candidates(None) == (50, 100, 200, 500, 1000)  # no spacing: the numbers as voxels


def test_noise_et_in_a_case_without_et_is_removed_and_becomes_necrosis():
    noisy = tumour()
    noisy[4, 4, 4] = noisy[4, 4, 5] = 4  # 2 voxels of ET where the reference has none: ET Dice 0
    cases = [case(noisy, tumour()), case(tumour(et=True), tumour(et=True))]
    choice = choose_postprocessing(cases, SPEC, SPACING)
    # 4 voxels is the smallest threshold that removes the noise and keeps the real 8-voxel ET
    assert choice.rule == Postprocessing({"ET": RegionRule(min_volume=4)}, SPACING)
    assert choice.baseline == {"WT": 1.0, "TC": 1.0, "ET": 0.5}
    assert choice.chosen == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    kept = [(t.region, t.candidate) for t in choice.trials if t.kept]
    assert kept == [("ET", RegionRule(min_volume=4))]
    fixed = choice.rule.apply(SPEC.labels_to_regions(noisy), SPEC)
    np.testing.assert_array_equal(SPEC.regions_to_labels(fixed), tumour())  # the noise is necrosis now

    record = json.loads(json.dumps(choice.to_dict()))
    assert record["validation_cases"] == 2 and record["margin"] == MARGIN
    assert record["dice_without"]["ET"] == 0.5 and record["dice_with"]["ET"] == 1.0
    assert Postprocessing.from_dict(record["rule"]) == choice.rule
    assert record["description"] == "ET: removed under 4 voxels (500 mm^3)"
    # WT, TC, ET each: largest component, then 4 volumes
    assert [t["region"] for t in record["trials"]] == ["WT"] * 5 + ["TC"] * 5 + ["ET"] * 5
    assert "ET" in choice.table() and "yes" in choice.table()


def test_identity_when_removal_would_hurt_and_ties_change_nothing():
    small = tumour()
    small[3, 3, 3] = 4  # a real 1-voxel ET, found: removing it scores Dice 0
    cases = [case(small, small), case(tumour(), tumour())]
    choice = choose_postprocessing(cases, SPEC, SPACING)
    assert choice.rule.is_identity and not any(t.kept for t in choice.trials)
    assert choice.chosen == choice.baseline == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert choice.rule.describe() == "none"


def test_a_far_false_positive_blob_chooses_the_largest_wt_component():
    blob = tumour()
    blob[9, 9, 0] = 2  # one far voxel of edema, not touching the tumour
    cases = [case(blob, tumour()), case(tumour(et=True), tumour(et=True))]
    choice = choose_postprocessing(cases, SPEC, SPACING)
    assert choice.rule.rule("WT") == RegionRule(largest_component_only=True)
    assert choice.chosen["WT"] == 1.0 > choice.baseline["WT"]


def test_no_validation_cases_store_the_identity_and_say_so():
    choice = choose_postprocessing([], SPEC, SPACING)
    assert choice.rule.is_identity and choice.cases == 0
    assert choice.to_dict()["note"] == "no validation cases: nothing applied"


def test_cropping_keeps_dice_and_components():
    predicted, reference = tumour(et=True), tumour()
    predicted[9, 9, 9] = 2
    full = SPEC.labels_to_regions(predicted), SPEC.labels_to_regions(reference)
    cropped = ValidationMasks.cropped(*full)
    assert cropped.predicted.shape == (3, 9, 9, 9)  # from (1, 1, 1) to (9, 9, 9)
    rule = Postprocessing({"WT": RegionRule(largest_component_only=True), "ET": RegionRule(min_volume=9)})
    whole = ValidationMasks(*full)
    for r in (Postprocessing(), rule):
        assert mean_dice([cropped], SPEC, r) == pytest.approx(mean_dice([whole], SPEC, r))
    empty = ValidationMasks.cropped(np.zeros((3, *SHAPE), bool), np.zeros((3, *SHAPE), bool))
    assert empty.predicted.size == 0 and mean_dice([empty], SPEC, rule) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
