"""Training loop: poly LR, loss decreases, checkpoints restore model and optimizer exactly."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from ciml.errors import CimlError
from ciml.experiments.shapecomposition import ShapeExperimentConfig, training_stream
from ciml.models import build_model
from ciml.runs import load_checkpoint, save_checkpoint
from ciml.tasks import load_task
from ciml.training import TrainConfig, Trainer, poly_lr

SPEC = load_task("shapecomposition")
DATA = ShapeExperimentConfig(size=(32, 32), batch_size=4)


def _trainer(iterations: int = 6, optimizer: str = "adamw", model: str = "ciml") -> Trainer:
    torch.manual_seed(0)
    net = build_model(model, SPEC, widths=(4, 8), spatial_dims=2)
    config = TrainConfig(iterations=iterations, optimizer=optimizer, region_names=list(SPEC.region_names))
    return Trainer(net, config, training_stream(SPEC, DATA))


def test_poly_schedule() -> None:
    assert poly_lr(0, 100) == 1.0
    assert poly_lr(100, 100) == 0.0
    assert poly_lr(50, 100) == pytest.approx(0.5**0.9)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_loss_goes_down_and_every_term_is_logged(optimizer: str) -> None:
    trainer = _trainer(iterations=30, optimizer=optimizer)
    history = trainer.fit(progress=False)
    assert len(history) == 30
    assert {"loss", "seg", "kl", "lr", "seg/m0", "seg/m1", "kl/0/m0<-m1", "kl/1/m1<-m0"} <= set(history[0])
    first, last = sum(h["seg"] for h in history[:5]), sum(h["seg"] for h in history[-5:])
    assert last < first
    assert history[-1]["lr"] == pytest.approx(0.0)


def test_beta0_model_ignores_the_configured_beta() -> None:
    trainer = _trainer(model="ciml-beta0")
    assert trainer.loss.beta == 0.0
    assert _trainer().loss.beta == TrainConfig().beta


def test_checkpoint_restores_training_exactly(tmp_path) -> None:
    straight = _trainer()
    straight.fit(progress=False)

    first = _trainer()
    first.fit(until=3, progress=False, checkpoint=tmp_path / "last.pt")
    resumed = _trainer()
    torch.manual_seed(1234)  # a different global RNG state must not matter after resume
    resumed.resume(tmp_path / "last.pt")
    assert resumed.iteration == 3
    resumed.fit(progress=False)

    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for (name, p), q in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=name)


def test_checkpoints_refuse_pickled_objects_and_garbage(tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": pickle.loads(pickle.dumps(ValueError("x")))}, evil)
    with pytest.raises(CimlError, match="evil.pt: refused"):
        load_checkpoint(evil)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CimlError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(CimlError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_is_atomic_and_keeps_the_previous_file_on_failure(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"name": "x"}}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint({"model": {}, "config": {}, "bad": Unsaveable()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


COMPILED_VERSUS_EAGER = """
import json, torch
from ciml.models import build_model
from ciml.tasks import load_task
from ciml.training import Batch, TrainConfig, Trainer
torch.set_num_threads(1)
spec = load_task("shapecomposition")  # two segmentors, one gate each way per level: a small graph to compile
torch.manual_seed(1)
channels, outputs = len(spec.modality_names), len(spec.region_names)
batch = Batch(torch.randn(2, channels, 16, 16), (torch.rand(2, outputs, 16, 16) > 0.5).float())
losses = []
for compile_network in (False, True):
    torch.manual_seed(0)
    # one level: the gates, grouped convolutions and losses compile as in a deep network, in half the time
    model = build_model("ciml", spec, widths=(4,), spatial_dims=2)
    regions = list(spec.region_names)
    config = TrainConfig(iterations=3, region_names=regions, device="cpu", compile=compile_network)
    trainer = Trainer(model, config, lambda _: batch)
    losses.append([trainer.step(batch)["loss"] for _ in range(3)])
print(json.dumps(losses))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_takes_the_same_steps_as_eager() -> None:
    """--compile changes how the grouped CIML network runs, not what it computes (about a minute on 2 cores
    with a cold compile cache).

    In a fresh interpreter in UTF-8 mode: torch's compiler reads its kernel templates in the locale's
    encoding, which fails under an ASCII locale (CI may have no LANG).
    """
    proc = subprocess.run(
        [sys.executable, "-X", "utf8", "-c", COMPILED_VERSUS_EAGER],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert eager[2] < eager[0]  # it trains


def test_deep_supervision_trains_the_heads_with_the_same_logged_terms() -> None:
    torch.manual_seed(0)
    net = build_model("ciml", SPEC, widths=(4, 4, 8, 8), spatial_dims=2, deep_supervision=True)
    config = TrainConfig(iterations=3, region_names=list(SPEC.region_names))
    trainer = Trainer(net, config, training_stream(SPEC, DATA))
    heads = {n: p.detach().clone() for n, p in net.named_parameters() if ".deep_heads." in n}
    assert heads
    history = trainer.fit(progress=False)
    assert {"loss", "seg", "kl", "seg/m0", "seg/m1"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(not torch.equal(p, heads[n]) for n, p in net.named_parameters() if n in heads)


def test_deep_supervision_option_and_setting_default_off() -> None:
    from ciml.cli import build_parser
    from ciml.cli.train import settings_from_args
    from ciml.training.engine import TrainSettings

    assert TrainSettings(task=None, data="d", out="o").deep_supervision is False
    base = ["train", "--task", "brats2020", "--data", "d", "--out", "o"]
    assert settings_from_args(build_parser().parse_args(base)).deep_supervision is False
    on = settings_from_args(build_parser().parse_args([*base, "--deep-supervision"]))
    assert on.deep_supervision is True
