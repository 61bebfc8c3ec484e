"""Write predictions as NIfTI on the input's own grid, with its header, never half-written.

A prediction must overlay the scan it came from in any viewer and score against the reference without
resampling, so it carries the reference modality's affine and header (qform and sform with their codes);
only the data type changes. Files are serialised in memory and written under a hidden temporary name in
the output folder, then renamed: an interrupted run leaves complete files or none, and a temporary file
(``.NAME.*.tmp``) never looks like a prediction.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ciml.data.io import read_nifti_image
from ciml.errors import CimlError
from ciml.files import atomic_path

LABEL_SUFFIX = ".nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"


def reference_nifti(path: str | Path | None) -> nib.Nifti1Image | None:
    """The reference modality as a (lazily loaded) NIfTI image, or None for other formats (NRRD, DICOM).

    Raises:
        ImageReadError: the file is missing or its header is unreadable or corrupt (the reader's checks).
    """
    return None if path is None else read_nifti_image(path)


def to_nifti(array: np.ndarray, affine: np.ndarray, reference: nib.Nifti1Image | None) -> nib.Nifti1Image:
    """``array`` as NIfTI with the reference's header and qform/sform (codes kept), in ``array``'s dtype.

    Without a reference (non-NIfTI input) the affine is stored as both scanner-coded qform and sform.

    Raises:
        CimlError: the array's spatial shape differs from the reference's.
    """
    if reference is None:
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    else:
        if tuple(array.shape[:3]) != tuple(reference.shape[:3]):
            raise CimlError(
                f"{reference.get_filename()}: prediction shape {array.shape[:3]} differs from the input's "
                f"{reference.shape[:3]}"
            )
        header = reference.header.copy()
        image = nib.Nifti1Image(array, reference.affine, header=header)
        image.set_qform(*reference.header.get_qform(coded=True))
        image.set_sform(*reference.header.get_sform(coded=True))
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def save_nifti_atomic(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Serialise ``image`` and write it to ``path`` through a temporary file and a rename.

    The temporary name ends in ``.tmp``, not ``.nii.gz``: a file left by a killed run is never read as
    a prediction by ``ciml evaluate`` or a re-run.
    """
    data = image.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)  # nibabel's own default level for .nii.gz
    with atomic_path(path, suffix="") as temporary, open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    return Path(path)


def write_label_map(
    labels: np.ndarray, path: str | Path, affine: np.ndarray, reference: nib.Nifti1Image | None
) -> Path:
    """A label map (dataset label values) as uint8 (uint16 above 255) NIfTI on the reference's grid."""
    dtype = np.uint8 if labels.size == 0 or int(labels.max()) < 256 else np.uint16
    return save_nifti_atomic(to_nifti(np.asarray(labels, dtype=dtype), affine, reference), path)


def write_probabilities(
    probabilities: np.ndarray, path: str | Path, affine: np.ndarray, reference: nib.Nifti1Image | None
) -> Path:
    """Region probabilities ``[R, X, Y, Z]`` as a float32 ``[X, Y, Z, R]`` NIfTI on the reference's grid."""
    channels_last = np.ascontiguousarray(np.moveaxis(np.asarray(probabilities, np.float32), 0, -1))
    return save_nifti_atomic(to_nifti(channels_last, affine, reference), path)
