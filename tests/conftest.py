"""Shared test settings: one torch thread so the suite behaves on busy 2-core machines.

``CIML_TEST_THREADS=N`` runs the suite with N threads instead: results must not depend on the count
(the order of floating-point sums does), and that is how to check it.
"""

import os

import pytest
import torch

THREADS = int(os.environ.get("CIML_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)  # tiny tensors gain nothing from more; avoids oversubscription
# `ciml` commands run in-process (tests call ciml.cli.main) set their threads from OMP_NUM_THREADS, and
# subprocesses inherit it: the same count everywhere unless a test says otherwise
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def same_torch_threads():
    """Back to the suite's count after every test: some (benchmark smoke tests) set their own.

    On a busy 2-core machine two spinning threads ran these tests ~30x slower.
    """
    yield
    torch.set_num_threads(THREADS)
