"""Tiny datasets and runs for the reliability tests: a CSV-listed BraTS-like dataset and an untrained run."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from ciml.data.cases import Case
from ciml.data.layouts import read_csv_list
from ciml.data.preprocessing import plan_preprocessing
from ciml.models import build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import load_task

TASK = "brats2020"
SHAPE = (16, 16, 12)
PATCH = (16, 16, 16)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE) -> bytes:
    """An uncompressed NIfTI-1 file's bytes (header, extension flag, voxels)."""
    return nib.Nifti1Image(array, affine).to_bytes()


def write_case(folder: Path, case_id: str, seed: int = 0) -> dict[str, Path]:
    """Four modalities and a label for one case; file names need not contain the case id."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    label = np.zeros(SHAPE, np.uint8)
    label[5:10, 5:10, 4:8] = 2
    label[6:9, 6:9, 5:7] = 1
    files = {}
    for i, modality in enumerate(load_task(TASK).modality_names):
        image = 100 + 10 * i + 30 * (label > 0) + rng.normal(0, 3, SHAPE)
        files[modality] = folder / f"{modality}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), files[modality])
    files["label"] = folder / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), files["label"])
    return files


def write_csv(path: Path, rows: dict[str, dict[str, Path]], labels: bool = True) -> Path:
    """A CSV case list: case_id, one column per modality, label."""
    modalities = list(load_task(TASK).modality_names)
    columns = ["case_id", *modalities] + (["label"] if labels else [])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for case_id, files in rows.items():
            writer.writerow([case_id, *(str(files[c]) for c in columns[1:])])
    return path


def write_dataset(root: Path, case_ids: list[str]) -> Path:
    """Cases in ``root/data/case_<n>/`` listed by ``root/cases.csv`` under the given ids."""
    rows = {cid: write_case(root / "data" / f"case_{n}", cid, seed=n) for n, cid in enumerate(case_ids)}
    return write_csv(root / "cases.csv", rows)


def make_run(folder: Path, cases: list[Case], widths: tuple[int, ...] = (4, 8)) -> RunFolder:
    """A run folder as training leaves it (run.json, fold_0/checkpoint_last.pt), with untrained weights."""
    spec = load_task(TASK)
    torch.manual_seed(0)
    model = build_model("ciml", spec, widths=widths, spatial_dims=3).eval()
    run = RunFolder(folder)
    save_checkpoint({"model": model.state_dict(), "config": model.config}, run.checkpoint(0, "last"))
    run.write_info(
        {
            "task": spec.to_dict(),
            "model": model.config,
            "preprocessing": plan_preprocessing(cases, spec).to_dict(),
            "patch_size": list(PATCH),
            "data": {"path": str(folder), "layout": "csv"},
            "train": {},
        }
    )
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three valid cases listed in a CSV."""
    return write_dataset(tmp_path_factory.mktemp("data"), ["c0", "c1", "c2"])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, dataset) -> Path:
    cases = read_csv_list(dataset, load_task(TASK))
    return make_run(tmp_path_factory.mktemp("run") / "run", cases).path


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """The helpers above for test modules (``--import-mode=importlib`` cannot import conftest by name)."""
    return SimpleNamespace(
        nifti_bytes=nifti_bytes,
        write_case=write_case,
        write_csv=write_csv,
        write_dataset=write_dataset,
        make_run=make_run,
    )
