"""Background loading: worker processes give the batches the training process would make, in any order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ciml.data.preprocessing import PreprocessedCase
from ciml.models import MissingModalities
from ciml.tasks import load_task
from ciml.training import loading
from ciml.training.engine import PatchStream, TrainSettings
from ciml.training.loading import BackgroundBatches, default_workers

SPEC = load_task("brats2020")


def stream(rank: int = 0, **settings) -> PatchStream:
    """The engine's real batch stream (default augmentation, modality dropout) over two tiny cases."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(2):
        label = np.zeros((12, 12, 12), np.uint8)
        label[3:8, 4:9, 2:7] = 2
        label[4:6, 5:7, 3:5] = 4
        image = rng.normal(size=(4, 12, 12, 12)).astype(np.float32) + label
        cases.append(PreprocessedCase(f"case{i}", image, label, {}))
    values = {"patch_size": (8, 8, 8), "batch_size": 2, "modality_dropout": 0.5, "seed": 3, **settings}
    return PatchStream(
        cases,
        SPEC,
        TrainSettings(task="brats2020", data=Path(), out=Path(), **values),
        rank,
        MissingModalities.SKIP_SEGMENTOR,
    )


def assert_same(a, b) -> None:
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
    assert a.present == b.present


def test_two_workers_give_the_batches_of_the_training_process():
    batch_at = stream(augment_probability=(("rotation", 1.0), ("gamma", 1.0)))
    expected = [batch_at(k) for k in range(4)]
    assert any(b.present is not None for b in expected)  # modality dropout's names travel too
    with BackgroundBatches(batch_at, stop=4, workers=2) as batches:
        for k in range(4):
            assert_same(batches(k), expected[k])
        assert_same(batches(4), batch_at(4))  # past the stop: made in process


def test_the_batch_of_an_iteration_does_not_depend_on_the_earlier_ones_drawn():
    batch_at = stream()
    with BackgroundBatches(batch_at, stop=8, workers=2) as straight:
        drawn = [straight(k) for k in range(6)]
    with BackgroundBatches(batch_at, stop=8, workers=2) as resumed:  # a resume at iteration 4
        assert_same(resumed(4), drawn[4])
        assert_same(resumed(5), drawn[5])
        assert_same(resumed(2), drawn[2])  # a jump back restarts the workers there
        assert_same(resumed(3), drawn[3])
    in_process = BackgroundBatches(batch_at, stop=8, workers=0)
    assert_same(in_process(5), drawn[5])


def test_ranks_and_seeds_get_other_batches():
    a, b, c = stream(rank=0)(0), stream(rank=1)(0), stream(rank=0, seed=4)(0)
    assert not torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)


def test_no_augmentation_gives_the_plain_patches():
    plain = stream(augment="none")(0)
    assert plain.image.shape == (2, 4, 8, 8, 8) and plain.target.shape == (2, 3, 8, 8, 8)
    assert not torch.equal(plain.image, stream()(0).image)


def test_default_workers_leave_a_cpu_to_the_step_and_share_a_node(monkeypatch):
    monkeypatch.setattr(loading, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == loading.MAX_DEFAULT_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 3
    monkeypatch.setattr(loading, "usable_cpus", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers() == 0


def test_loading_leaves_the_global_torch_rng_alone():
    """Workers seed from the loader's own generator: the model's noise after a resume stays the same."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with BackgroundBatches(stream(augment="mirror"), stop=2, workers=1) as batches:
        batches(0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_errors_in_batches_reach_the_training_process(workers):
    def broken(iteration):
        raise ValueError(f"cannot make batch {iteration}")

    with (
        BackgroundBatches(broken, stop=3, workers=workers) as batches,
        pytest.raises(ValueError, match="cannot make batch 0"),
    ):
        batches(0)
