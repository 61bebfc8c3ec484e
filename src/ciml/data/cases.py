"""The unit every reader produces: one case, its modality files and its optional label file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One case of a dataset, as found on disk (nothing is read yet).

    Attributes:
        case_id: identifier unique within the dataset (e.g. ``BraTS20_Training_001``).
        images: modality name (as in the task spec) -> file, or folder for a DICOM series.
        label: label file in the dataset's own label values, or None (e.g. BraTS validation cases).
        group: patient identifier for splits; studies of one patient share it (autoPET). Defaults
            to the case id.
        extra: layout-specific details a reader wants to keep (e.g. the original file names).
        volumes: modality -> index of its volume when its file is a 4D image holding several
            modalities (MSD's ``imagesTr/BRATS_001.nii.gz``); modalities not listed have a 3D file.
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None = None
    group: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, int] = field(default_factory=dict)

    @property
    def patient(self) -> str:
        return self.group or self.case_id
