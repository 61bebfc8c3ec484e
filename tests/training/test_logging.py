"""Run logs: JSONL lines, and TensorBoard scalars when TensorBoard is installed (it is optional)."""

from __future__ import annotations

import sys

import pytest

from ciml.runs.log import RunLogger, read_log

RECORDS = [
    {"iteration": 1, "loss": 0.9, "seg/flair": 0.5, "kl/0/flair<-t1": 0.01, "lr": 1e-3},
    {"iteration": 2, "loss": 0.7, "seg/flair": 0.4, "kl/0/flair<-t1": 0.02, "lr": 9e-4},
]


def _log(folder, tensorboard: bool) -> RunLogger:
    logger = RunLogger(folder, tensorboard=tensorboard)
    for record in RECORDS:
        logger.on_step(None, record)
    logger.close()
    return logger


def test_tensorboard_gets_every_scalar_of_the_jsonl_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = _log(tmp_path, tensorboard=True)
    assert read_log(logger.path) == RECORDS
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "seg/flair", "kl/0/flair<-t1", "lr"}
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([0.9, 0.7])


def test_without_tensorboard_installed_the_jsonl_log_still_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    logger = _log(tmp_path, tensorboard=True)
    assert logger.writer is None and not (tmp_path / "tensorboard").exists()
    assert "TensorBoard is not installed" in capsys.readouterr().out
    assert read_log(logger.path) == RECORDS
