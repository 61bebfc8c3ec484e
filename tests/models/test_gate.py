"""CIG maths and the information-flow guarantees of CIML's messages."""

from __future__ import annotations

import pytest
import torch

from ciml.models import CIMLNet, InformationGate, build_model, gaussian_bottleneck_kl
from ciml.models.gate import bottleneck, grouped_gates
from ciml.tasks import load_task


def test_closed_form_kl_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mu, sd = 0.3, 1.7
    for lam, v in [(0.2, 1.0), (0.6, -2.0), (0.9, 0.5)]:
        n = 400_000
        eps = mu + sd * torch.randn(n, dtype=torch.float64)
        z = lam * v + (1 - lam) * eps
        q_mean, q_sd = lam * v + (1 - lam) * mu, (1 - lam) * sd
        log_q = torch.distributions.Normal(q_mean, q_sd).log_prob(z)
        log_p = torch.distributions.Normal(mu, sd).log_prob(z)
        monte_carlo = (log_q - log_p).mean().item()
        closed = gaussian_bottleneck_kl(torch.tensor(lam), torch.tensor((v - mu) / sd)).item()
        assert closed == pytest.approx(monte_carlo, abs=0.01), (lam, v)


def _reference_bottleneck(value, attention, mean, std, eps):
    """DESIGN section 4 written plainly; autograd differentiates it (the prior is a constant)."""
    z = attention * value + (1 - attention) * (mean + std * eps)
    kl = gaussian_bottleneck_kl(attention, (value - mean) / std).sum(dim=1, keepdim=True)
    return z, kl


@pytest.mark.parametrize("training", [False, True])
def test_fused_bottleneck_matches_the_formulas_and_their_gradients(training, monkeypatch) -> None:
    torch.manual_seed(0)
    value = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    attention = torch.rand(2, 1, 6, 7, dtype=torch.float64).mul(0.98).requires_grad_()
    running_mean, running_std = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    eps = torch.randn_like(value)
    monkeypatch.setattr(torch, "randn_like", lambda _: eps)
    z, kl, stats = bottleneck(value, attention, running_mean, running_std, training)
    if training:  # batch statistics, treated as constants
        mean, std = stats
        assert torch.allclose(mean, value.detach().mean(dim=(0, 2, 3)))
        assert torch.allclose(std, value.detach().std(dim=(0, 2, 3)))
    else:
        assert stats is None
        mean, std = running_mean, running_std
    shape = (1, -1, 1, 1)
    z_ref, kl_ref = _reference_bottleneck(
        value, attention, mean.view(shape), std.view(shape), eps if training else 0
    )
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(kl, kl_ref)
    weights_z, weights_kl = torch.randn_like(z), torch.randn_like(kl)
    grads = torch.autograd.grad((z * weights_z).sum() + (kl * weights_kl).sum(), (value, attention))
    grads_ref = torch.autograd.grad(
        (z_ref * weights_z).sum() + (kl_ref * weights_kl).sum(), (value, attention)
    )
    for ours, theirs in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(ours, theirs)
    if not training:
        assert torch.autograd.gradcheck(
            lambda v, a: bottleneck(v, a, running_mean, running_std, False)[:2], (value, attention)
        )


def test_zero_attention_costs_nothing_and_sends_the_prior_mean() -> None:
    torch.manual_seed(0)
    gate = InformationGate(channels=6, spatial_dims=2)
    torch.nn.init.normal_(gate.project.weight)  # make messages visible
    gate.train()
    gate(torch.randn(4, 6, 8, 8), torch.randn(4, 6, 8, 8))  # populate running statistics
    gate.eval()
    receiver, sender = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    out = gate(receiver, sender, closed=True)
    assert torch.count_nonzero(out.attention) == 0
    assert torch.allclose(out.kl_map, torch.zeros_like(out.kl_map))
    expected = gate.project(gate.running_mean.view(1, -1, 1, 1).expand_as(sender))
    torch.testing.assert_close(out.message, expected)
    torch.testing.assert_close(gate.silent_message(receiver), expected)
    assert float(gaussian_bottleneck_kl(torch.zeros(3), torch.randn(3)).abs().max()) == 0.0


def test_any_open_gate_costs_information() -> None:
    gate = InformationGate(channels=4, spatial_dims=2).eval()
    sender = torch.randn(1, 4, 8, 8) * 3
    opened = gate(torch.randn(1, 4, 8, 8), sender)
    assert float(opened.kl_map.detach().min()) > 0.0


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give every message projection non-zero weights and settle running statistics."""
    torch.manual_seed(1)
    for gate in model.gates.values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
    model.train()
    model(torch.randn(4, len(model.modalities), 16, 16))
    return model.eval()


def test_closed_gates_isolate_segmentors_and_open_gates_do_not() -> None:
    spec = load_task("brats2020")
    model = _trained_like(build_model("ciml", spec, widths=(4, 8, 8), spatial_dims=2))
    x = torch.randn(1, 4, 16, 16)
    changed = x.clone()
    changed[:, 1] = torch.randn(16, 16) * 5  # change the t1 input only
    with torch.no_grad():
        closed_a, closed_b = model(x, close_gates=True), model(changed, close_gates=True)
        open_a, open_b = model(x), model(changed)
    torch.testing.assert_close(closed_a.logits["flair"], closed_b.logits["flair"])
    torch.testing.assert_close(closed_a.logits["t1ce"], closed_b.logits["t1ce"])
    assert not torch.allclose(open_a.logits["flair"], open_b.logits["flair"])
    assert not torch.allclose(closed_a.logits["t1"], closed_b.logits["t1"])  # t1's own input changed


def test_fresh_ciml_equals_decomposition_without_messages() -> None:
    spec = load_task("brats2020")
    ciml = build_model("ciml", spec, widths=(4, 8, 8), spatial_dims=3)
    nomsg = build_model("ciml-nomsg", spec, widths=(4, 8, 8), spatial_dims=3)
    missing, unexpected = nomsg.load_state_dict(ciml.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    x = torch.randn(2, 4, 8, 8, 8)
    ciml.train(), nomsg.train()
    a, b = ciml(x), nomsg(x)
    for key in b.logits:
        torch.testing.assert_close(a.logits[key], b.logits[key])


def test_missing_modality_equals_closed_gates_from_it() -> None:
    spec = load_task("brats2020")
    model = _trained_like(build_model("ciml", spec, widths=(4, 8, 8), spatial_dims=2))
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        without_t2 = model(x, present=["flair", "t1", "t1ce"], return_maps=True)
    assert "t2" not in without_t2.logits
    assert not any(key.endswith("<-t2") for key in without_t2.kl_maps)
    # the same model with t2's input replaced: outputs must not move, t2 sends nothing
    x2 = x.clone()
    x2[:, 3] = 100.0
    with torch.no_grad():
        again = model(x2, present=["flair", "t1", "t1ce"])
    for key in without_t2.logits:
        torch.testing.assert_close(without_t2.logits[key], again.logits[key])


def test_maps_cover_every_gate_and_sum_to_the_kl_term() -> None:
    model = CIMLNet(["a", "b", "c"], {"a": ["r"], "b": ["s"]}, widths=(4, 8), spatial_dims=2)
    out = model(torch.randn(2, 3, 8, 8), return_maps=True)
    # receivers a and b, each from two senders, at two levels; c only sends
    assert len(out.kl_maps) == len(out.attention_maps) == 8
    total = sum(m.mean() for m in out.kl_maps.values())
    torch.testing.assert_close(total, out.kl)
    assert all(((lam >= 0) & (lam <= 1)).all() for lam in out.attention_maps.values())


def test_joint_refuses_missing_modalities() -> None:
    from ciml.errors import CimlError

    model = build_model("joint", "brats2020", widths=(4, 8), spatial_dims=2)
    with pytest.raises(CimlError, match="cannot run without t2"):
        model(torch.randn(1, 4, 8, 8), present=["flair", "t1", "t1ce"])


def _noise_samples(recompute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed gates (z = mu + sd * xi) from 3 senders into 3 receivers, rho set to copy each gate's z.

    Returns z [P, L, samples] of the 6 gates (receiver-major), their batch prior mean and sd [P, L].
    """
    torch.manual_seed(0)
    channels, latent = 4, 2  # each receiver's 2 gates x 2 latent channels fit its 4 message channels
    gates = [InformationGate(channels, 3, message_channels=latent).train() for _ in range(6)]
    for p, gate in enumerate(gates):
        with torch.no_grad():
            gate.project.weight.zero_()
            gate.project.weight[2 * (p % 2) : 2 * (p % 2) + 2, :, 0, 0, 0] = torch.eye(latent)
    senders = torch.randn(2, 3 * channels, 16, 16, 16) * 2 + 1
    slots = [1, 2, 0, 2, 0, 1]  # receiver r hears the two other modalities
    out = grouped_gates(gates, senders, senders, slots, closed=True, recompute=recompute)
    z = out.messages.unflatten(1, (6, latent)).movedim(0, 2).flatten(2)  # [P, L, B * voxels]
    by_slot = senders.unflatten(1, (3, channels))
    values = [
        gate.value(by_slot[:, slot]).transpose(0, 1).flatten(1)
        for gate, slot in zip(gates, slots, strict=True)
    ]
    values = torch.stack(values).detach()
    return z.detach(), values.mean(dim=2), values.std(dim=2)


@pytest.mark.parametrize("recompute", [False, True])
def test_message_noise_is_the_prior_independent_per_receiver_and_shared_per_sender(recompute) -> None:
    """eps = mu + sd * xi with one xi per sender: each gate's noise has its prior's mean and sd; the
    messages into one receiver (different senders) have independent noise; a sender's gates to
    different receivers scale the same xi."""
    z, mean, std = _noise_samples(recompute)
    torch.testing.assert_close(z.mean(dim=2), mean, atol=0.05 * std.max().item(), rtol=0)
    torch.testing.assert_close(z.std(dim=2), std, rtol=0.03, atol=0)
    xi = (z - mean[..., None]) / std[..., None]
    for a, b in [(0, 1), (2, 3), (4, 5)]:  # the two gates into one receiver
        assert torch.corrcoef(torch.stack([xi[a, 0], xi[b, 0]]))[0, 1].abs() < 0.05
    for a, b in [(0, 5), (1, 3), (2, 4)]:  # one sender (1, 2, 0) to two receivers
        torch.testing.assert_close(xi[a], xi[b], rtol=1e-4, atol=1e-4)
