"""Killed predictions leave only complete files and resume; a folder lock stops two writers at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from ciml.locks import LOCK_NAME, FolderLockedError, folder_lock

pytestmark = pytest.mark.slow


def _command(run: Path, listing: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ciml.cli", "predict", "--run", str(run), "--input", str(listing),
            "--output", str(output), "--device", "cpu", "--layout", "csv", *extra]  # fmt: skip


def _predict(run: Path, listing: Path, output: Path, *extra: str, env: dict | None = None):
    command = _command(run, listing, output, *extra)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", env=environment, timeout=120
    )


#: Predicts like ``ciml predict`` but SIGKILLs itself at a prediction callback (argv: run, listing, output,
#: callback name).
_KILLED_PREDICTION = """
import os, signal, sys
from ciml.inference import InferenceSettings, PredictionCallbacks, predict_folder

def kill(_):
    os.kill(os.getpid(), signal.SIGKILL)

run, listing, output, hook = sys.argv[1:]
predict_folder(run, listing, output, layout="csv", settings=InferenceSettings(device="cpu"),
               save_probabilities=True, progress=False, callbacks=PredictionCallbacks(**{hook: kill}))
"""


def _killed_predict(run: Path, listing: Path, output: Path, hook: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _KILLED_PREDICTION, str(run), str(listing), str(output), hook]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", env=environment, timeout=120
    )


def _assert_only_complete_files(output: Path) -> dict[str, float]:
    """Every file is a loadable prediction (no temporary left); returns name -> mtime.

    A killed process leaves its (released) lock file; it blocks nothing and is not an output.
    """
    names = sorted(p.name for p in output.iterdir() if p.name != LOCK_NAME)
    assert all(n.endswith(".nii.gz") and not n.startswith(".") for n in names), names
    for name in names:
        nib.load(output / name).get_fdata()
    return {n: (output / n).stat().st_mtime_ns for n in names}


@pytest.mark.parametrize("hook, finished", [("after_case", {"c0.nii.gz"}), ("before_label", set())])
@pytest.mark.slow
def test_killed_prediction_leaves_complete_files_and_resumes(tmp_path, run_folder, dataset, hook, finished):
    output = tmp_path / "preds"
    killed = _killed_predict(run_folder, dataset, output, hook)
    assert killed.returncode == -9, killed.stderr
    before = _assert_only_complete_files(output)
    assert {n for n in before if not n.endswith("_probabilities.nii.gz")} == finished
    time.sleep(0.01)
    again = _predict(run_folder, dataset, output, "--save-probabilities")
    assert again.returncode == 0, again.stderr
    after = _assert_only_complete_files(output)
    assert set(after) == {f"c{i}{s}" for i in range(3) for s in (".nii.gz", "_probabilities.nii.gz")}
    assert all(after[n] == before[n] for n in before), "finished files were redone"
    assert f"skipped {len(finished)} finished" in again.stdout


@pytest.mark.slow
def test_overwrite_redoes_finished_cases(tmp_path, run_folder, dataset):
    output = tmp_path / "preds"
    assert _predict(run_folder, dataset, output).returncode == 0
    before = _assert_only_complete_files(output)
    time.sleep(0.01)
    assert _predict(run_folder, dataset, output, "--overwrite").returncode == 0
    after = _assert_only_complete_files(output)
    assert all(after[n] > before[n] for n in before)


@pytest.mark.slow
def test_kill_at_random_moments_never_leaves_partial_files(tmp_path, run_folder, dataset):
    output = tmp_path / "preds"
    command = _command(run_folder, dataset, output, "--save-probabilities")
    for delay in (1.5, 2.5, 3.5):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
        if output.exists():
            _assert_only_complete_files(output)
    assert _predict(run_folder, dataset, output, "--save-probabilities").returncode == 0
    assert len(_assert_only_complete_files(output)) == 6


@pytest.mark.slow
def test_second_writer_is_refused_with_the_holders_pid_and_writes_nothing(tmp_path, run_folder, dataset):
    output = tmp_path / "preds"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ciml.locks import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(output)],
        stdout=subprocess.PIPE, encoding="utf-8",
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _predict(run_folder, dataset, output)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 1
    assert f"another ciml process (pid {holder.pid}) is writing to {output}" in second.stderr
    assert [p.name for p in output.iterdir()] == [".ciml.lock"]  # the holder's, nothing predicted
    assert _predict(run_folder, dataset, output).returncode == 0  # the kernel released the dead holder's lock


def test_lock_is_exclusive_within_a_process_and_released_after(tmp_path):
    folder = tmp_path / "out"
    with (
        folder_lock(folder),
        pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"),
        folder_lock(folder),
    ):
        pass
    assert list((tmp_path / "out").iterdir()) == []
    with folder_lock(tmp_path / "out"):
        pass
