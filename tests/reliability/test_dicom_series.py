"""A folder holding two DICOM series is refused with the same error by every command that reads it.

Reading one of the two would be a guess (and predict used to make it silently, while check-data refused
the folder); all of them read through ciml.data.io, which names the folder and the series it found.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ciml.cli import main
from ciml.data.io import ImageReadError, read_header
from ciml.data.layouts import read_csv_list
from ciml.data.preprocessing import PreprocessingError, plan_preprocessing, preprocess_case
from ciml.evaluation.evaluate import EvaluationError, load_case_pair
from ciml.tasks import load_task

SERIES_UIDS = ("1.2.826.0.1.3680043.2.1125.4242.2.1", "1.2.826.0.1.3680043.2.1125.4242.2.2")


@pytest.fixture
def two_series(tmp_path: Path, dicom_series) -> Path:
    """A folder with a 4-slice and a 3-slice series."""
    folder = tmp_path / "dicom"
    dicom_series(folder, np.full((4, 16, 16), 100, np.int16), series=1)
    dicom_series(folder, np.full((3, 16, 16), 200, np.int16), series=2)
    return folder


@pytest.fixture
def reason(two_series: Path) -> str:
    """The reader's refusal, which every command must repeat."""
    with pytest.raises(ImageReadError) as caught:
        read_header(two_series)
    assert caught.value.path == two_series
    return caught.value.reason


@pytest.fixture
def listing(tmp_path: Path, tools, two_series: Path) -> Path:
    """A one-case CSV dataset whose t1 is the two-series folder."""
    files = tools.write_case(tmp_path / "case", "dicom_case")
    files["t1"] = two_series
    return tools.write_csv(tmp_path / "cases.csv", {"dicom_case": files})


def test_the_reader_names_the_folder_and_each_series(two_series: Path, reason: str) -> None:
    assert "folder holds 2 DICOM series" in reason
    assert f"{SERIES_UIDS[0]} (4 files)" in reason and f"{SERIES_UIDS[1]} (3 files)" in reason
    assert "one series per folder" in reason


def test_check_data_refuses_it(listing: Path, two_series: Path, reason: str, capsys) -> None:
    code = main(["check-data", "--task", "brats2020", "--data", str(listing), "--layout", "csv", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert any(str(two_series) in line and reason in line for line in out.splitlines()), out


def test_preprocessing_refuses_it(listing: Path, two_series: Path, reason: str) -> None:
    spec = load_task("brats2020")
    case = read_csv_list(listing, spec)[0]
    plan = plan_preprocessing([case], spec)  # reads the flair header only
    with pytest.raises(PreprocessingError) as caught:
        preprocess_case(case, spec, plan)
    assert str(caught.value) == f"{two_series}: {reason}"


def test_predict_refuses_it(tmp_path: Path, listing: Path, two_series: Path, reason: str, run_folder, capsys):
    output = tmp_path / "preds"
    code = main(
        ["predict", "--run", str(run_folder), "--input", str(listing), "--output", str(output),
         "--device", "cpu", "--layout", "csv"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"{two_series}: {reason}" in err, err
    assert not output.exists() or not any(output.glob("*.nii.gz"))


def test_evaluate_refuses_it(tmp_path: Path, two_series: Path, reason: str) -> None:
    prediction = tmp_path / "dicom_case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4)), prediction)
    with pytest.raises(EvaluationError) as caught:
        load_case_pair(prediction, two_series, load_task("brats2020"))
    assert str(caught.value) == f"{two_series}: {reason}"
