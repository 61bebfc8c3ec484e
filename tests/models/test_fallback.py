"""Fallback owners: extra decoder channels for regions a segmentor stands in for when all owners are missing.

Tiny 3D volumes (8^3, widths (4, 8)); the spec is brats2020's decomposition
with ``fallback_owners: {ET: [t1], WT: [t1]}`` instead of the preset's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ciml.losses.region import CIMLLoss
from ciml.models import SegmentationOutput, build_model, model_from_config
from ciml.models.ciml import CIMLNet
from ciml.tasks import TaskSpec, load_task

SIZE = (8, 8, 8)
WIDTHS = (4, 8)


@pytest.fixture
def plain() -> TaskSpec:
    return dataclasses.replace(load_task("brats2020"), fallback_owners={})


@pytest.fixture
def spec(plain: TaskSpec) -> TaskSpec:
    return load_task({**plain.to_dict(), "fallback_owners": {"ET": ["t1"], "WT": ["t1"]}})


def _model(spec: TaskSpec, name: str = "ciml") -> CIMLNet:
    torch.manual_seed(0)
    return build_model(name, spec, widths=WIDTHS, spatial_dims=3).eval()


def _forward(model: CIMLNet, present=None, seed: int = 1) -> SegmentationOutput:
    torch.manual_seed(seed)
    x = torch.randn(2, len(model.modalities), *SIZE)
    with torch.no_grad():
        return model(x, present=present)


def _owners_only(output: SegmentationOutput) -> SegmentationOutput:
    return SegmentationOutput(logits=output.logits, owned=output.owned, kl=output.kl)


def test_fallback_channels_follow_the_owned_ones_in_their_own_dict(spec):
    model = _model(spec)
    out = _forward(model)
    assert out.fallback == {"t1": ("ET", "WT")}
    assert out.owned["t1"] == ("TC",)  # owned keeps meaning "regions it owns"
    assert out.logits["t1"].shape == (2, 1, *SIZE)
    assert out.fallback_logits["t1"].shape == (2, 2, *SIZE)
    assert model.decoders["t1"].head.out_channels == 3
    assert set(out.fallback_logits) == {"t1"}


def test_without_fallback_owners_the_architecture_is_unchanged(plain, spec):
    before = _model(plain).state_dict()
    assert all(not regions for regions in _model(plain).fallback.values())
    assert _forward(_model(plain)).fallback_logits == {}
    after = _model(spec).state_dict()
    assert list(before) == list(after)  # same keys; only t1's head grows
    changed = {k for k in before if before[k].shape != after[k].shape}
    assert changed == {k for k in before if k.startswith("decoders.t1.head.")}


def test_config_rebuilds_the_fallback_heads(spec):
    model = _model(spec, "ciml-nomsg")
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    assert rebuilt.fallback == model.fallback and not rebuilt.gates


def test_with_every_modality_present_fallback_channels_are_ignored(spec):
    out = _forward(_model(spec))
    torch.testing.assert_close(
        out.region_probabilities(spec.region_names),
        _owners_only(out).region_probabilities(spec.region_names),
    )


def test_an_orphaned_region_comes_from_a_present_fallback_owner(spec):
    out = _forward(_model(spec), present=("flair", "t1", "t2"))  # t1ce, ET's only owner, is missing
    probabilities = out.region_probabilities(spec.region_names)
    et = spec.region_names.index("ET")
    torch.testing.assert_close(probabilities[:, et], torch.sigmoid(out.fallback_logits["t1"][:, 0]))
    owners = _owners_only(out).region_probabilities(spec.region_names)
    assert torch.isnan(owners[:, et]).all()
    keep = [i for i in range(len(spec.region_names)) if i != et]  # WT has owners: t1's stand-in unused
    torch.testing.assert_close(probabilities[:, keep], owners[:, keep])
    assert out.predictable_regions(spec.region_names) == list(spec.region_names)


def test_a_region_without_present_owner_or_fallback_owner_stays_nan(spec):
    out = _forward(_model(spec), present=("flair",))
    probabilities = out.region_probabilities(spec.region_names)
    assert torch.isfinite(probabilities[:, 0]).all()  # WT: flair owns it
    assert torch.isnan(probabilities[:, 1:]).all()  # TC, ET: owners and t1 (ET's fallback) missing
    assert out.predictable_regions(spec.region_names) == ["WT"]


def test_a_segmentor_that_owns_nothing_gets_a_decoder_for_its_fallback_regions():
    net = CIMLNet(["a", "b"], {"a": ["X"]}, WIDTHS, spatial_dims=2, fallback={"b": ["X"]}).eval()
    assert set(net.decoders) == {"a", "b"}
    with torch.no_grad():
        out = net(torch.randn(1, 2, 8, 8), present=("b",))
    assert out.logits == {} and out.fallback == {"b": ("X",)}
    torch.testing.assert_close(
        out.region_probabilities(["X"])[:, 0], torch.sigmoid(out.fallback_logits["b"][:, 0])
    )


def test_the_loss_trains_the_fallback_channels(spec):
    model = _model(spec).train()
    torch.manual_seed(2)
    x = torch.randn(2, 4, *SIZE)
    target = (torch.rand(2, 3, *SIZE) > 0.5).float()
    terms = CIMLLoss(spec.region_names)(model(x), target)
    logged = terms.as_dict()
    assert "seg/t1/fallback" in logged and "seg/t1" in logged
    assert logged["seg"] == pytest.approx(sum(v for k, v in logged.items() if k.startswith("seg/")), rel=1e-5)
    terms.total.backward()
    head = model.decoders["t1"].head
    assert head.weight.grad[1:].abs().sum() > 0  # rows 1: and 2: feed only the fallback channels
    assert head.bias.grad[1:].abs().sum() > 0
