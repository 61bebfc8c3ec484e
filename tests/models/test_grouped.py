"""The grouped (batched) segmentors are the same model as the per-segmentor reference form.

Random weights (the zero-initialised message projections are randomised, so messages matter), tiny
volumes, every CIML-family network, with and without missing modalities, fallback heads and a pure
sender; outputs, information maps, KL terms, gradients and running prior statistics must agree.

Both forms run in float64 with fixed inputs: in float32 the two summation orders differ by ~1e-4 of a
gradient's scale, which an element-wise tolerance cannot tell from a real error on every CPU.
"""

from __future__ import annotations

import pytest
import torch

from ciml.models import build_model
from ciml.models.ciml import CIMLNet
from ciml.models.grouped import grouped_pointwise
from ciml.tasks import load_task

WIDTHS = (4, 8, 8)
SUBSETS = [None, ("flair", "t1ce"), ("t2",), ("t1", "t1ce", "t2")]


def _spec(variant: str):
    spec = load_task("brats2020").to_dict()
    if variant == "fallback":
        spec["fallback_owners"] = {"ET": ["t1"], "WT": ["t1"]}
    elif variant == "pure-sender":
        spec["decomposition"] = {m: r for m, r in spec["decomposition"].items() if m != "t1"}
    return load_task(spec)


def _model(name: str, variant: str = "plain", spatial_dims: int = 3) -> CIMLNet:
    torch.manual_seed(0)
    model = build_model(name, _spec(variant), widths=WIDTHS, spatial_dims=spatial_dims)
    for gate in model.gates.values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
        torch.nn.init.normal_(gate.project.bias, std=0.1)
        gate.running_mean.normal_()
        gate.running_std.uniform_(0.5, 2.0)
    return model.double()


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _both(model: CIMLNet, x: torch.Tensor, **kwargs):
    model.grouped = True
    grouped = model(x, **kwargs)
    with model.per_segmentor():
        reference = model(x, **kwargs)
    assert model.grouped  # restored after the block
    return grouped, reference


def _assert_same_output(grouped, reference) -> None:
    for field in ("logits", "fallback_logits", "kl_terms", "kl_maps", "attention_maps"):
        ours, theirs = getattr(grouped, field), getattr(reference, field)
        assert sorted(ours) == sorted(theirs), field
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-12, msg=f"{field}[{key}]")
    assert grouped.owned == reference.owned and grouped.fallback == reference.fallback
    torch.testing.assert_close(grouped.kl, reference.kl, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["ciml", "ciml-beta0", "ciml-nomsg", "ensemble"])
@pytest.mark.parametrize("present", SUBSETS)
def test_evaluation_outputs_and_maps_match_the_per_segmentor_form(name, present):
    model = _model(name).eval()
    x = _input(2, 4, 8, 8, 8)
    with torch.no_grad():
        _assert_same_output(*_both(model, x, present=present, return_maps=True))


@pytest.mark.parametrize("variant", ["fallback", "pure-sender"])
def test_fallback_heads_and_pure_senders_match(variant):
    model = _model("ciml", variant).eval()
    x = _input(1, 4, 8, 8, 8)
    with torch.no_grad():
        for present in SUBSETS:
            _assert_same_output(*_both(model, x, present=present, return_maps=True))


def test_2d_and_closed_gates_match():
    model = _model("ciml", spatial_dims=2).eval()
    x = _input(2, 4, 16, 16)
    with torch.no_grad():
        _assert_same_output(*_both(model, x, return_maps=True))
        _assert_same_output(*_both(model, x, close_gates=True, return_maps=True))


def test_training_step_gradients_and_running_statistics_match():
    """Training mode, real noise: both forms draw one xi per sender and level, in the same order."""
    x = _input(2, 4, 8, 8, 8)
    results = []
    for grouped in (True, False):
        model = _model("ciml").train()
        model.grouped = grouped
        out = model(x, present=("flair", "t1", "t1ce"))
        loss = sum((logits.sigmoid() ** 2).mean() for logits in out.logits.values()) + out.kl
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((loss.detach(), grads, buffers))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-12)
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-7, atol=1e-10, msg=name)
    for name in buffers_b:
        torch.testing.assert_close(buffers_a[name], buffers_b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grouped_is_the_default_and_checkpoints_do_not_change():
    model = _model("ciml")
    assert model.grouped
    reference = build_model("ciml", _spec("plain"), widths=WIDTHS)
    reference.grouped = False
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grouped_pointwise_equals_a_grouped_1x1_convolution(spatial_dims):
    conv = torch.nn.functional.conv3d if spatial_dims == 3 else torch.nn.functional.conv2d
    x = torch.randn(2, 3 * 5, *(6,) * spatial_dims)
    weight = torch.randn(3 * 4, 5, *(1,) * spatial_dims)
    bias = torch.randn(3 * 4)
    torch.testing.assert_close(grouped_pointwise(x, weight, bias, groups=3), conv(x, weight, bias, groups=3))
    torch.testing.assert_close(grouped_pointwise(x, weight, groups=3), conv(x, weight, groups=3))
