"""Challenge-exact metrics (BraTS, autoPET, HECKTOR 2022) and folder evaluation behind `ciml evaluate`."""

from ciml.evaluation.evaluate import (
    CONVENTION_FOR_TASK,
    CONVENTIONS,
    EvaluationError,
    EvaluationResult,
    case_metrics,
    evaluate_folders,
    reference_files,
)
from ciml.evaluation.metrics import (
    HD95_EMPTY_PENALTY,
    AggregatedDice,
    autopet_case_metrics,
    brats_case_metrics,
    dice,
    hd95,
    sensitivity,
    specificity,
)

__all__ = [
    "CONVENTIONS",
    "CONVENTION_FOR_TASK",
    "HD95_EMPTY_PENALTY",
    "AggregatedDice",
    "EvaluationError",
    "EvaluationResult",
    "autopet_case_metrics",
    "brats_case_metrics",
    "case_metrics",
    "dice",
    "evaluate_folders",
    "hd95",
    "reference_files",
    "sensitivity",
    "specificity",
]
