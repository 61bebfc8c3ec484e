"""Preprocessing: plan it from a dataset, apply it to a case, invert it for a prediction, cache it."""

from ciml.data.preprocessing.transform import (
    DEFAULT_CT_BODY_THRESHOLD,
    ORIENTATION,
    PLAN_VERSION,
    ModalityNormalization,
    PreprocessedCache,
    PreprocessedCase,
    PreprocessingError,
    PreprocessingPlan,
    invert_to_original,
    load_volume,
    plan_preprocessing,
    preprocess_case,
    read_geometry,
)

__all__ = [
    "DEFAULT_CT_BODY_THRESHOLD",
    "ORIENTATION",
    "PLAN_VERSION",
    "ModalityNormalization",
    "PreprocessedCache",
    "PreprocessedCase",
    "PreprocessingError",
    "PreprocessingPlan",
    "invert_to_original",
    "load_volume",
    "plan_preprocessing",
    "preprocess_case",
    "read_geometry",
]
