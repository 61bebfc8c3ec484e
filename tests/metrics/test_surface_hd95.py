"""Area-weighted surface HD95 (BraTS 2023+) against hand computations and DeepMind's reference values."""

from __future__ import annotations

import numpy as np
import pytest
from monai.metrics.utils import get_code_to_measure_table
from scipy import ndimage

from ciml.metrics import hd95, hd95_surface, robust_hausdorff, surface_distances
from ciml.metrics.surface import surfel_area_table


def blobs(seed: int, shape=(30, 34, 26), threshold=0.03) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, 2.0) > threshold


def voxel(shape=(8, 8, 8), at=(2, 2, 2)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[at] = True
    return mask


@pytest.mark.parametrize(
    ("pred", "ref", "penalty", "expected"),
    [
        (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), 374.0, 0.0),  # both empty
        (voxel(), np.zeros((8, 8, 8), bool), 374.0, 374.0),  # nothing to find, something found
        (np.zeros((8, 8, 8), bool), voxel(), 337.0, 337.0),  # a missed structure, 2024 penalty
        (voxel(), voxel(), 374.0, 0.0),  # identical
    ],
)
def test_empty_and_identical_masks(pred, ref, penalty, expected):
    assert hd95_surface(pred, ref, (1.0, 1.0, 1.0), penalty=penalty) == expected


@pytest.mark.parametrize(("axis", "shift"), [(0, 1), (0, 3), (1, 2), (2, 4)])
def test_single_voxel_shifted_is_the_shift_in_mm(axis, shift):
    """One voxel's 8 corners carry equal areas; shifted by k voxels, 4 corners are k and 4 are k-1
    voxels from the other's: the area-weighted 95th percentile is k voxels (in mm on that axis)."""
    spacing = (0.8, 1.5, 3.0)
    at = [1, 1, 1]
    at[axis] += shift
    value = hd95_surface(voxel((10, 10, 10), (1, 1, 1)), voxel((10, 10, 10), tuple(at)), spacing)
    assert value == pytest.approx(shift * spacing[axis])


@pytest.mark.parametrize(
    ("seed", "spacing", "expected"),
    # google-deepmind/surface-distance@1f805ce:
    # compute_robust_hausdorff(compute_surface_distances(ref, pred, spacing), 95)
    [
        (0, (1.0, 1.0, 1.0), 3.7416573867739413),
        (1, (0.8, 1.5, 3.0), 5.028916384272064),
        (2, (1.2, 1.2, 2.5), 5.546169849544818),
    ],
)
def test_matches_deepmind_surface_distance(seed, spacing, expected):
    pred, ref = blobs(seed), blobs(seed + 1000)
    assert hd95_surface(pred, ref, spacing) == pytest.approx(expected, abs=1e-9)


def test_differs_from_the_voxel_centre_definition_and_is_symmetric():
    pred, ref = blobs(0), blobs(1000)
    assert hd95_surface(pred, ref) == pytest.approx(hd95_surface(ref, pred))
    assert hd95_surface(pred, ref) != pytest.approx(hd95(pred, ref))


def test_area_table_is_monais_in_float64():
    for spacing in [(1.0, 1.0, 1.0), (0.8, 1.5, 3.0)]:
        ours = surfel_area_table(spacing)
        monai = get_code_to_measure_table(spacing)[0].double().numpy()
        assert ours.dtype == np.float64 and ours.shape == (256,)
        np.testing.assert_allclose(ours, monai, atol=1e-5)
        assert ours[0] == 0.0 and ours[255] == 0.0  # no surface inside or outside


def test_distances_report_both_directions_with_areas():
    pred, ref = voxel((6, 6, 6), (1, 1, 1)), voxel((6, 6, 6), (1, 1, 3))
    distances = surface_distances(pred, ref, (1.0, 1.0, 2.0))
    assert distances.pred_to_ref.shape == distances.pred_areas.shape == (8,)
    assert sorted(distances.pred_to_ref) == [2.0] * 4 + [4.0] * 4  # corners 1 and 2 slices away
    assert robust_hausdorff(distances) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(pred, ref, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        surface_distances(pred[0], ref[0])
