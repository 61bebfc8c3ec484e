"""Choosing the inference tile on validation: candidates and the margin rule, by hand-computed cases."""

from __future__ import annotations

import pytest

from ciml.training.tiles import MARGIN, choose_tile, tile_candidates


@pytest.mark.parametrize(
    ("patch", "divisor", "shapes", "extra", "expected"),
    [
        # twice the patch fits inside the largest case
        ((24, 24, 24), 4, [(80, 80, 52)], (), [(24, 24, 24), (48, 48, 48)]),
        # capped at the largest case, rounded up to the divisor (52 -> 52, 41 -> 44), per axis
        ((32, 32, 32), 8, [(60, 70, 41), (50, 80, 30)], (), [(32, 32, 32), (64, 64, 48)]),
        # never below the patch: an axis smaller than the patch keeps the patch's size
        ((16, 16, 16), 4, [(24, 24, 8)], (), [(16, 16, 16), (24, 24, 16)]),
        # a case no larger than the patch: one candidate
        ((16, 16, 16), 4, [(16, 12, 16)], (), [(16, 16, 16)]),
        # an explicit validation tile comes second; duplicates are dropped
        ((16, 16, 16), 4, [(64, 64, 64)], [(24, 24, 24)], [(16, 16, 16), (24, 24, 24), (32, 32, 32)]),
        ((16, 16, 16), 4, [(64, 64, 64)], [(32, 32, 32)], [(16, 16, 16), (32, 32, 32)]),
    ],
)
def test_candidates(patch, divisor, shapes, extra, expected) -> None:
    assert tile_candidates(patch, divisor, shapes, extra) == expected


P, Q = (24, 24, 24), (48, 48, 48)


@pytest.mark.parametrize(
    ("dice", "expected"),
    [
        ({P: {"WT": 0.80, "ET": 0.60}, Q: {"WT": 0.90, "ET": 0.60}}, Q),  # mean +0.05
        ({P: {"WT": 0.80, "ET": 0.60}, Q: {"WT": 0.80, "ET": 0.609}}, P),  # mean +0.0045: within the margin
        ({P: {"WT": 0.80, "ET": 0.60}, Q: {"WT": 0.80, "ET": 0.612}}, Q),  # mean +0.006
        ({P: {"WT": 0.80, "ET": 0.60}, Q: {"WT": 0.80, "ET": 0.60}}, P),  # a tie keeps the patch
        ({P: {"WT": 0.90, "ET": 0.60}, Q: {"WT": 0.60, "ET": 0.90}}, P),  # the mean decides, not one region
        ({P: {"WT": 0.50}}, P),
    ],
)
def test_choice_needs_a_gain_above_the_margin(dice, expected) -> None:
    assert MARGIN == 0.005
    choice = choose_tile(dice, P, cases=3)
    assert choice.tile == expected and choice.patch == P
    record = choice.to_dict()
    assert record["tile"] == list(expected) and record["validation_cases"] == 3
    assert [c["tile"] for c in record["comparison"]] == [list(t) for t in dice]
    assert record["comparison"][0]["mean"] == pytest.approx(sum(dice[P].values()) / len(dice[P]))


def test_the_best_of_several_tiles_wins_and_nothing_compared_keeps_the_patch() -> None:
    third = (32, 32, 32)
    dice = {P: {"WT": 0.7}, third: {"WT": 0.8}, Q: {"WT": 0.75}}
    assert choose_tile(dice, P).tile == third
    empty = choose_tile({}, P)
    assert empty.tile == P and empty.cases == 0
    assert "no validation cases" in empty.describe()
    assert choose_tile(dice, P, 2).describe() == (
        "tile 32x32x32 chosen on 2 validation case(s) (mean Dice 24x24x24 0.7000, 32x32x32 0.8000, "
        "48x48x48 0.7500)"
    )
    with pytest.raises(ValueError, match="the training patch"):
        choose_tile({Q: {"WT": 0.9}}, P)
