"""Stacked-channel baselines with modality dropout: absent channels zero-filled, never silently otherwise."""

from __future__ import annotations

import pytest
import torch

from ciml.errors import CimlError
from ciml.models import build_model, model_from_config
from ciml.tasks import load_task

SIZE = (8, 8, 8)


@pytest.mark.parametrize("name", ["joint", "segresnet"])
def test_zero_filled_forward_equals_the_forward_on_zeroed_channels(name):
    spec = load_task("brats2020")
    torch.manual_seed(0)
    model = build_model(name, spec, widths=(4, 8), spatial_dims=3, zero_fill_missing=True).eval()
    assert model.config["zero_fill_missing"] is True
    rebuilt = model_from_config(model.config)
    assert rebuilt.zero_fill_missing
    x = torch.randn(1, 4, *SIZE)
    zeroed = x.clone()
    zeroed[:, [1, 3]] = 0.0  # t1 and t2 absent
    with torch.no_grad():
        missing = model(x, present=("flair", "t1ce")).logits[name]
        explicit = model(zeroed).logits[name]
    torch.testing.assert_close(missing, explicit)
    assert not torch.equal(x[:, 1], zeroed[:, 1])  # the caller's tensor is left alone


def test_without_zero_fill_stacked_models_refuse_and_ciml_ignores_the_flag():
    spec = load_task("brats2020")
    joint = build_model("joint", spec, widths=(4, 8), spatial_dims=3)
    assert "zero_fill_missing" not in joint.config  # configs of older runs rebuild unchanged
    with pytest.raises(CimlError, match="cannot run without t1, t2; train it with modality dropout"):
        joint(torch.randn(1, 4, *SIZE), present=("flair", "t1ce"))
    ciml = build_model("ciml", spec, widths=(4, 8), spatial_dims=3, zero_fill_missing=True)
    assert "zero_fill_missing" not in ciml.config  # CIML skips a missing modality's segmentor instead
