"""Inference: sliding-window prediction of new cases (any modality subset), written on the input's grid."""

from ciml.inference.predict import (
    CaseResult,
    InferenceSettings,
    PredictionCallbacks,
    Predictor,
    output_paths,
    predict_case,
    predict_cases,
    predict_files,
    predict_folder,
    resolve_device,
)

__all__ = [
    "CaseResult",
    "InferenceSettings",
    "PredictionCallbacks",
    "Predictor",
    "output_paths",
    "predict_case",
    "predict_cases",
    "predict_files",
    "predict_folder",
    "resolve_device",
]
