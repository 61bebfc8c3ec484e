"""Folder evaluation behind `ciml evaluate` and `ciml robustness` (the metrics: :mod:`ciml.metrics`)."""

from ciml.evaluation.evaluate import (
    CONVENTION_FOR_TASK,
    CONVENTIONS,
    EvaluationError,
    EvaluationResult,
    case_metrics,
    evaluate_folders,
    reference_files,
)

__all__ = [
    "CONVENTIONS",
    "CONVENTION_FOR_TASK",
    "EvaluationError",
    "EvaluationResult",
    "case_metrics",
    "evaluate_folders",
    "reference_files",
]
