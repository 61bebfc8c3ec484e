"""Shared test settings: one torch thread so the suite behaves on busy 2-core machines."""

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors gain nothing from more; avoids oversubscription


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one thread after every test: some (benchmark smoke tests) set their own count.

    On a busy 2-core machine two spinning threads ran these tests ~30x slower.
    """
    yield
    torch.set_num_threads(1)
