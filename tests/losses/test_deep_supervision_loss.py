"""The deep-supervision loss pinned by hand: targets max-pooled to each scale, and each segmentor's term
the weighted sum over scales of (BCE + soft Dice), weights 1 / 2^i normalised (2 scales: 2/3, 1/3).

As in test_region_loss.py: p = sigmoid(logit); ln 3 gives p = 3/4, -ln 3 gives 1/4, 0 gives 1/2;
smoothing s = 1e-5. Expected values are literals worked out in the comments, plus one random case
against an independent float64 numpy formula (pooling by reshape and max).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ciml.losses import CIMLLoss, downsample_target
from ciml.models import SegmentationOutput

LN3 = math.log(3.0)
S = 1e-5
BCE_GOOD = 0.2876820724517809  # -ln(3/4)
BCE_HALF = 0.6931471805599453  # ln 2


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------- targets per scale

# a 4x4 mask with one foreground voxel at (1, 2) and a 2x2 block at rows 2-3, columns 0-1
MASK = [
    [0, 0, 0, 0],
    [0, 0, 1, 0],
    [1, 1, 0, 0],
    [1, 1, 0, 0],
]


def test_target_is_max_pooled_to_each_scale():
    target = _t([[MASK]])  # [B=1, R=1, 4, 4]
    half = downsample_target(target, (2, 2))
    # cells (rows 0-1, cols 2-3) holds the single voxel; (rows 2-3, cols 0-1) the block
    assert half.shape == (1, 1, 2, 2)
    assert half[0, 0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    quarter = downsample_target(target, (1, 1))
    assert quarter.shape == (1, 1, 1, 1) and quarter.item() == 1.0
    # nearest sampling (the top-left voxel of each cell) would drop the single voxel: [[0, 0], [1, 0]]
    assert target[0, 0, ::2, ::2].tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_target_pooling_keeps_nesting_dtype_and_works_in_3d():
    wt = torch.zeros(2, 1, 4, 4, 4)
    wt[:, :, 1:3, 1:3, 1:3] = 1
    tc = torch.zeros_like(wt)
    tc[:, :, 1, 1, 1] = 1
    target = torch.cat([wt, tc], dim=1)
    half = downsample_target(target, (2, 2, 2))
    assert half.shape == (2, 2, 2, 2, 2) and half.dtype == target.dtype
    assert torch.all(half[:, 1] <= half[:, 0])  # TC inside WT at every scale
    assert half[0, 0].sum() == 8 and half[0, 1].sum() == 1  # the 2^3 block touches every cell
    assert downsample_target(target, (4, 4, 4)) is target  # full resolution: the target itself
    assert downsample_target(target.to(torch.uint8), (2, 2, 2)).dtype == torch.uint8


def test_target_pooling_refuses_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="integer multiple"):
        downsample_target(torch.zeros(1, 1, 6, 6), (4, 4))
    with pytest.raises(ValueError, match="integer multiple"):
        downsample_target(torch.zeros(1, 1, 4, 4), (2, 2, 2))


# --------------------------------------------------------------------------------- the weighted loss

# Regions A, B; 2x2 images; target A = [[1, 0], [0, 0]], B = 0 -> at half resolution A = [[1]], B = [[0]]
REGIONS = ["A", "B"]
TARGET = [[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]]  # [B=1, R=2, 2, 2]
W0, W1 = 2 / 3, 1 / 3  # two scales: 1, 1/2 over 3/2

# "s1" owns A. Full resolution: logits 0, p = 1/2 everywhere against (1, 0, 0, 0):
#   BCE = ln 2; Dice: I = 1/2, sum p + sum t = 2 + 1 -> 1 - (1 + s) / (3 + s) = 2 / (3 + s)
S1_FULL = BCE_HALF + 2 / (3 + S)
# half resolution: one logit ln 3, p = 3/4 against 1:
#   BCE = -ln 3/4; Dice: I = 3/4, denominator 3/4 + 1 -> 1 - (3/2 + s) / (7/4 + s) = (1/4) / (7/4 + s)
S1_HALF = BCE_GOOD + 0.25 / (1.75 + S)
# "s1" stands in for B. Full: logits -ln 3, p = 1/4 against 0: BCE = -ln 3/4; Dice: I = 0,
#   denominator 4 * 1/4 = 1 -> 1 - s / (1 + s) = 1 / (1 + s)
S1_FALLBACK_FULL = BCE_GOOD + 1 / (1 + S)
# half: logit 0, p = 1/2 against 0: BCE = ln 2; Dice: 1 - s / (1/2 + s) = (1/2) / (1/2 + s)
S1_FALLBACK_HALF = BCE_HALF + 0.5 / (0.5 + S)
# "s2" owns B, without deep logits (a segmentor the output gives none for): its plain loss,
#   logits ln 3 (p = 3/4) against 0: BCE = -ln(1/4) = ln 4; Dice: I = 0, denominator 3 -> 1 - s / (3 + s)
S2 = 2 * BCE_HALF + 3 / (3 + S)


def _output() -> SegmentationOutput:
    return SegmentationOutput(
        logits={"s1": torch.zeros(1, 1, 2, 2), "s2": torch.full((1, 1, 2, 2), LN3)},
        owned={"s1": ("A",), "s2": ("B",)},
        kl=torch.tensor(2.0),
        fallback_logits={"s1": torch.full((1, 1, 2, 2), -LN3)},
        fallback={"s1": ("B",)},
        deep_logits={"s1": [_t([[[[LN3]]]])]},
        deep_fallback_logits={"s1": [torch.zeros(1, 1, 1, 1)]},
    )


def test_loss_is_the_hand_computed_weighted_sum_over_scales():
    logged = CIMLLoss(REGIONS, beta=0.5)(_output(), _t(TARGET)).as_dict()
    s1 = W0 * S1_FULL + W1 * S1_HALF
    fallback = W0 * S1_FALLBACK_FULL + W1 * S1_FALLBACK_HALF
    assert logged["seg/s1"] == pytest.approx(s1, rel=1e-5)
    assert logged["seg/s1/fallback"] == pytest.approx(fallback, rel=1e-5)
    assert logged["seg/s2"] == pytest.approx(S2, rel=1e-5)
    assert logged["seg"] == pytest.approx(s1 + fallback + S2, rel=1e-5)
    assert logged["loss"] == pytest.approx(s1 + fallback + S2 + 0.5 * 2.0, rel=1e-5)
    # the numbers themselves: 0.6667 * 1.3598 + 0.3333 * 0.4305 = 1.0500
    assert s1 == pytest.approx(1.05004, abs=1e-4)


def test_without_deep_logits_the_loss_is_the_full_resolution_one():
    output = _output()
    output.deep_logits, output.deep_fallback_logits = {}, {}
    logged = CIMLLoss(REGIONS, beta=0.0)(output, _t(TARGET)).as_dict()
    assert logged["seg/s1"] == pytest.approx(S1_FULL, rel=1e-5)
    assert logged["seg/s1/fallback"] == pytest.approx(S1_FALLBACK_FULL, rel=1e-5)


def _region_loss(logits: np.ndarray, target: np.ndarray) -> float:
    p = 1.0 / (1.0 + np.exp(-logits))
    bce = -np.mean(target * np.log(p) + (1 - target) * np.log1p(-p))
    axes = (0, *range(2, logits.ndim))
    dice = (2 * (p * target).sum(axes) + S) / (p.sum(axes) + target.sum(axes) + S)
    return float(bce + np.mean(1 - dice))


def _max_pool(target: np.ndarray, factor: int) -> np.ndarray:
    b, r, h, w, d = target.shape
    blocks = target.reshape(b, r, h // factor, factor, w // factor, factor, d // factor, factor)
    return blocks.max(axis=(3, 5, 7))


def test_random_three_scales_match_an_independent_numpy_formula():
    rng = np.random.default_rng(3)
    target = (rng.random((2, 3, 8, 8, 4)) < 0.2).astype(np.float32)  # WT, TC, ET; 3D
    owned = {"flair": ("WT",), "t1ce": ("ET", "TC")}
    channel = {"WT": 0, "TC": 1, "ET": 2}
    shapes = [(8, 8, 4), (4, 4, 2), (2, 2, 1)]
    logits = {
        m: [(2 * rng.standard_normal((2, len(r), *s))).astype(np.float32) for s in shapes]
        for m, r in owned.items()
    }
    output = SegmentationOutput(
        logits={m: torch.from_numpy(v[0]) for m, v in logits.items()},
        owned=owned,
        kl=torch.tensor(0.0),
        deep_logits={m: [torch.from_numpy(x) for x in v[1:]] for m, v in logits.items()},
    )
    logged = CIMLLoss(["WT", "TC", "ET"], beta=0.0)(output, torch.from_numpy(target)).as_dict()
    weights = [4 / 7, 2 / 7, 1 / 7]
    for m, regions in owned.items():
        selected = target[:, [channel[r] for r in regions]].astype(np.float64)
        expected = sum(
            w * _region_loss(v.astype(np.float64), _max_pool(selected, 2**i))
            for i, (w, v) in enumerate(zip(weights, logits[m], strict=True))
        )
        assert logged[f"seg/{m}"] == pytest.approx(expected, rel=1e-5), m
