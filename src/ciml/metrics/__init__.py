"""Challenge-exact segmentation metrics (BraTS, autoPET, HECKTOR 2022) on numpy masks; no files, no models."""

from ciml.metrics.segmentation import (
    AUTOPET_METRICS,
    BRATS_METRICS,
    HD95_EMPTY_PENALTY,
    HECKTOR_METRICS,
    AggregatedDice,
    autopet_case_metrics,
    brats_case_metrics,
    brats_region_metrics,
    dice,
    hd95,
    missed_component_voxels,
    overlap_counts,
    per_region,
    sensitivity,
    specificity,
    voxel_volume_ml,
)

__all__ = [
    "AUTOPET_METRICS",
    "BRATS_METRICS",
    "HD95_EMPTY_PENALTY",
    "HECKTOR_METRICS",
    "AggregatedDice",
    "autopet_case_metrics",
    "brats_case_metrics",
    "brats_region_metrics",
    "dice",
    "hd95",
    "missed_component_voxels",
    "overlap_counts",
    "per_region",
    "sensitivity",
    "specificity",
    "voxel_volume_ml",
]
