"""`ciml train` end to end on a tiny BraTS-layout dataset: run folder, logs, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import ciml.training.engine as engine
from ciml.cli import main
from ciml.data.augmentation import DEFAULT_AUGMENTATIONS
from ciml.errors import CimlError
from ciml.inferers import Postprocessing
from ciml.locks import folder_lock
from ciml.runs import load_checkpoint, save_checkpoint
from ciml.runs.log import read_log
from ciml.training.engine import make_splits

MODALITIES = ("flair", "t1", "t1ce", "t2")
TINY = ["--patch", "16", "16", "16", "--widths", "4", "8", "--batch-size", "2", "--no-progress"]


def write_tiny_brats(folder: Path, cases: int = 4, seed: int = 0) -> Path:
    """BraTS2020 layout, 24x24x16 volumes with one nested tumour each (labels 2 > 1 > 4 inwards)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (24, 24, 16)], indexing="ij"), axis=-1)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index in range(1, cases + 1):
        name = f"BraTS20_Training_{index:03d}"
        (folder / name).mkdir(parents=True)
        center = rng.uniform([8, 8, 6], [16, 16, 10])
        distance = np.linalg.norm(grid - center, axis=-1)
        label = np.where(distance < 6, 2, 0)
        label[distance < 4] = 1
        label[(distance >= 3) & (distance < 4)] = 4
        brain = np.ones(label.shape)
        for i, modality in enumerate(MODALITIES):
            image = brain * 100 + (label > 0) * (20 + 10 * i) + rng.normal(0, 5, label.shape)
            nib.save(
                nib.Nifti1Image(image.astype(np.float32), affine), folder / name / f"{name}_{modality}.nii.gz"
            )
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / name / f"{name}_seg.nii.gz")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_brats(tmp_path_factory.mktemp("brats"))


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--task",
        "brats2020",
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        *TINY,
        *extra,
    ]


def test_training_writes_the_run_folder_logs_and_plot(dataset, tmp_path) -> None:
    out = tmp_path / "run"
    assert (
        main(
            _train(
                dataset, out, "--iterations", "4", "--validate-every", "2", "--modality-dropout", "0.5",
                "--augment-p", "rotation=0.5",
            )
        )
        == 0
    )  # fmt: skip
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert {"task", "model", "preprocessing", "patch_size", "augmentation", "data", "train"} <= set(info)
    assert list(info["augmentation"]) == list(DEFAULT_AUGMENTATIONS)
    assert info["augmentation"]["rotation"] == {"p": 0.5, "degrees": 30.0}
    assert info["train"]["augment_probability"] == [["rotation", 0.5]] and info["train"]["workers"] >= 0
    splits = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))
    assert len(splits) == 4 and all(not set(s["train"]) & set(s["val"]) for s in splits)
    fold = out / "fold_0"
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "log.jsonl", "progress.png"} <= {
        p.name for p in fold.iterdir()
    }
    log = read_log(fold / "log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    keys = set(steps[0])
    assert {"seg", "kl", "lr", "seg/flair", "seg/t1", "seg/t1ce", "seg/t2"} <= keys | set(steps[1])
    assert any(k.startswith("kl/0/flair<-") for k in keys)
    assert {"val/dice/WT", "val/dice/TC", "val/dice/ET", "val/dice/mean"} <= set(steps[1])
    assert log[-1]["event"] == "end"
    state = load_checkpoint(fold / "checkpoint_last.pt")
    assert state["iteration"] == 4 and state["config"] == info["model"]
    # the tile: the training patch (scored by the final validation itself) against twice it, capped at
    # the 24x24x16 case; postprocessing is then chosen on the chosen tile's masks
    tile = json.loads((fold / "tile.json").read_text(encoding="utf-8"))
    compared = {tuple(c["tile"]): c for c in tile["comparison"]}
    assert list(compared) == [(16, 16, 16), (24, 24, 16)] and tile["training_patch"] == [16, 16, 16]
    for region in ("WT", "TC", "ET"):
        assert compared[16, 16, 16]["dice"][region] == pytest.approx(steps[-1][f"val/dice/{region}"])
    means = {t: c["mean"] for t, c in compared.items()}
    wins = means[24, 24, 16] > means[16, 16, 16] + tile["margin"]
    assert tuple(tile["tile"]) == ((24, 24, 16) if wins else (16, 16, 16))
    chosen = json.loads((fold / "postprocessing.json").read_text(encoding="utf-8"))
    assert chosen["validation_cases"] == 1 and chosen["iteration"] == 4 and chosen["checkpoint"] == "last"
    assert chosen["dice_without"] == pytest.approx(compared[tuple(tile["tile"])]["dice"])
    assert len(chosen["trials"]) == 3 * 6  # per region: largest component, then 5 volumes
    assert Postprocessing.from_dict(chosen["rule"]).spacing == tuple(info["preprocessing"]["target_spacing"])


def test_unknown_augmentations_are_refused_with_the_valid_names(dataset, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_train(dataset, tmp_path / "run", "--augment", "default,rotate"))
    assert exit_.value.code == 2
    assert (
        "--augment: unknown augmentation 'rotate'; valid: default, none, rotation, "
        in capsys.readouterr().err
    )
    assert main(_train(dataset, tmp_path / "run", "--augment", "mirror", "--augment-p", "gamma=0.3")) == 1
    err = capsys.readouterr().err
    assert "--augment-p: 'gamma' is not selected; selected: mirror (add it to augment" in err
    assert not (tmp_path / "run" / "fold_0").exists()


def test_refuses_to_overwrite_a_fold_and_resume_needs_a_checkpoint(dataset, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--iterations", "1")) == 0
    assert main(_train(dataset, out, "--iterations", "1")) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(_train(dataset, out, "--iterations", "1", "--fold", "1", "--resume")) == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_postprocessing_without_validation_cases_and_after_resuming_a_finished_fold(
    dataset, tmp_path
) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--iterations", "1", "--max-validation-cases", "0")) == 0
    record = json.loads((out / "fold_0" / "postprocessing.json").read_text(encoding="utf-8"))
    assert record["note"] == "no validation cases: nothing applied" and record["rule"]["regions"] == {}
    tile = json.loads((out / "fold_0" / "tile.json").read_text(encoding="utf-8"))
    assert tile["tile"] == [16, 16, 16] and tile["validation_cases"] == 0 and tile["comparison"] == []

    path = out / "fold_1" / "postprocessing.json"
    assert main(_train(dataset, out, "--iterations", "1", "--fold", "1")) == 0
    written = path.read_text(encoding="utf-8")
    assert main(_train(dataset, out, "--iterations", "1", "--fold", "1", "--resume")) == 0
    assert path.read_text(encoding="utf-8") == written  # nothing trained, nothing chosen again
    path.unlink()  # a fold finished before postprocessing was chosen: validated once more
    assert main(_train(dataset, out, "--iterations", "1", "--fold", "1", "--resume")) == 0
    assert json.loads(path.read_text(encoding="utf-8"))["dice_without"] == json.loads(written)["dice_without"]


def test_without_tile_choice_prediction_keeps_the_training_patch_and_a_resume_adds_the_choice(
    dataset, tmp_path
) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--iterations", "2", "--no-tile-choice")) == 0
    fold = out / "fold_0"
    assert not (fold / "tile.json").exists()
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["train"]["choose_tile"] is False
    last = [r for r in read_log(fold / "log.jsonl") if "val/dice/mean" in r][-1]
    chosen = json.loads((fold / "postprocessing.json").read_text(encoding="utf-8"))
    assert chosen["dice_without"] == pytest.approx({r: last[f"val/dice/{r}"] for r in ("WT", "TC", "ET")})
    # a finished fold without a tile choice, resumed with it on: validated once more, the choice written
    assert main(_train(dataset, out, "--iterations", "2", "--resume")) == 0
    tile = json.loads((fold / "tile.json").read_text(encoding="utf-8"))
    assert tile["iteration"] == 2 and [c["tile"] for c in tile["comparison"]][0] == [16, 16, 16]


def test_each_candidate_tile_is_validated_once_at_the_end(dataset, tmp_path, monkeypatch) -> None:
    tiles: list[tuple[int, ...]] = []
    original = engine.validation_dice

    def counted(model, cases, spec, patch_size, device, keep=None):
        tiles.append(tuple(patch_size))
        return original(model, cases, spec, patch_size, device, keep)

    monkeypatch.setattr(engine, "validation_dice", counted)
    assert main(_train(dataset, tmp_path / "run", "--iterations", "2", "--validate-every", "2")) == 0
    assert tiles == [(16, 16, 16), (24, 24, 16)]  # the final validation, then the one other candidate


def test_a_fold_being_trained_is_locked(dataset, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--iterations", "2")) == 0
    with folder_lock(out / "fold_0"):
        assert main(_train(dataset, out, "--iterations", "3", "--resume")) == 1
    assert "another ciml process" in capsys.readouterr().err
    assert load_checkpoint(out / "fold_0" / "checkpoint_last.pt")["iteration"] == 2


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(dataset, tmp_path) -> None:
    args = ["--iterations", "6", "--validate-every", "3", "--max-validation-cases", "1"]
    straight = tmp_path / "straight"
    assert main(_train(dataset, straight, *args)) == 0

    killed = tmp_path / "killed"
    script = (  # `ciml train` with a step callback that SIGKILLs the process after iteration 4
        "import os, signal, sys\n"
        "from ciml.cli import build_parser\n"
        "from ciml.cli.train import settings_from_args\n"
        "from ciml.training.engine import train\n"
        "def kill(trainer, record):\n"
        "    if trainer.iteration == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(settings_from_args(build_parser().parse_args(sys.argv[1:])), callbacks=[kill])\n"
    )
    command = [sys.executable, "-c", script, *_train(dataset, killed, *args)]
    # the suite's OMP_NUM_THREADS (tests/conftest.py), as the in-process runs: the same steps need the same
    # thread count (reductions split over threads sum in another order; Adam turns the last-bit
    # differences of tiny gradients into different updates)
    env = dict(os.environ)
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert load_checkpoint(killed / "fold_0" / "checkpoint_last.pt")["iteration"] == 3
    assert main(_train(dataset, killed, *args, "--resume")) == 0

    a = [r for r in read_log(straight / "fold_0" / "log.jsonl") if "loss" in r]
    b = [r for r in read_log(killed / "fold_0" / "log.jsonl") if "loss" in r]
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    final_a = load_checkpoint(straight / "fold_0" / "checkpoint_last.pt")["model"]
    final_b = load_checkpoint(killed / "fold_0" / "checkpoint_last.pt")["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path) -> None:
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "config": {"name": "x"}}, path)
    script = (
        "import os, signal, torch\n"
        "from ciml.runs import save_checkpoint\n"
        "class Kill:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "state = {'model': {'w': torch.zeros(10**6)}, 'config': {}, 'x': Kill()}\n"
        f"save_checkpoint(state, {str(path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(3.0))


def test_a_dataset_failing_the_integrity_check_stops_training(dataset, tmp_path, capsys) -> None:
    broken = write_tiny_brats(tmp_path / "broken", cases=2)
    bad = broken / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    image = nib.load(bad)
    data = image.get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), bad)
    out = tmp_path / "run"
    assert main(_train(broken, out, "--iterations", "1")) == 1
    assert "BraTS20_Training_002_t1.nii.gz" in capsys.readouterr().err
    assert not out.exists()


def test_splits_are_patient_level() -> None:
    from ciml.data.cases import Case

    cases = [Case(f"p{p}_s{s}", {}, group=f"p{p}") for p in range(6) for s in range(2)]
    splits = make_splits(cases, folds=3, seed=0)
    for split in splits:
        val_patients = {c.split("_")[0] for c in split["val"]}
        assert not val_patients & {c.split("_")[0] for c in split["train"]}
    assert sorted(c for s in splits for c in s["val"]) == sorted(c.case_id for c in cases)
    with pytest.raises(CimlError, match="at least 2 patients"):
        make_splits(cases[:2], folds=5, seed=0)


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(dataset, tmp_path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "ciml.cli", *_train(dataset, out, "--iterations", "3", "--modality-dropout", "0.5",
                                  "--validate-every", "3", "--max-validation-cases", "1"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    end = read_log(out / "fold_0" / "log.jsonl")[-1]
    checksums = end["rank_parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert load_checkpoint(out / "fold_0" / "checkpoint_last.pt")["iteration"] == 3


def test_checkpoint_activations_trains_and_is_recorded(dataset, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--iterations", "2", "--checkpoint-activations")) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["train"]["checkpoint_activations"] is True


def test_deep_supervision_trains_and_is_recorded(dataset, tmp_path) -> None:
    out = tmp_path / "run"
    widths = ["--widths", "4", "4", "8", "8"]  # 4 levels: one auxiliary head, at half resolution
    assert main(_train(dataset, out, "--iterations", "2", "--deep-supervision", *widths)) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["train"]["deep_supervision"] is True
    assert info["model"]["deep_supervision"] is True and info["network"]["deep_supervision"] is True
    state = load_checkpoint(out / "fold_0" / "checkpoint_last.pt")
    assert any(".deep_heads." in k for k in state["model"])
