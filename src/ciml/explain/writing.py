"""Writing an explanation: NIfTI maps on the case's original grid, PNG figures and explanation.json."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ciml.data.preprocessing import invert_to_original
from ciml.explain.case import CaseExplanation
from ciml.files import refuse_existing, write_bytes_atomic, write_json_atomic
from ciml.inference.writing import reference_nifti, save_nifti_atomic, to_nifti

SUMMARY_FILE = "explanation.json"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", name)


def nifti_names(explanation: CaseExplanation) -> dict[str, np.ndarray]:
    """File name -> map on the preprocessed grid, for every Grad-CAM map and information map."""
    names = {}
    for c in explanation.gradcam.contributions:
        for modality, values in c.maps.items():
            file = f"gradcam_{safe_name(c.segmentor)}_{safe_name(c.region)}_from_{safe_name(modality)}.nii.gz"
            names[file] = values.numpy()
    for message, values in explanation.information.items():
        receiver, sender = message.split("<-")
        names[f"info_{safe_name(receiver)}_from_{safe_name(sender)}.nii.gz"] = values
    return names


def write_explanation(
    explanation: CaseExplanation, folder: str | Path, overwrite: bool = False
) -> list[Path]:
    """Write the case's NIfTI maps (original grid), PNG figures and ``explanation.json`` into ``folder``.

    The JSON is written last, so its presence marks a complete explanation; an existing one is kept
    unless ``overwrite``.

    Raises:
        CimlError: ``folder`` already holds an explanation and ``overwrite`` is false.
    """
    folder = Path(folder)
    summary_path = folder / SUMMARY_FILE
    refuse_existing([summary_path], overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    meta = explanation.meta
    reference = reference_nifti(meta["sources"].get(meta["reference_modality"]))
    affine = np.asarray(meta["original_affine"], dtype=np.float64)
    maps = nifti_names(explanation)
    written = []
    if maps:
        stacked = invert_to_original(np.stack(list(maps.values())).astype(np.float32), meta, mode="linear")
        for name, values in zip(maps, stacked, strict=True):
            written.append(
                save_nifti_atomic(to_nifti(values.astype(np.float32), affine, reference), folder / name)
            )
    for name, png in explanation.figures().items():
        written.append(write_bytes_atomic(folder / name, png))
    summary = {**explanation.summary(), "files": [p.name for p in written]}
    written.append(write_json_atomic(summary_path, summary))
    return written
