"""Choosing a run's inference tile on its validation fold, beside its postprocessing.

nnU-Net predicts with its training patch. Our networks normalise with InstanceNorm, whose statistics over
a tile depend on how much background the tile holds, so the tile changes the scores either way: a CIML
trained on 32^3 patches at 2 mm scored held-out mean Dice 0.80 with 32^3 tiles and 0.89 with 64^3, one
trained on 24^3 at 3 mm 0.84 with 24^3, 0.85 with 48^3 and 0.65 with 72^3 (AVX2 EPYC, 2026-12-07). So
the final validation is scored with the training patch and with twice it (capped at the largest
validation case, beyond which a tile only adds padding), and a larger tile replaces the training patch
only when it raises the mean validation Dice by more than :data:`MARGIN`. ``fold_K/tile.json`` keeps
the choice and the comparison; prediction uses it unless a tile is given.

Example:
    >>> tile_candidates((32, 32, 32), divisor=8, case_shapes=[(60, 70, 40)])
    [(32, 32, 32), (64, 64, 40)]
    >>> choice = choose_tile({(32, 32, 32): {"WT": 0.8}, (64, 64, 40): {"WT": 0.9}}, (32, 32, 32))
    >>> choice.tile
    (64, 64, 40)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ciml.inferers import tile_text

#: A tile other than the training patch must raise the mean validation Dice by more than this.
MARGIN = 0.005

Tile = tuple[int, ...]


def tile_candidates(
    patch: Sequence[int],
    divisor: int,
    case_shapes: Sequence[Sequence[int]],
    extra: Sequence[Sequence[int]] = (),
) -> list[Tile]:
    """The training patch, then ``extra`` tiles (e.g. an explicit validation tile), then twice the patch.

    Twice the patch is capped per axis at the largest validation case's extent rounded up to
    ``divisor`` (never below the patch); candidates equal to an earlier one are dropped.
    """
    patch = tuple(int(p) for p in patch)
    largest = [max(int(shape[axis]) for shape in case_shapes) for axis in range(len(patch))]
    doubled = tuple(
        max(p, min(2 * p, divisor * math.ceil(extent / divisor)))
        for p, extent in zip(patch, largest, strict=True)
    )
    ordered = [patch, *(tuple(int(t) for t in tile) for tile in extra), doubled]
    return list(dict.fromkeys(ordered))


@dataclass(frozen=True)
class TileChoice:
    """The chosen tile and the comparison behind it (what ``fold_K/tile.json`` holds).

    Attributes:
        tile: the tile prediction uses.
        patch: the training patch (the choice unless another tile wins by more than :data:`MARGIN`).
        dice: tile -> mean validation Dice per region with it, in candidate order.
        cases: number of validation cases compared on (0: nothing compared, the training patch kept).
    """

    tile: Tile
    patch: Tile
    dice: dict[Tile, dict[str, float]]
    cases: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile": list(self.tile),
            "training_patch": list(self.patch),
            "validation_cases": self.cases,
            "margin": MARGIN,
            "comparison": [
                {"tile": list(tile), "dice": scores, "mean": _mean(scores)}
                for tile, scores in self.dice.items()
            ],
        }

    def describe(self) -> str:
        """One line: every tile's mean validation Dice and which was chosen."""
        if not self.dice:
            return f"tile {tile_text(self.tile)} (the training patch; no validation cases to compare on)"
        scores = ", ".join(f"{tile_text(t)} {_mean(s):.4f}" for t, s in self.dice.items())
        return f"tile {tile_text(self.tile)} chosen on {self.cases} validation case(s) (mean Dice {scores})"


def choose_tile(dice: Mapping[Tile, Mapping[str, float]], patch: Sequence[int], cases: int = 0) -> TileChoice:
    """The tile with the best mean Dice, when it beats the training patch's by more than :data:`MARGIN`.

    Args:
        dice: tile -> mean validation Dice per region; must include ``patch`` unless empty.
        patch: the training patch, kept on ties and when nothing was compared.
        cases: validation cases behind ``dice`` (recorded).
    """
    patch = tuple(int(p) for p in patch)
    scored = {tuple(int(t) for t in tile): dict(scores) for tile, scores in dice.items()}
    if not scored:
        return TileChoice(patch, patch, {}, 0)
    if patch not in scored:
        raise ValueError(f"the training patch {patch} must be among the compared tiles {list(scored)}")
    best = max(scored, key=lambda tile: _mean(scored[tile]))
    wins = _mean(scored[best]) > _mean(scored[patch]) + MARGIN
    return TileChoice(best if wins else patch, patch, scored, cases)


def _mean(scores: Mapping[str, float]) -> float:
    return float(sum(scores.values()) / len(scores)) if scores else 0.0
