"""Postprocessing rules on hand-built BraTS 2020 label maps (labels: 2 edema, 1 necrosis, 4 ET).

Each case is a label map along one line of voxels (shape 1 x 1 x N): it is turned into WT/TC/ET masks,
postprocessed, assembled back, and compared with the label map worked out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciml.errors import CimlError, ParameterError
from ciml.inferers import Postprocessing, RegionRule, enforce_nesting, largest_component, nesting
from ciml.tasks import load_task

SPEC = load_task("brats2020")
WT, TC, ET = 0, 1, 2


def line(*labels: int) -> np.ndarray:
    return np.array(labels, dtype=np.uint8).reshape(1, 1, -1)


def postprocess(rule: Postprocessing, labels: np.ndarray, spacing=None) -> list[int]:
    masks = rule.apply(SPEC.labels_to_regions(labels), SPEC, spacing=spacing)
    return SPEC.regions_to_labels(masks).ravel().tolist()


CASES = [
    (  # a small ET (2 voxels under 3) is removed: its voxels are painted as TC's label, necrosis
        {"ET": RegionRule(min_volume=3)},
        line(2, 1, 4, 4, 0),
        [2, 1, 1, 1, 0],
    ),
    (  # an ET at the threshold (2 voxels, not under 2) is kept
        {"ET": RegionRule(min_volume=2)},
        line(2, 1, 4, 4, 0),
        [2, 1, 4, 4, 0],
    ),
    (  # the largest WT component (3 voxels) stays, the far single voxel goes
        {"WT": RegionRule(largest_component_only=True)},
        line(2, 2, 2, 0, 0, 2, 0),
        [2, 2, 2, 0, 0, 0, 0],
    ),
    (  # a dropped WT component takes the TC and ET inside it along (nesting): not painted 4 again
        {"WT": RegionRule(largest_component_only=True)},
        line(2, 1, 2, 0, 0, 4, 0),
        [2, 1, 2, 0, 0, 0, 0],
    ),
    (  # a removed WT (3 voxels under 4) removes everything
        {"WT": RegionRule(min_volume=4)},
        line(2, 1, 4, 0),
        [0, 0, 0, 0],
    ),
    (  # largest component first, then the volume test on what is left: ET's largest part is 2 < 3
        {"ET": RegionRule(min_volume=3, largest_component_only=True)},
        line(1, 4, 4, 1, 4, 1),
        [1, 1, 1, 1, 1, 1],
    ),
    (  # the same ET without the component step has 3 voxels in total and stays
        {"ET": RegionRule(min_volume=3)},
        line(1, 4, 4, 1, 4, 1),
        [1, 4, 4, 1, 4, 1],
    ),
    (  # the identity changes nothing
        {},
        line(2, 1, 4, 0, 4, 2),
        [2, 1, 4, 0, 4, 2],
    ),
]


@pytest.mark.parametrize(("rules", "labels", "expected"), CASES)
def test_rules_on_hand_built_label_maps(rules, labels, expected):
    assert postprocess(Postprocessing(rules), labels) == expected


def test_the_largest_component_is_26_connected_in_3d():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # touching at corners only: one component
    mask[3, 3, 0] = mask[3, 2, 0] = True  # a separate pair
    kept = largest_component(mask)
    assert kept.sum() == 3 and kept[0, 0, 0] and kept[2, 2, 2] and not kept[3, 3, 0]
    assert not largest_component(np.zeros((2, 2, 2), bool)).any()


def test_nesting_comes_from_the_label_sets():
    assert nesting(SPEC) == {"WT": (), "TC": ("WT",), "ET": ("WT", "TC")}
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], bool)  # TC and ET stray outside WT
    np.testing.assert_array_equal(enforce_nesting(masks, SPEC), [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])


def test_identity_returns_the_masks_unchanged_even_when_they_do_not_nest():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 6, 4)) > 0.5
    for rule in (Postprocessing(), Postprocessing({"ET": RegionRule()}, spacing=(1.0, 1.0, 1.0))):
        assert rule.is_identity
        out = rule.apply(masks, SPEC)
        np.testing.assert_array_equal(out, masks)
        assert out is not masks


def test_min_volume_is_rescaled_to_the_grid_it_is_applied_on():
    rule = Postprocessing({"ET": RegionRule(min_volume=8)}, spacing=(1.0, 1.0, 1.0))  # 8 mm^3
    labels = line(1, 4, 1)
    assert postprocess(rule, labels) == [1, 1, 1]  # 1 voxel of 1 mm^3: removed
    assert postprocess(rule, labels, spacing=(2.0, 2.0, 2.0)) == [1, 4, 1]  # 1 voxel of 8 mm^3: kept
    assert postprocess(Postprocessing(rule.rules), labels, spacing=(2.0, 2.0, 2.0)) == [1, 1, 1]  # voxels


def test_json_round_trip_and_description():
    rule = Postprocessing(
        {"WT": RegionRule(largest_component_only=True), "ET": RegionRule(min_volume=12)}, (1.0, 1.0, 2.0)
    )
    back = Postprocessing.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back == rule and back.same_as(rule)
    assert rule.describe() == "WT: largest component only; ET: removed under 12 voxels (24 mm^3)"
    assert Postprocessing().describe() == "none"
    assert Postprocessing.from_dict(Postprocessing().to_dict()) == Postprocessing()
    assert Postprocessing({"ET": RegionRule()}) == Postprocessing()  # identity entries are dropped
    assert Postprocessing(spacing=(1.0, 1.0, 1.0)).same_as(Postprocessing())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"regions": {"ET": {"min_volume": -1}}}, "'regions.ET': min_volume must be a whole number"),
        ({"regions": {"ET": {"largest_component_only": "yes"}}}, "largest_component_only must be true"),
        ({"regions": {"ET": {"size": 3}}}, "'regions.ET': expected a mapping"),
        ({"regions": {}, "spacing": [1, 0, 1]}, "'spacing': must be positive voxel sizes"),
        ([], "expected a mapping with 'regions'"),
    ],
)
def test_malformed_rules_are_refused_with_the_key(data, message):
    with pytest.raises(CimlError, match=message):
        Postprocessing.from_dict(data, source="fold_0/postprocessing.json")


def test_rules_that_do_not_fit_the_spec_are_refused_in_api_terms():
    masks = SPEC.labels_to_regions(line(2, 1, 4))
    with pytest.raises(ParameterError, match="postprocessing: rules for NCR, not regions of task brats2020"):
        Postprocessing({"NCR": RegionRule(min_volume=1)}).apply(masks, SPEC)
    with pytest.raises(ParameterError, match=r"masks: expected \[R, \*spatial\] with R = 3"):
        Postprocessing().apply(masks[:2], SPEC)
