"""Grad-CAM shares: the informative modality wins, networks without messages stay unimodal, fallbacks.

Models are tiny (2D 24x24 or 3D 16^3, widths 4/8/16); the trained ones learn in ~2 s on one thread.
"""

from __future__ import annotations

import pytest
import torch

from ciml.errors import CimlError, ParameterError
from ciml.explain import (
    GRADCAM,
    HIRESCAM,
    INPUT_GRADIENT,
    default_level,
    explain_contributions,
    grad_cam,
)
from ciml.losses import CIMLLoss
from ciml.models import CIMLNet, build_model
from ciml.tasks import load_task

MODALITIES = ("a", "b", "c")


def discs(generator: torch.Generator, informative: int, n: int = 8, size: int = 24):
    """Images of 3 modalities: a bright disc (the target) in modality ``informative``, noise everywhere."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(7, size - 7, (n, 2), generator=generator)
    radius = torch.randint(3, 6, (n,), generator=generator)
    distance = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    mask = (distance < radius[:, None, None] ** 2).float()
    x = 0.5 * torch.randn(n, len(MODALITIES), size, size, generator=generator)
    x[:, informative] += 3.0 * mask
    return x, mask[:, None]


def trained_on_one_modality(informative: int, seed: int = 0) -> CIMLNet:
    """Segmentor 'a' owns the disc; only modality ``informative`` shows it (0: a itself, else a sender)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CIMLNet(MODALITIES, {"a": ["disc"]}, widths=(4, 8, 16), spatial_dims=2)
    loss = CIMLLoss(["disc"], beta=1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(ITERATIONS):
        x, target = discs(generator, informative)
        terms = loss(model(x), target)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    # learned = Dice on 16 held-out discs, not the last batch's loss (that varies 10x between seeds with
    # the batch); 48 trained models (8 seeds, both cases, 3 instruction sets) reached 0.91-0.99
    x, target = discs(torch.Generator().manual_seed(1000 + informative), informative, n=16)
    with torch.no_grad():
        predicted = model.eval()(x).logits["a"] > 0
    dice = float(2 * (predicted & (target > 0)).sum() / (predicted.sum() + target.sum()))
    assert dice > 0.7, f"the toy model did not learn (held-out Dice {dice:.2f}); the test would say nothing"
    return model.eval()


#: Training runs take other trajectories on other CPUs (oneDNN's AVX-512, AVX2 and SSE4.1 kernels round
#: differently): every seed must pass, not one lucky trajectory.
SEEDS = (0, 1, 2)
ITERATIONS = 120


@pytest.mark.slow
@pytest.mark.parametrize("informative", [0, 2], ids=["own-modality", "sender"])
def test_the_only_informative_modality_gets_the_largest_share(informative):
    """Any trained model where only one modality shows the target gives it the (large) majority share.

    Over 48 trained models (8 seeds x both cases x 3 instruction sets) its share was at least 0.99, so
    0.9 is a margin, not a fit; the maps are checked for what they promise (non-negative, on the grid).
    """
    name = MODALITIES[informative]
    x, target = discs(torch.Generator().manual_seed(99), informative, n=1)
    for seed in SEEDS:
        model = trained_on_one_modality(informative, seed)
        for cam in (GRADCAM, HIRESCAM):
            result = explain_contributions(model, x, cam=cam)
            [contribution] = result.contributions
            assert (contribution.segmentor, contribution.region) == ("a", "disc")
            assert result.level == 0  # messages enter at every level: level 0 sees them all
            shares = contribution.fractions
            assert max(shares, key=shares.get) == name, (seed, cam, shares, contribution.effect)
            assert shares[name] > 0.9, (seed, cam, shares, contribution.effect)
            assert sum(shares.values()) == pytest.approx(1.0)
            # the explained mask is the prediction, and it found the disc
            overlap = (contribution.mask & (target[0, 0] > 0)).sum() / target.sum()
            assert float(overlap) > 0.8, (seed, float(overlap))
            for values in contribution.maps.values():
                assert values.shape == x.shape[2:] and float(values.min()) >= 0.0
        # HiResCAM's maps follow the gradient voxel by voxel: the informative modality's is the heaviest
        # (48 of 48 models, at least 81 % of the mass), unlike Grad-CAM's, which can be clipped to zero
        mass = contribution.mass
        assert max(mass, key=mass.get) == name, (seed, mass)


def test_shares_are_the_sizes_of_the_ablation_effects():
    model = small("ciml")
    result = explain_contributions(model, torch.randn(1, 4, 16, 16, 16))
    for contribution in result.contributions:
        size = {m: abs(v) for m, v in contribution.effect.items()}
        total = sum(size.values())
        assert total > 0
        assert contribution.fractions == pytest.approx({m: v / total for m, v in size.items()})


def small(name: str, seed: int = 0):
    """A 3D network of the BraTS task with random, non-zero messages and settled gate statistics."""
    torch.manual_seed(seed)
    model = build_model(name, load_task("brats2020"), widths=(4, 8, 16), spatial_dims=3)
    for gate in getattr(model, "gates", {}).values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 4, 16, 16, 16))
    return model.eval()


def test_every_segmentor_and_region_is_explained_and_hooks_are_removed():
    model = small("ciml")
    result = explain_contributions(model, torch.randn(1, 4, 16, 16, 16))
    expected = [(m, r) for m, regions in model.owned.items() for r in regions]
    assert [(c.segmentor, c.region) for c in result.contributions] == expected
    for contribution in result.contributions:
        assert set(contribution.maps) == set(model.modalities)
        assert all(v.shape == (16, 16, 16) and float(v.min()) >= 0 for v in contribution.maps.values())
        assert contribution.mask.dtype == torch.bool and contribution.mask.shape == (16, 16, 16)
    others = [v for c in result.contributions for m, v in c.mass.items() if m != c.segmentor]
    assert sum(others) > 0  # messages carry gradient to the other modalities' encoders
    assert all(not encoder.stages[0]._forward_hooks for encoder in model.encoders.values())
    assert result.output is not None and not result.output.kl.requires_grad


def test_without_messages_each_segmentor_is_its_own_modality_alone():
    result = explain_contributions(small("ciml-nomsg"), torch.randn(1, 4, 16, 16, 16))
    assert result.level == 1 and any("No messages" in note for note in result.notes)
    for contribution in result.contributions:
        assert contribution.fractions[contribution.segmentor] == 1.0
        assert all(contribution.mass[m] == 0.0 for m in contribution.mass if m != contribution.segmentor)


def test_an_ensemble_is_explained_per_region_over_its_members():
    result = explain_contributions(small("ensemble"), torch.randn(1, 4, 16, 16, 16))
    explained = [(c.segmentor, c.region) for c in result.contributions]
    assert explained == [("ensemble", r) for r in load_task("brats2020").region_names]
    assert any("Ensemble" in note for note in result.notes)
    assert all(sum(c.fractions.values()) == pytest.approx(1.0) for c in result.contributions)


def test_a_joint_network_falls_back_to_input_gradient_and_finds_its_only_used_channel():
    model = small("joint")
    first_conv = model.network.encoder.stages[0][0][0]
    with torch.no_grad():
        first_conv.weight[:, [0, 1, 3]] = 0.0  # the network now sees t1ce (channel 2) only
    result = explain_contributions(model, torch.randn(1, 4, 16, 16, 16))
    assert result.method == INPUT_GRADIENT and result.level is None
    assert [c.region for c in result.contributions] == ["WT", "TC", "ET"]
    for contribution in result.contributions:
        assert contribution.fractions["t1ce"] == 1.0
    with pytest.raises(CimlError, match="every modality"):
        explain_contributions(model, torch.randn(1, 4, 16, 16, 16), present=["flair"])


def test_default_level_sees_every_message():
    spec = load_task("brats2020")
    assert default_level(build_model("ciml", spec, widths=(4, 8, 16), message_levels=[1, 2])) == 1
    assert default_level(build_model("ciml-nomsg", spec, widths=(4, 8, 16))) == 1
    assert default_level(build_model("ciml-nomsg", spec, widths=(4,))) == 0


def test_level_above_a_message_level_says_what_it_misses():
    result = explain_contributions(small("ciml"), torch.randn(1, 4, 16, 16, 16), level=2)
    assert result.level == 2 and any("bypass level 2" in note for note in result.notes)
    with pytest.raises(CimlError, match="levels 0..2"):
        explain_contributions(small("ciml"), torch.randn(1, 4, 16, 16, 16), level=3)


def test_grad_cam_formula_and_input_checks():
    activation = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]]).view(1, 2, 2)  # [B=1, C=2, 2 voxels]
    gradient = torch.tensor([[1.0, 1.0], [-1.0, -3.0]]).view(1, 2, 2)  # channel weights 1 and -2
    # 1*[1, 2] - 2*[3, -1] = [-5, 4] -> relu
    assert grad_cam(activation, gradient).flatten().tolist() == [0.0, 4.0]
    assert grad_cam(activation, None).abs().sum() == 0
    with pytest.raises(CimlError, match="one case at a time"):
        explain_contributions(small("ciml"), torch.randn(2, 4, 16, 16, 16))
    with pytest.raises(ParameterError, match="^cam: must be one of"):
        explain_contributions(small("ciml"), torch.randn(1, 4, 16, 16, 16), cam="scorecam")
