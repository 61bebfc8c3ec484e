"""The meta-device count of a training step is exact: a real CPU step saves the same bytes."""

from __future__ import annotations

import pytest
import torch

from ciml.models import build_model
from ciml.training.memory import SavedTensorBytes, step_memory

PATCH = (16, 16, 16)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("joint", {}),
        ("ciml", {}),
        ("ciml", {"recompute_gates": False}),
        ("ciml", {"checkpoint_activations": True}),
    ],
)
def test_meta_count_equals_a_real_cpu_step(name, options):
    def build():
        torch.manual_seed(0)
        model = build_model(name, "brats2020", widths=(4, 8, 8))
        for key, value in options.items():
            setattr(model, key, value)
        return model

    meta = step_memory(build, "brats2020", PATCH, batch=1)
    real = step_memory(build, "brats2020", PATCH, batch=1, device="cpu")
    assert meta.saved_bytes == real.saved_bytes
    assert meta.weights_and_state_bytes == real.weights_and_state_bytes
    # live and peak bytes may differ by a few scalars
    assert abs(meta.live_after_forward_bytes - real.live_after_forward_bytes) < 1024
    assert abs(meta.peak_bytes - real.peak_bytes) < 1024
    assert meta.saved_bytes > 0 and meta.peak_bytes > meta.live_after_forward_bytes
    assert meta.optimizer_bytes == 2 * meta.parameter_bytes


def test_recomputed_gates_keep_only_their_noise_and_checkpointing_keeps_less():
    def memory(name, **options):
        def build():
            model = build_model(name, "brats2020", widths=(8, 16, 16))
            for key, value in options.items():
                setattr(model, key, value)
            return model

        return step_memory(build, "brats2020", (32, 32, 32), batch=1)

    segmentors = memory("ciml-nomsg").live_after_forward_bytes
    ciml = memory("ciml")
    # xi: 4 senders x the latent channels (the widths) x the voxels of each level, float32
    noise = 4 * 4 * (8 * 32**3 + 16 * 16**3 + 16 * 8**3)
    gates = ciml.live_after_forward_bytes - segmentors
    assert noise <= gates <= noise + ciml.parameter_bytes  # and the weights stacked for backward
    assert gates < 0.15 * segmentors
    assert memory("ciml", recompute_gates=False).live_after_forward_bytes > 1.5 * segmentors
    assert memory("ciml", checkpoint_activations=True).live_after_forward_bytes < 0.5 * segmentors


def test_shared_storages_count_once_and_weights_not_at_all():
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    with SavedTensorBytes(exclude=[w]) as saved:
        y = w * x
        z = (y * x).exp()  # x saved by both products; exp saves its output
    assert saved.nbytes == x.nbytes + z.nbytes
