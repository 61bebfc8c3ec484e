"""Training in channels_last_3d: the CPU default for 3D networks, the same steps as contiguous."""

from __future__ import annotations

import pytest
import torch

from ciml.devices import resolve_memory_format
from ciml.errors import ParameterError
from ciml.models import build_model
from ciml.tasks import load_task
from ciml.training import TrainConfig, Trainer
from ciml.training.loop import Batch

SPEC = load_task("brats2020")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LAST, PLAIN = torch.channels_last_3d, torch.contiguous_format


@pytest.mark.parametrize(
    ("name", "device", "dims", "expected"),
    [
        ("auto", CPU, 3, LAST),
        ("auto", CPU, 2, PLAIN),
        ("auto", CUDA, 3, PLAIN),
        ("contiguous", CPU, 3, PLAIN),
        ("channels_last", CPU, 3, LAST),
        ("channels_last", CUDA, 3, LAST),
    ],
)
def test_memory_format_rule(name: str, device: torch.device, dims: int, expected) -> None:
    assert resolve_memory_format(name, device, dims) == expected


@pytest.mark.parametrize(("name", "dims", "message"), [("nhwc", 3, "auto, contiguous, channels_last"),
                                                       ("channels_last", 2, "3D networks")])  # fmt: skip
def test_memory_format_refusals_name_the_choice(name: str, dims: int, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        resolve_memory_format(name, CPU, dims)


def _batches(iterations: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [
        Batch(
            torch.randn(2, 4, 16, 16, 16, generator=generator),
            (torch.rand(2, 3, 16, 16, 16, generator=generator) > 0.7).float(),
        )
        for _ in range(iterations)
    ]


BATCHES = _batches(3)


def _trainer(model: str, memory_format: str, optimizer: str = "sgd") -> Trainer:
    torch.manual_seed(0)
    network = build_model(model, SPEC, widths=(4, 8), spatial_dims=3)
    config = TrainConfig(
        iterations=len(BATCHES),
        optimizer=optimizer,
        lr=1e-2,
        region_names=list(SPEC.region_names),
        device="cpu",
        memory_format=memory_format,
    )
    return Trainer(network, config, BATCHES.__getitem__)


def _parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("model", ["ciml", "ciml-nomsg", "ensemble", "joint", "segresnet"])
def test_channels_last_takes_the_steps_contiguous_takes(model: str) -> None:
    plain = _trainer(model, "contiguous")  # each trainer seeds the global RNG its bottlenecks sample from
    plain_history = plain.fit(progress=False)
    last = _trainer(model, "channels_last")
    for a, b in zip(plain_history, last.fit(progress=False), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    expected = _parameters(plain)
    for name, value in _parameters(last).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_trains_3d_networks_in_channels_last_on_a_cpu() -> None:
    trainer = _trainer("ciml", "auto")
    convolutions = [p for p in trainer.model.parameters() if p.dim() == 5]
    assert convolutions and all(p.is_contiguous(memory_format=LAST) for p in convolutions)
    assert not any(p.is_contiguous() for p in convolutions if p.shape[1] > 1 and p[0, 0].numel() > 1)


LAYOUT_PAIRS = [("contiguous", "channels_last"), ("channels_last", "contiguous")]


@pytest.mark.parametrize(("before", "after"), LAYOUT_PAIRS)
def test_a_checkpoint_resumes_in_the_other_layout(tmp_path, before: str, after: str) -> None:
    """Fused optimizers read their state in memory order: a momentum laid out unlike its parameter would
    update the wrong elements, silently. (SGD: its steps are linear in the gradients, so float rounding
    stays far below the tolerance; AdamW's sign-like steps on gradients that are rounding noise, such as
    a conv bias before an InstanceNorm's, do not.)"""
    straight = _trainer("ciml", after)
    straight.fit(progress=False)
    first = _trainer("ciml", before)
    first.fit(until=2, progress=False, checkpoint=tmp_path / "last.pt")
    resumed = _trainer("ciml", after)
    resumed.resume(tmp_path / "last.pt")
    resumed.fit(progress=False)
    expected = _parameters(straight)
    for name, value in _parameters(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(("before", "after"), LAYOUT_PAIRS)
def test_resumed_optimizer_state_is_laid_out_like_its_parameters(
    tmp_path, optimizer: str, before: str, after: str
) -> None:
    first = _trainer("ciml", before, optimizer)
    first.fit(until=2, progress=False, checkpoint=tmp_path / "last.pt")
    resumed = _trainer("ciml", after, optimizer)
    resumed.resume(tmp_path / "last.pt")
    saved = list(first.optimizer.state.values())
    for (parameter, state), kept in zip(resumed.optimizer.state.items(), saved, strict=True):
        for key, value in state.items():
            if value.shape == parameter.shape and parameter.dim() == 5:
                assert value.stride() == parameter.stride(), key
                torch.testing.assert_close(value, kept[key], rtol=0, atol=0)


@pytest.mark.parametrize("command", ["train", "predict", "robustness"])
def test_the_commands_take_a_memory_format_and_refuse_unknown_ones(command: str, capsys) -> None:
    from ciml.cli import build_parser
    from ciml.cli.predict import settings_from_args as inference_from_args
    from ciml.cli.train import settings_from_args as training_from_args

    required = {
        "train": ["--task", "brats2020", "--data", "d", "--out", "o"],
        "predict": ["--run", "r", "--input", "i", "--output", "o"],
        "robustness": ["--run", "r", "--data", "d", "--out", "o"],
    }[command]
    parser = build_parser()
    read = training_from_args if command == "train" else inference_from_args
    assert read(parser.parse_args([command, *required])).memory_format == "auto"
    chosen = parser.parse_args([command, *required, "--memory-format", "contiguous"])
    assert read(chosen).memory_format == "contiguous"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--memory-format", "nhwc"])
    assert "'auto', 'contiguous', 'channels_last'" in capsys.readouterr().err
