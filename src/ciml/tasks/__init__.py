"""Task specs (modalities, regions, decomposition, assembly) loaded from YAML presets or user files."""

from ciml.tasks.spec import (
    REGION_THRESHOLD,
    AssemblyStep,
    TaskSpec,
    TaskSpecError,
    assemble_labels,
    load_task,
    preset_names,
)

__all__ = [
    "REGION_THRESHOLD",
    "AssemblyStep",
    "TaskSpec",
    "TaskSpecError",
    "assemble_labels",
    "load_task",
    "preset_names",
]
