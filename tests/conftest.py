"""Shared test settings (one torch thread so the suite behaves on busy 2-core machines) and helpers."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

torch.set_num_threads(1)  # tiny tensors gain nothing from more; avoids oversubscription


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one thread after every test: some (benchmark smoke tests) set their own count.

    On a busy 2-core machine two spinning threads ran these tests ~30x slower.
    """
    yield
    torch.set_num_threads(1)


DICOM_UID = "1.2.826.0.1.3680043.2.1125.4242"


def write_dicom_series(folder: Path, zyx: np.ndarray, series: int = 1) -> sitk.Image:
    """One DICOM file per slice of ``zyx`` in ``folder``, with the tags GDCM needs to group and order them.

    Each ``series`` number gets its own SeriesInstanceUID (``DICOM_UID.2.<series>``) and file names, so
    two calls with different numbers put two series in one folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(zyx)
    volume.SetSpacing((0.5, 0.7, 2.0))
    volume.SetOrigin((10.0, -20.0, 30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(zyx.shape[0]):
        slice_ = volume[:, :, k]
        position = "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT",
            "0020|000d": DICOM_UID + ".1",
            "0020|000e": f"{DICOM_UID}.2.{series}",
            "0020|0032": position,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"series{series}_slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return volume


@pytest.fixture(scope="session")
def dicom_series() -> Callable[..., sitk.Image]:
    """:func:`write_dicom_series` for test modules (``--import-mode=importlib`` cannot import conftest)."""
    return write_dicom_series
