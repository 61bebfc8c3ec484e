"""Recomputing gate tensors and checkpointing segmentor activations change memory, not results.

The comparisons run in float64 with fixed inputs, so a tight tolerance holds on every CPU.
"""

from __future__ import annotations

import pytest
import torch

from ciml.errors import CimlError
from ciml.models import build_model, model_from_config
from ciml.models.gate import InformationGate, grouped_gates
from ciml.models.registry import FORMAT_VERSION, check_state_dict


def _loss_and_grads(name, x, **options):
    torch.manual_seed(0)
    model = build_model(name, "brats2020", widths=(4, 8, 8)).train().double()
    for gate in getattr(model, "gates", {}).values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
    for key, value in options.items():
        setattr(model, key, value)
    torch.manual_seed(1)  # the same noise eps for both runs
    out = model(x)
    loss = sum((logits.sigmoid() ** 2).mean() for logits in out.logits.values()) + out.kl
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(model.named_buffers())


def _input() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _without_recomputation(fn, *args, use_reentrant=False, preserve_rng_state=True):
    return fn(*args)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ciml", {"recompute_gates": True}),
        ("ciml", {"checkpoint_activations": True}),
        ("joint", {"checkpoint_activations": True}),
    ],
)
def test_losses_gradients_and_running_statistics_are_unchanged(name, options, monkeypatch):
    """The same computation run without recomputation (checkpoint replaced by a plain call) as baseline.

    Real noise: the recomputation must use exactly the forward's noise.
    """
    x = _input()
    with monkeypatch.context() as patched:
        patched.setattr(torch.utils.checkpoint, "checkpoint", _without_recomputation)
        loss_a, grads_a, buffers_a = _loss_and_grads(name, x, **options)
    loss_b, grads_b, buffers_b = _loss_and_grads(name, x, **options)
    torch.testing.assert_close(loss_a, loss_b)
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-7, atol=1e-10, msg=key)
    for key in buffers_a:  # the prior moves once per forward, not again in the recomputation
        torch.testing.assert_close(buffers_a[key], buffers_b[key], msg=key)


def test_recomputed_gates_equal_the_kept_ones():
    """Real noise: xi is drawn once per sender and level, outside the recomputed banks, in both forms."""
    x = _input()
    loss_a, grads_a, buffers_a = _loss_and_grads("ciml", x, recompute_gates=False)
    loss_b, grads_b, buffers_b = _loss_and_grads("ciml", x, recompute_gates=True)
    torch.testing.assert_close(loss_a, loss_b)
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-7, atol=1e-10, msg=key)
    for key in buffers_a:
        torch.testing.assert_close(buffers_a[key], buffers_b[key], msg=key)


def test_message_channels_narrow_the_latent_and_round_trip_through_the_config():
    model = build_model("ciml", "brats2020", widths=(8, 16), message_channels=4)
    gate = model.gates["0/flair<-t1"]
    assert gate.value.out_channels == 4 and gate.project.in_channels == 4 and gate.running_mean.shape == (4,)
    assert model.config["format_version"] == FORMAT_VERSION and model.config["message_channels"] == 4
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    out = model(torch.randn(1, 4, 8, 8, 8))
    assert out.logits["flair"].shape == (1, 1, 8, 8, 8)


def test_a_version_1_config_builds_the_full_width_gates():
    config = build_model("ciml", "brats2020", widths=(4, 8)).config
    legacy = {k: v for k, v in config.items() if k not in ("format_version", "message_channels")}
    assert model_from_config(legacy).gates["0/flair<-t1"].value.out_channels == 4


def test_checkpoints_of_another_format_fail_with_the_version_named():
    narrow = build_model("ciml", "brats2020", widths=(8, 16), message_channels=4)
    full = build_model("ciml", "brats2020", widths=(8, 16))
    with pytest.raises(CimlError, match="format version"):
        check_state_dict(full, narrow.state_dict())
    with pytest.raises(CimlError, match="newer than"):
        model_from_config({**full.config, "format_version": FORMAT_VERSION + 1})


def _gates_and_inputs(batch: int, training: bool, saturated: bool):
    """9 float64 gates (3 receivers x 3 of 4 senders), random weights and priors, and their inputs."""
    torch.manual_seed(0)
    gates = [InformationGate(6, 3, message_channels=3).double().train(training) for _ in range(9)]
    for gate in gates:
        for parameter in gate.parameters():
            torch.nn.init.normal_(parameter, std=0.5)
        gate.running_mean.normal_()
        gate.running_std.uniform_(0.5, 2.0)
        if saturated:  # lambda = 1 in float64 somewhere: the KL's clamp
            gate.attention[2].bias.data.fill_(40.0)
    receivers = torch.randn(batch, 3 * 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    senders = torch.randn(batch, 4 * 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    slots = [s for r in range(3) for s in range(4) if s != r]
    return gates, receivers, senders, slots


@pytest.mark.parametrize(
    ("batch", "training", "closed", "saturated"),
    [(2, True, False, False), (1, True, False, False), (2, False, False, False), (2, True, True, False),
     (2, False, True, False), (2, True, False, True)],
)  # fmt: skip
def test_written_out_backward_equals_autograd_in_float64(batch, training, closed, saturated):
    """The recomputed banks' hand-written chain rule against autograd through the reference bank, for
    every output (messages, KL maps and lambda weighted by fixed random maps), in float64."""
    gates, receivers, senders, slots = _gates_and_inputs(batch, training, saturated)
    results = []
    for recompute in (False, True):
        torch.manual_seed(5)  # the same xi
        out = grouped_gates(gates, receivers, senders, slots, closed, recompute)
        generator = torch.Generator().manual_seed(6)
        loss = sum(
            (t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
            for t in (out.messages, out.kl_maps, out.attention)
        )
        inputs = [receivers, senders, *(p for g in gates for p in g.parameters())]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append(
            (out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)])
        )
    (reference, reference_grads), (ours, our_grads) = results
    for field in ("messages", "kl_maps", "attention"):
        torch.testing.assert_close(getattr(ours, field), getattr(reference, field), rtol=1e-10, atol=1e-10)
    for index, (a, b) in enumerate(zip(our_grads, reference_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"input {index}")
