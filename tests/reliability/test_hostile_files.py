"""Hostile NIfTI files (mutated bytes and headers) give one-line errors naming the file, never a traceback.

Each example takes a small valid NIfTI, mutates it (truncated gzip, wrong dims, absurd pixdim, NaN/inf
scaling, wrong datatype, zero length, random header bytes) and puts it in place of one modality of a case;
then `ciml check-data`, the start of `ciml train` and `ciml predict` must each either succeed or fail with
exit 1 and a single `ciml <cmd>: error: ...` line that names the file, and leave no output behind.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciml.cli import main
from ciml.data.integrity import check_folder
from ciml.tasks import load_task

pytestmark = pytest.mark.slow

FIELDS = {
    "dim": st.lists(st.integers(-5, 2**15 - 1), min_size=8, max_size=8),
    "pixdim": st.lists(
        st.sampled_from([0.0, -1.0, 1e-6, 1.0, 2.5, 1e3, 1e6, 1e30, float("nan"), float("inf")]),
        min_size=8,
        max_size=8,
    ),
    "scl_slope": st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e38, -1.0]),
    "scl_inter": st.sampled_from([float("nan"), float("inf"), 1e38]),
    "datatype": st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1536, 2304, 9999, -1]),
    "vox_offset": st.sampled_from([0.0, 100.0, 352.0, 353.0, 1e9, float("nan")]),
}


def _valid() -> bytes:
    rng = np.random.default_rng(0)
    return nib.Nifti1Image(rng.normal(100, 5, (12, 12, 8)).astype(np.float32), np.eye(4)).to_bytes()


VALID = _valid()


def _set_field(raw: bytes, field: str, value) -> bytes:
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    try:
        header[field] = value
    except (ValueError, OverflowError, TypeError):  # a value numpy cannot even store: keep the file valid
        return raw
    return header.binaryblock + raw[348:]


@st.composite
def hostile_files(draw) -> tuple[str, bytes]:
    """(file name, bytes): a mutation of the valid image, as .nii or .nii.gz."""
    kind = draw(st.sampled_from(["field", "field", "bytes", "truncate", "empty", "gzip_damage"]))
    raw = VALID
    if kind == "field":
        field = draw(st.sampled_from(sorted(FIELDS)))
        raw = _set_field(raw, field, draw(FIELDS[field]))
    elif kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, 351))
            raw = raw[:position] + bytes([draw(st.integers(0, 255))]) + raw[position + 1 :]
    elif kind == "empty":
        return "img.nii.gz", b""
    compressed = draw(st.booleans()) or kind in ("truncate", "gzip_damage")
    data = gzip.compress(raw) if compressed else raw
    if kind == "truncate":
        data = data[: draw(st.integers(1, len(data) - 1))]
    if kind == "gzip_damage":
        position = draw(st.integers(10, len(data) - 9))
        data = data[:position] + bytes(b ^ 0xFF for b in data[position : position + 8]) + data[position + 8 :]
    return ("img.nii.gz" if compressed else "img.nii"), data


def _hostile_dataset(root: Path, name: str, data: bytes, tools) -> tuple[Path, Path]:
    """A one-case CSV dataset whose t1 is the hostile file; returns (csv, the hostile file)."""
    if root.exists():
        shutil.rmtree(root)
    files = tools.write_case(root / "case", "victim")
    bad = root / "case" / name
    files["t1"].unlink()
    bad.write_bytes(data)
    files["t1"] = bad
    return tools.write_csv(root / "cases.csv", {"victim": files}), bad


PROGRESS = re.compile(r"\d+%\|")  # tqdm's progress bar lines (on stderr as well)


def _assert_clean_outcome(code: int, err: str, bad: Path, command: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        return
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"ciml {command}: error: "), err
    assert str(bad) in lines[0], err


HYPOTHESIS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(hostile=hostile_files())
def test_check_data_reports_hostile_files_by_name(tmp_path, capsys, tools, hostile) -> None:
    name, data = hostile
    listing, bad = _hostile_dataset(tmp_path / "d", name, data, tools)
    capsys.readouterr()
    code = main(["check-data", "--task", "brats2020", "--data", str(listing), "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in err, out + err
    if code != 0:
        assert code == 1
        assert any(str(bad) in line and "error" in line.lower() for line in out.splitlines()), out


@HYPOTHESIS
@given(hostile=hostile_files())
def test_train_refuses_hostile_files_before_writing_anything(tmp_path, capsys, tools, hostile) -> None:
    name, data = hostile
    listing, bad = _hostile_dataset(tmp_path / "d", name, data, tools)
    if check_folder(listing, load_task("brats2020"), "csv", progress=False).ok:
        return  # a harmless mutation: training would start for real; start-up is what this test is about
    out = tmp_path / "run"
    if out.exists():
        shutil.rmtree(out)
    capsys.readouterr()
    code = main(
        ["train", "--task", "brats2020", "--data", str(listing), "--out", str(out), "--device", "cpu",
         "--iterations", "1", "--no-progress"]
    )  # fmt: skip
    _assert_clean_outcome(code, capsys.readouterr().err, bad, "train")
    assert code == 1 and not (out / "run.json").exists()


@HYPOTHESIS
@given(hostile=hostile_files())
def test_predict_fails_on_hostile_files_with_one_line_and_no_output(
    tmp_path, capsys, tools, run_folder, hostile
) -> None:
    name, data = hostile
    listing, bad = _hostile_dataset(tmp_path / "d", name, data, tools)
    output = tmp_path / "preds"
    if output.exists():
        shutil.rmtree(output)
    capsys.readouterr()
    code = main(
        ["predict", "--run", str(run_folder), "--input", str(listing), "--output", str(output),
         "--device", "cpu", "--layout", "csv"]
    )  # fmt: skip
    err = capsys.readouterr().err
    _assert_clean_outcome(code, err, bad, "predict")
    if code != 0:
        assert not output.exists() or list(output.iterdir()) == []


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("dim", [3, 30000, 30000, 30000, 1, 1, 1, 1], "voxels"),
        ("pixdim", [1, float("nan"), 1, 1, 1, 1, 1, 1], "voxel size"),
        ("dim", [3, -3, 12, 8, 1, 1, 1, 1], "dimensions"),
        ("datatype", 9999, "data code 9999"),
    ],
)
def test_corrupt_headers_are_named_before_any_allocation(
    tmp_path, capsys, tools, run_folder, field, value, expected
):
    listing, bad = _hostile_dataset(
        tmp_path / "d", "img.nii.gz", gzip.compress(_set_field(VALID, field, value)), tools
    )
    output = tmp_path / "p"
    code = main(["predict", "--run", str(run_folder), "--input", str(listing), "--output", str(output),
                 "--device", "cpu", "--layout", "csv"])  # fmt: skip
    err = capsys.readouterr().err
    _assert_clean_outcome(code, err, bad, "predict")
    assert code == 1 and expected in err, err
    assert not output.exists() or list(output.iterdir()) == []


def test_rgb_voxels_are_refused_by_name(tmp_path) -> None:
    """Found by the fuzzer: a header mutated to an RGBA datatype crashed the statistics with a numpy error."""
    from ciml.data.io import ImageReadError, load_image

    path = tmp_path / "rgb.nii.gz"
    rgba = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    nib.save(nib.Nifti1Image(rgba, np.eye(4)), path)
    with pytest.raises(ImageReadError, match=r"rgb\.nii\.gz.*not a scalar number"):
        load_image(path)


def test_an_affine_without_a_direction_for_an_axis_is_refused_by_name(tmp_path) -> None:
    """Found by the fuzzer: axis codes ('R', 'S', None) crashed check-data's orientation line."""
    from ciml.data.io import ImageReadError, read_header

    affine = np.eye(4)
    affine[2, 1] = 2.2518e15  # the fuzzer's sform: invertible, but axis 2 is lost next to a huge shear
    path = tmp_path / "skew.nii.gz"
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine)
    image.header.set_zooms((1.0, 1.0, 1.0))  # as in the fuzzer's file: sane voxel sizes, broken sform
    nib.save(image, path)
    with pytest.raises(ImageReadError, match=r"skew\.nii\.gz: corrupt header"):
        read_header(path)
