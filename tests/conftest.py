"""Shared test settings and helpers: one torch thread so the suite behaves on busy 2-core machines.

``CIML_TEST_THREADS=N`` runs the suite with N threads instead: results must not depend on the count
(the order of floating-point sums does), and that is how to check it.
"""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

THREADS = int(os.environ.get("CIML_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)  # tiny tensors gain nothing from more; avoids oversubscription
# `ciml` commands run in-process (tests call ciml.cli.main) set their threads from OMP_NUM_THREADS, and
# subprocesses inherit it: the same count everywhere unless a test says otherwise
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def same_torch_threads():
    """Back to the suite's count after every test: some (benchmark smoke tests) set their own.

    On a busy 2-core machine two spinning threads ran these tests ~30x slower.
    """
    yield
    torch.set_num_threads(THREADS)


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
