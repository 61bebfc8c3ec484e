"""Background batch loading: DataLoader worker processes make the next batches while the step runs.

The training stream stays a function of the iteration (``batch_at(iteration)``): workers compute the
batches of iterations ``start, start + 1, ...`` with that same function, in order, so what a worker
makes is exactly what the training process would have made, whatever the number of workers, and a
resumed run (or any jump) simply restarts the workers at the asked iteration.

Example:
    >>> batches = BackgroundBatches(stream, stop=1000, workers=2)  # doctest: +SKIP
    >>> batch = batches(0)  # iteration 0's batch; workers are already making 1, 2, ...  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ciml.threads import usable_cpus
from ciml.training.loop import Batch

#: The most worker processes :func:`default_workers` picks (nnU-Net uses 12 on large GPU nodes).
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Loader processes per training process: the CPUs of this process's share minus one, at most 8.

    The CPUs are those :func:`ciml.threads.usable_cpus` finds (affinity mask and cgroup quota).

    Under ``torchrun`` the CPUs are shared by the ``LOCAL_WORLD_SIZE`` processes of the node; a
    process with a single CPU loads in process (0).
    """
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() // local_processes - 1))


class _Iterations(Dataset):
    """Map-style dataset whose item ``k`` is the batch of iteration ``k`` (as plain tensors and names)."""

    def __init__(self, batch_at: Callable[[int], Batch]) -> None:
        self.batch_at = batch_at

    def __getitem__(self, iteration: int):
        batch = self.batch_at(iteration)
        return batch.image, batch.target, batch.present


class BackgroundBatches:
    """``batch_at`` served by ``workers`` DataLoader processes that prefetch the following iterations.

    Args:
        batch_at: the batch of an iteration, deterministic in it (picklable where processes spawn).
        stop: the first iteration never asked for (the run's total); later ones are made in process.
        workers: loader processes; 0 calls ``batch_at`` in the training process.
        pin_memory: page-lock batches for fast copies to a GPU (CUDA runs).
        prefetch: batches each worker makes ahead.

    ``wait_seconds`` adds up the time the training process waited for batches (in process: the time
    spent making them).
    """

    def __init__(
        self,
        batch_at: Callable[[int], Batch],
        stop: int,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.batch_at, self.stop, self.workers = batch_at, stop, workers
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.wait_seconds = 0.0
        self._iterator: Iterator | None = None
        self._next = 0

    def __call__(self, iteration: int) -> Batch:
        started = time.perf_counter()
        try:
            if self.workers == 0 or iteration >= self.stop:
                return self.batch_at(iteration)
            if self._iterator is None or iteration != self._next:
                self._start(iteration)
            image, target, present = next(self._iterator)
            self._next += 1
            return Batch(image, target, None if present is None else tuple(present))
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _start(self, iteration: int) -> None:
        self.close()
        loader = DataLoader(
            _Iterations(self.batch_at),
            batch_size=None,  # an item is already a batch
            sampler=range(iteration, self.stop),
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch,
            # its own generator: the workers' base seed must not draw from the global torch RNG, which
            # the model's sampling uses and checkpoints restore (a draw would shift a resumed run's noise)
            generator=torch.Generator().manual_seed(0),
        )
        self._iterator, self._next = iter(loader), iteration

    def close(self) -> None:
        """Stop the workers (dropping the last reference to the DataLoader iterator shuts them down)."""
        self._iterator = None

    def __enter__(self) -> BackgroundBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
