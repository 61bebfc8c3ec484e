"""Inferers: Gaussian-weighted sliding-window prediction and mirroring TTA over any network."""

from ciml.inferers.sliding import (
    DEFAULT_STEP,
    SIGMA_SCALE,
    check_step,
    mirror_axes_combinations,
    mirrored_average,
    sliding_window_probabilities,
)

__all__ = [
    "DEFAULT_STEP",
    "SIGMA_SCALE",
    "check_step",
    "mirror_axes_combinations",
    "mirrored_average",
    "sliding_window_probabilities",
]
