"""Untrusted checkpoints and hostile case ids: clear one-line refusals, nothing written outside --output."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ciml.cli import main
from ciml.data.layouts import read_csv_list
from ciml.tasks import load_task


class Payload:
    """An object a checkpoint must never be allowed to unpickle (it could run code)."""

    def __reduce__(self):
        return (print, ("pwned",))


def _copy_run(run_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_folder, tmp_path / "run"))


def _predict(run: Path, listing: Path, output: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["predict", "--run", str(run), "--input", str(listing), "--output", str(output),
                 "--device", "cpu", "--layout", "csv"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ciml ")]
    return code, "\n".join(err)


def test_predict_refuses_a_checkpoint_that_unpickles_objects(tmp_path, capsys, run_folder, dataset):
    run = _copy_run(run_folder, tmp_path)
    checkpoint = run / "fold_0" / "checkpoint_last.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "extra": Payload()}, checkpoint)
    code, err = _predict(run, dataset, tmp_path / "out", capsys)
    assert code == 1 and str(checkpoint) in err and "refused" in err and "pwned" not in err, err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_checkpoint_of_another_architecture(tmp_path, capsys, tools, run_folder, dataset):
    other = tools.make_run(tmp_path / "wide", read_csv_list(dataset, load_task("brats2020")), widths=(8, 16))
    run = _copy_run(run_folder, tmp_path)
    shutil.copy(other.checkpoint(0), run / "fold_0" / "checkpoint_last.pt")
    code, err = _predict(run, dataset, tmp_path / "out", capsys)
    assert code == 1 and "does not match" in err and "widths" in err and "Traceback" not in err, err


def test_predict_refuses_weights_that_do_not_fit_their_config(tmp_path, capsys, run_folder, dataset):
    run = _copy_run(run_folder, tmp_path)
    checkpoint = run / "fold_0" / "checkpoint_last.pt"
    state = torch.load(checkpoint, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 1)
    torch.save(state, checkpoint)
    code, err = _predict(run, dataset, tmp_path / "out", capsys)
    assert code == 1 and str(checkpoint) in err and "do not fit" in err, err


def test_hostile_case_ids_never_write_outside_the_output(tmp_path, capsys, tools, run_folder):
    case = tools.write_case(tmp_path / "data" / "x", "x")
    for bad in ("../../evil", "a/b", ".."):
        listing = tools.write_csv(tmp_path / "cases.csv", {bad: case})
        output = tmp_path / "deep" / "out"
        code, err = _predict(run_folder, listing, output, capsys)
        assert code == 1 and repr(bad) in err and "cannot name an output file" in err, err
        assert not output.exists()
    assert sorted(p.name for p in tmp_path.rglob("*.nii.gz") if "data" not in p.parts) == []


def test_case_ids_with_spaces_and_unicode_work(tmp_path, capsys, tools, run_folder):
    ids = ["patient 1", "Müller_ß_東京"]
    rows = {cid: tools.write_case(tmp_path / "data" / f"c{n}", cid, seed=n) for n, cid in enumerate(ids)}
    listing = tools.write_csv(tmp_path / "cases.csv", rows)
    assert main(["check-data", "--task", "brats2020", "--data", str(listing), "--quiet"]) == 0
    code, err = _predict(run_folder, listing, tmp_path / "out", capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
