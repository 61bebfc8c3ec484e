"""Inferers: Gaussian-weighted sliding-window prediction, mirroring TTA, and postprocessing of the masks."""

from ciml.inferers.postprocessing import (
    Postprocessing,
    RegionRule,
    enforce_nesting,
    largest_component,
    nesting,
)
from ciml.inferers.sliding import (
    DEFAULT_STEP,
    SIGMA_SCALE,
    check_step,
    mirror_axes_combinations,
    mirrored_average,
    sliding_window_probabilities,
    tile_text,
)

__all__ = [
    "DEFAULT_STEP",
    "SIGMA_SCALE",
    "Postprocessing",
    "RegionRule",
    "check_step",
    "enforce_nesting",
    "largest_component",
    "mirror_axes_combinations",
    "mirrored_average",
    "nesting",
    "sliding_window_probabilities",
    "tile_text",
]
