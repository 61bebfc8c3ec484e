"""Deep supervision (nnU-Net's weighted multi-scale loss) on the networks: which decoder levels get heads,
the scale weights, what training and evaluation return, grouped == per-segmentor, config round trips,
and the refusal of networks without it.

The tables are worked out by hand: nnU-Net supervises every decoder output except the lowest (weight
zeroed) and the bottleneck has none, so a U-Net of L levels has auxiliary heads on levels 1 .. L - 3
and scales 0 .. L - 3 weighted 1 / 2^i, normalised to sum 1.
"""

from __future__ import annotations

import pytest
import torch

from ciml.errors import CimlError, ParameterError
from ciml.models import (
    build_model,
    check_state_dict,
    deep_supervision_levels,
    deep_supervision_weights,
    model_from_config,
    model_names,
)
from ciml.models.ciml import CIMLNet
from ciml.tasks import load_task

# (levels, auxiliary levels, weights of scales 0, 1, ...)
WEIGHT_TABLE = [
    (1, (), (1.0,)),
    (2, (), (1.0,)),
    (3, (), (1.0,)),  # nnU-Net: decoder outputs at 0 and 1, the lowest (1) zero-weighted -> only 0
    (4, (1,), (2 / 3, 1 / 3)),  # 1, 1/2 over 3/2
    (5, (1, 2), (4 / 7, 2 / 7, 1 / 7)),  # 1, 1/2, 1/4 over 7/4 (the default widths have 5 levels)
    (6, (1, 2, 3), (8 / 15, 4 / 15, 2 / 15, 1 / 15)),  # 1, 1/2, 1/4, 1/8 over 15/8
]

WIDTHS = (4, 4, 8, 8)  # 4 levels: one auxiliary head, at level 1 (half resolution)
SUPPORTED = {"ciml", "ciml-beta0", "ciml-nomsg", "ensemble", "joint"}


@pytest.mark.parametrize("levels, aux, weights", WEIGHT_TABLE, ids=[f"{c[0]}-levels" for c in WEIGHT_TABLE])
def test_supervised_levels_and_weights_table(levels, aux, weights):
    assert deep_supervision_levels(levels) == aux
    assert deep_supervision_weights(1 + len(aux)) == pytest.approx(weights, rel=1e-12)
    assert sum(deep_supervision_weights(1 + len(aux))) == pytest.approx(1.0, rel=1e-12)


def test_weights_need_at_least_one_scale():
    with pytest.raises(ValueError, match="scales"):
        deep_supervision_weights(0)


def _spec(fallback: bool = False):
    spec = load_task("brats2020").to_dict()
    if fallback:
        spec["fallback_owners"] = {"ET": ["t1"], "WT": ["t1"]}
    return load_task(spec)


def _model(name: str, deep: bool, fallback: bool = False, widths=WIDTHS):
    torch.manual_seed(0)
    model = build_model(name, _spec(fallback), widths=widths, spatial_dims=2, deep_supervision=deep)
    for gate in getattr(model, "gates", {}).values():  # messages that matter (zero-initialised otherwise)
        torch.nn.init.normal_(gate.project.weight, std=0.5)
        gate.running_std.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_training_returns_deep_logits_per_scale_and_eval_does_not(name):
    model = _model(name, deep=True, fallback=True).train()
    x = torch.randn(2, 4, 16, 16)
    out = model(x)
    assert sorted(out.deep_logits) == sorted(out.logits)
    for segmentor, logits in out.logits.items():
        (half,) = out.deep_logits[segmentor]  # 4 levels: one auxiliary scale
        assert half.shape == (2, logits.shape[1], 8, 8)
    for segmentor, logits in out.fallback_logits.items():
        (half,) = out.deep_fallback_logits[segmentor]
        assert half.shape == (2, logits.shape[1], 8, 8)
    assert sorted(out.deep_fallback_logits) == sorted(out.fallback_logits)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    assert evaluated.deep_logits == {} and evaluated.deep_fallback_logits == {}


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_heads_leave_the_main_logits_unchanged_in_eval_and_training(name):
    """The same weights without the heads give the same main logits; the heads only add outputs."""
    plain, deep = _model(name, deep=False, fallback=True), _model(name, deep=True, fallback=True)
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".deep_heads." in k for k in missing)
    with torch.no_grad():
        for head in (m for n, m in deep.named_modules() if n.endswith("deep_heads")):
            for p in head.parameters():
                p.normal_()  # whatever the heads hold
    x = torch.randn(2, 4, 16, 16)
    for mode in ("eval", "train"):
        getattr(plain, mode)(), getattr(deep, mode)()
        with torch.no_grad():
            torch.manual_seed(1)  # the same noise for both (the heads draw none)
            a = plain(x)
            torch.manual_seed(1)
            b = deep(x)
        for field in ("logits", "fallback_logits"):
            ours, theirs = getattr(b, field), getattr(a, field)
            assert sorted(ours) == sorted(theirs)
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), (mode, field, key)
        assert bool(b.deep_logits) == (mode == "train")


def test_few_levels_have_no_heads_and_nothing_changes():
    model = _model("ciml", deep=True, widths=(4, 8)).train()
    assert not [k for k in model.state_dict() if "deep_heads" in k]
    assert model(torch.randn(2, 4, 16, 16)).deep_logits == {}


def _outputs_and_grads(model: CIMLNet, x, present, grouped: bool):
    from ciml.losses import CIMLLoss

    model.grouped = grouped
    model.zero_grad(set_to_none=True)
    out = model(x, present=present)
    target = (x[:, :3] > 0).float()
    loss = CIMLLoss(["WT", "TC", "ET"], beta=0.1)(out, target).total
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("present", [None, ("flair", "t1ce"), ("t1", "t1ce", "t2")])
@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "fallback"])
def test_grouped_equals_per_segmentor_with_deep_supervision(present, fallback):
    """Real noise: both forms draw one xi per sender and level, in the same order. In float64 with a fixed
    input: float32's two summation orders differ by ~1e-4 of a gradient's scale on some CPUs."""
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    model = _model("ciml", deep=True, fallback=fallback).train().double()
    grouped, loss_a, grads_a = _outputs_and_grads(model, x, present, grouped=True)
    model = _model("ciml", deep=True, fallback=fallback).train().double()
    reference, loss_b, grads_b = _outputs_and_grads(model, x, present, grouped=False)
    for field in ("logits", "fallback_logits", "deep_logits", "deep_fallback_logits"):
        ours, theirs = getattr(grouped, field), getattr(reference, field)
        assert sorted(ours) == sorted(theirs), field
        for key in theirs:
            if isinstance(theirs[key], list):
                assert len(ours[key]) == len(theirs[key]) == 1
                pairs = zip(ours[key], theirs[key], strict=True)
            else:
                pairs = [(ours[key], theirs[key])]
            for a, b in pairs:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{field}[{key}]")
    assert grouped.deep_logits  # the comparison covered deep logits
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-12)
    assert sorted(grads_a) == sorted(grads_b)
    assert any(".deep_heads." in n for n in grads_b)  # the heads are trained
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_config_records_deep_supervision_and_rebuilds_it(name):
    model = _model(name, deep=True)
    assert model.config["deep_supervision"] is True and model.deep_supervision
    assert model.describe()["deep_supervision"] is True
    rebuilt = model_from_config(model.config)
    assert rebuilt.deep_supervision and rebuilt.config == model.config
    check_state_dict(rebuilt, model.state_dict())
    rebuilt.load_state_dict(model.state_dict())  # strict: the same heads
    # a plain model's config has no key (older configs rebuild the same model) and refuses the heads
    plain = _model(name, deep=False)
    assert "deep_supervision" not in plain.config and not plain.deep_supervision
    legacy = dict(model.config)
    del legacy["deep_supervision"]
    assert not model_from_config(legacy).deep_supervision
    with pytest.raises(CimlError, match="unexpected"):
        check_state_dict(plain, model.state_dict())


def test_checkpoint_round_trip_keeps_the_training_outputs(tmp_path):
    from ciml.runs import load_checkpoint, save_checkpoint

    model = _model("ciml", deep=True).train()
    path = tmp_path / "model.pt"
    save_checkpoint({"config": model.config, "model": model.state_dict()}, path)
    state = load_checkpoint(path)
    rebuilt = model_from_config(state["config"]).train()
    rebuilt.load_state_dict(state["model"])
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        torch.manual_seed(1)  # the same noise for both
        a = model(x)
        torch.manual_seed(1)
        b = rebuilt(x)
    for key in a.deep_logits:
        torch.testing.assert_close(b.deep_logits[key][0], a.deep_logits[key][0], rtol=0, atol=0)


def test_every_network_declares_it_and_segresnet_refuses_clearly():
    for name in model_names():
        model = build_model(name, "brats2020", widths=(4, 8), spatial_dims=2)
        assert model.supports_deep_supervision == (name in SUPPORTED), name
        assert not model.deep_supervision
    with pytest.raises(ParameterError, match="deep_supervision: not supported by the segresnet model"):
        build_model("segresnet", "brats2020", widths=(4, 8), spatial_dims=2, deep_supervision=True)


def test_activation_checkpointing_keeps_deep_supervision_gradients():
    x = torch.randn(2, 4, 16, 16)
    results = []
    for enabled in (False, True):
        model = _model("ciml", deep=True, fallback=True).train()
        model.checkpoint_activations = enabled
        results.append(_outputs_and_grads(model, x, None, grouped=True))
    (_, loss_a, grads_a), (_, loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
