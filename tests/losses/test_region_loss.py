"""The region loss pinned by hand: BCE, soft (batch) Dice with its smoothing, per-segmentor owned and
fallback terms, and beta * KL.

The cases are tiny tensors whose expected values are worked out in the comments (p = sigmoid(logit);
ln 3 gives p = 3/4, -ln 3 gives p = 1/4, 0 gives p = 1/2; smoothing s = 1e-5), written as literals,
plus one random case against an independent float64 numpy formula. Nothing here calls the code under
test to get an expected value. MONAI's tests/losses/test_dice_loss.py is the model: a table of cases,
then the invalid options.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ciml.errors import CimlError
from ciml.losses import CIMLLoss, LossTerms, soft_dice_loss
from ciml.models import SegmentationOutput, build_model
from ciml.training.loop import TrainConfig, Trainer

LN3 = math.log(3.0)
S = 1e-5  # soft_dice_loss's default smoothing

# -ln(3/4), -ln(1/4), ln 2: BCE of p = 3/4 against 1 (or p = 1/4 against 0), of p = 3/4 against 0, of p = 1/2
BCE_GOOD = 0.2876820724517809
BCE_BAD = 1.3862943611198906
BCE_HALF = 0.6931471805599453


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# (id, logits [B, C, N], target [B, C, N], smooth, expected)
DICE_CASES = [
    # p = (1/2, 1/2), t = (1, 0): I = 1/2, sum p + sum t = 2 -> 1 - (1 + s) / (2 + s) = 1 / (2 + s)
    ("half-vs-one-voxel", [[[0.0, 0.0]]], [[[1.0, 0.0]]], S, 1 / (2 + S)),
    # p = (3/4, 1/4), t = (1, 0): I = 3/4, denominator 2 -> 1 - (3/2 + s) / (2 + s) = (1/2) / (2 + s)
    ("confident-right", [[[LN3, -LN3]]], [[[1.0, 0.0]]], S, 0.5 / (2 + S)),
    # the same, but wrong: I = 1/4 -> 1 - (1/2 + s) / (2 + s) = (3/2) / (2 + s)
    ("confident-wrong", [[[-LN3, LN3]]], [[[1.0, 0.0]]], S, 1.5 / (2 + S)),
    # empty target, p = 1/2: I = 0, denominator 1 -> 1 - s / (1 + s) = 1 / (1 + s)
    ("empty-target-half", [[[0.0, 0.0]]], [[[0.0, 0.0]]], S, 1 / (1 + S)),
    # empty target, p = sigmoid(-30) ~ 9.36e-14 each: 1 - s / (2p + s) = 2p / (2p + s) ~ 1.87e-8 (~ 0: the
    # smoothing makes "nothing predicted, nothing there" a perfect score)
    ("empty-target-empty-prediction", [[[-30.0, -30.0]]], [[[0.0, 0.0]]], S, 1.8715245686529158e-08),
    # a perfect hard prediction: p ~ 1 on the one foreground voxel, ~0 elsewhere -> ~0
    ("perfect", [[[30.0, -30.0, -30.0]]], [[[1.0, 0.0, 0.0]]], S, 0.0),
    # smoothing as given: p = 1/2, t = (1, 0), s = 1: 1 - (1 + 1) / (2 + 1) = 1/3
    ("smooth-one", [[[0.0, 0.0]]], [[[1.0, 0.0]]], 1.0, 1 / 3),
    # batch Dice (nnU-Net): sums over batch and voxels together. Image 0: p = 3/4, t = 1; image 1:
    # p = 1/4, t = 0 -> the "confident-right" pool, (1/2) / (2 + s). A per-image Dice would give
    # (0.25 / 1.75 + 1 - s / (0.25 + s)) / 2 = 0.5714.
    ("batch-dice-pools-images", [[[LN3]], [[-LN3]]], [[[1.0]], [[0.0]]], S, 0.5 / (2 + S)),
    # channels are averaged: channel 0 "confident-right", channel 1 "empty-target-half"
    (
        "mean-over-channels",
        [[[LN3, -LN3], [0.0, 0.0]]],
        [[[1.0, 0.0], [0.0, 0.0]]],
        S,
        (0.5 / (2 + S) + 1 / (1 + S)) / 2,
    ),
]


@pytest.mark.parametrize(
    "logits, target, smooth, expected", [c[1:] for c in DICE_CASES], ids=[c[0] for c in DICE_CASES]
)
def test_soft_dice_loss_hand_computed(logits, target, smooth, expected):
    loss = soft_dice_loss(_t(logits), _t(target), smooth=smooth)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_soft_dice_loss_is_spatial_dims_agnostic_and_float32_for_half_inputs():
    # the "confident-right" case laid out as [B=1, C=1, 1, 2, 1] and as bf16 logits
    logits = _t([[[[[LN3], [-LN3]]]]])
    target = _t([[[[[1.0], [0.0]]]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5 / (2 + S), rel=1e-5)
    half = soft_dice_loss(logits.bfloat16(), target)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(0.5 / (2 + S), rel=1e-2)  # ln 3 in bf16 is 1.1016, not 1.0986


# --- CIMLLoss on a hand-made output: two regions A, B; two voxels; target A = (1, 0), B = (0, 0) -----

REGIONS = ["A", "B"]
TARGET = [[[1.0, 0.0], [0.0, 0.0]]]  # [B=1, R=2 (A, B), N=2]

# "s1" owns A with logits (ln 3, -ln 3): p = (3/4, 1/4).
#   BCE = mean(-ln 3/4, -ln(1 - 1/4)) = -ln 3/4; Dice = "confident-right" = (1/2) / (2 + s)
S1 = BCE_GOOD + 0.5 / (2 + S)
# "s2" owns (B, A) -- not in the target's order -- with all logits 0: p = 1/2.
#   BCE = ln 2; Dice = mean(B: empty target, 1 / (1 + s); A: "half-vs-one-voxel", 1 / (2 + s))
S2 = BCE_HALF + (1 / (1 + S) + 1 / (2 + S)) / 2
# "s1" also stands in for B (fallback) with logits (-ln 3, -ln 3): p = (1/4, 1/4) against (0, 0).
#   BCE = -ln 3/4; Dice: I = 0, denominator 1/2 -> 1 - s / (1/2 + s)
S1_FALLBACK = BCE_GOOD + 1 - S / (0.5 + S)
SEGMENTATION = S1 + S2 + S1_FALLBACK  # = 3.2684838259...


def _output(kl: float = 2.0, fallback: bool = True) -> SegmentationOutput:
    return SegmentationOutput(
        logits={"s1": _t([[[LN3, -LN3]]]), "s2": _t([[[0.0, 0.0], [0.0, 0.0]]])},
        owned={"s1": ("A",), "s2": ("B", "A")},
        kl=torch.tensor(kl),
        kl_terms={"0/s1<-s2": torch.tensor(kl * 0.25), "0/s2<-s1": torch.tensor(kl * 0.75)},
        fallback_logits={"s1": _t([[[-LN3, -LN3]]])} if fallback else {},
        fallback={"s1": ("B",)} if fallback else {},
    )


# (id, beta, kl, with fallback, expected terms of as_dict())
LOSS_CASES = [
    (
        "beta-0",
        0.0,
        2.0,
        True,
        {
            "seg/s1": S1,
            "seg/s2": S2,
            "seg/s1/fallback": S1_FALLBACK,
            "seg": SEGMENTATION,
            "loss": SEGMENTATION,
        },
    ),
    # total = seg + beta * kl = seg + 0.5 * 2
    ("beta-half", 0.5, 2.0, True, {"seg": SEGMENTATION, "kl": 2.0, "loss": SEGMENTATION + 1.0}),
    ("beta-1e-3", 1e-3, 2.0, True, {"loss": SEGMENTATION + 2e-3}),
    # without fallback channels there is no fallback term and the sum is the owners' only
    ("no-fallback", 1.0, 0.0, False, {"seg/s1": S1, "seg/s2": S2, "seg": S1 + S2, "loss": S1 + S2}),
]


@pytest.mark.parametrize(
    "beta, kl, fallback, expected", [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES]
)
def test_ciml_loss_hand_computed(beta, kl, fallback, expected):
    terms = CIMLLoss(REGIONS, beta=beta)(_output(kl, fallback), _t(TARGET))
    assert isinstance(terms, LossTerms)
    logged = terms.as_dict()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
    assert ("seg/s1/fallback" in logged) == fallback


def test_every_term_is_reported_under_its_name():
    logged = CIMLLoss(REGIONS, beta=0.5)(_output(), _t(TARGET)).as_dict()
    assert set(logged) == {
        "loss",
        "seg",
        "kl",
        "seg/s1",
        "seg/s2",
        "seg/s1/fallback",
        "kl/0/s1<-s2",
        "kl/0/s2<-s1",
    }
    assert logged["kl/0/s1<-s2"] == pytest.approx(0.5) and logged["kl/0/s2<-s1"] == pytest.approx(1.5)
    assert all(isinstance(v, float) for v in logged.values())


def test_the_loss_is_differentiable_and_beta_scales_the_kl_gradient():
    logits = _t([[[LN3, -LN3]]]).requires_grad_()
    kl = torch.tensor(2.0, requires_grad=True)
    output = SegmentationOutput(logits={"s1": logits}, owned={"s1": ("A",)}, kl=kl)
    CIMLLoss(REGIONS, beta=0.25)(output, _t(TARGET)).total.backward()
    assert kl.grad.item() == pytest.approx(0.25)
    # d BCE / d logit = (p - t) / N = (3/4 - 1) / 2 and (1/4 - 0) / 2: (-1/8, 1/8). Dice adds
    # d/dp_i [-(2 I + s) / (D + s)] * p_i (1 - p_i) with I = 3/4, D = 2, dI/dp_i = t_i, dD/dp_i = 1 and
    # p (1 - p) = 3/16 for both voxels: voxel 0 -(2 (2 + s) - (3/2 + s)) / (2 + s)^2 * 3/16,
    # voxel 1 (3/2 + s) / (2 + s)^2 * 3/16
    d = (2 + S) ** 2
    expected = [-1 / 8 - (2 * (2 + S) - (1.5 + S)) / d * 3 / 16, 1 / 8 + (1.5 + S) / d * 3 / 16]
    np.testing.assert_allclose(logits.grad.flatten().numpy(), expected, rtol=1e-5)


def _reference_region_loss(logits: np.ndarray, target: np.ndarray, smooth: float = S) -> float:
    """BCE + batch soft Dice in float64 numpy, written from the definitions (not from the code)."""
    p = 1.0 / (1.0 + np.exp(-logits))
    bce = -np.mean(target * np.log(p) + (1 - target) * np.log1p(-p))
    axes = (0, *range(2, logits.ndim))
    dice = (2 * (p * target).sum(axes) + smooth) / (p.sum(axes) + target.sum(axes) + smooth)
    return float(bce + np.mean(1 - dice))


def test_random_case_matches_an_independent_numpy_formula():
    rng = np.random.default_rng(7)
    target = (rng.random((2, 3, 4, 5, 3)) < 0.3).astype(np.float32)  # regions WT, TC, ET; 3D
    owned = {"flair": ("WT",), "t1ce": ("ET", "TC"), "t2": ("WT", "TC")}
    channel = {"WT": 0, "TC": 1, "ET": 2}
    logits = {m: (3 * rng.standard_normal((2, len(r), 4, 5, 3))).astype(np.float32) for m, r in owned.items()}
    kl = 0.7
    output = SegmentationOutput(
        logits={m: torch.from_numpy(v) for m, v in logits.items()}, owned=owned, kl=torch.tensor(kl)
    )
    terms = CIMLLoss(["WT", "TC", "ET"], beta=0.3)(output, torch.from_numpy(target)).as_dict()
    expected = {
        m: _reference_region_loss(logits[m].astype(np.float64), target[:, [channel[r] for r in owned[m]]])
        for m in owned
    }
    for m, value in expected.items():
        assert terms[f"seg/{m}"] == pytest.approx(value, rel=1e-5), m
    assert terms["loss"] == pytest.approx(sum(expected.values()) + 0.3 * kl, rel=1e-5)


@pytest.mark.parametrize("kl", [0.0, 0.5, 3.0, 40.0])
def test_beta_enters_linearly_in_the_kl(kl):
    target = _t(TARGET)
    seg = CIMLLoss(REGIONS, beta=0.0)(_output(kl), target).total.item()
    for beta in (1e-3, 0.1, 1.0, 2.5):
        total = CIMLLoss(REGIONS, beta=beta)(_output(kl), target).total.item()
        assert total - seg == pytest.approx(beta * kl, rel=1e-5, abs=1e-6)
    # and doubling beta doubles the KL's share
    one = CIMLLoss(REGIONS, beta=0.2)(_output(kl), target).total.item() - seg
    two = CIMLLoss(REGIONS, beta=0.4)(_output(kl), target).total.item() - seg
    assert two == pytest.approx(2 * one, rel=1e-5, abs=1e-6)


def test_beta_zero_ignores_the_kl_entirely():
    """beta = 0 must not add 0 * KL: a non-finite KL (a saturated gate) must not poison the loss."""
    terms = CIMLLoss(REGIONS, beta=0.0)(_output(kl=math.inf), _t(TARGET))
    assert terms.total.item() == pytest.approx(SEGMENTATION, rel=1e-5)
    assert math.isinf(terms.kl.item())  # still reported as it is


def test_ciml_beta0_trains_with_beta_zero_whatever_the_setting():
    model = build_model("ciml-beta0", "brats2020", widths=(4,), spatial_dims=2)
    assert model.fixed_beta == 0.0
    config = TrainConfig(region_names=["WT", "TC", "ET"], beta=0.5, device="cpu", amp=False)
    assert Trainer(model, config, batch_at=lambda i: None).loss.beta == 0.0
    ciml = build_model("ciml", "brats2020", widths=(4,), spatial_dims=2)
    assert ciml.fixed_beta is None
    assert Trainer(ciml, config, batch_at=lambda i: None).loss.beta == 0.5


# --- invalid options ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-1e-3, -1.0, math.nan, math.inf, -math.inf])
def test_negative_or_non_finite_beta_is_refused(beta):
    with pytest.raises(CimlError, match="beta"):
        CIMLLoss(REGIONS, beta=beta)


def test_repeated_region_names_are_refused():
    with pytest.raises(CimlError, match="unique"):
        CIMLLoss(["A", "B", "A"])


def test_a_segmentor_owning_an_unknown_region_is_refused():
    output = SegmentationOutput(logits={"s1": _t([[[0.0, 0.0]]])}, owned={"s1": ("C",)}, kl=torch.tensor(0.0))
    with pytest.raises(KeyError, match="C"):
        CIMLLoss(REGIONS)(output, _t(TARGET))


def test_an_unknown_fallback_region_is_refused():
    output = _output()
    output.fallback = {"s1": ("C",)}
    with pytest.raises(KeyError, match="C"):
        CIMLLoss(REGIONS)(output, _t(TARGET))


@pytest.mark.parametrize(
    "target_shape",
    [
        (1, 3, 2),  # an extra channel (e.g. background in front) would shift every region silently
        (1, 1, 2),  # a missing channel
        (2,),  # no channel dim at all
    ],
    ids=["extra-channel", "missing-channel", "no-channel-dim"],
)
def test_a_target_without_one_channel_per_region_is_refused(target_shape):
    with pytest.raises(ValueError, match="one channel per region"):
        CIMLLoss(REGIONS)(_output(), torch.zeros(target_shape))


@pytest.mark.parametrize(
    "logits",
    [
        [[[0.0, 0.0, 0.0]]],  # three voxels against the target's two
        [[[0.0, 0.0], [0.0, 0.0]]],  # two channels for the one region s1 owns
        [[[0.0, 0.0]], [[0.0, 0.0]]],  # batch of two against a batch of one
    ],
    ids=["spatial", "channels", "batch"],
)
def test_logits_not_shaped_like_their_regions_target_are_refused(logits):
    output = SegmentationOutput(logits={"s1": _t(logits)}, owned={"s1": ("A",)}, kl=torch.tensor(0.0))
    with pytest.raises((ValueError, RuntimeError)):
        CIMLLoss(REGIONS)(output, _t(TARGET))
