"""How many threads torch may use: the CPUs this process may run on, not the machine's.

torch sizes its intra-op (OpenMP) pool from the machine, which ignores a container's CPU quota, and two
processes that each spin one thread per core on the same cores slow each other down several times
(OpenMP threads busy-wait for each other; one descheduled thread stalls the whole parallel region). Here
the count is, in order:

1. ``OMP_NUM_THREADS`` when it is set (its first number; ``torchrun`` sets 1 per process);
2. else the CPUs this process may use: its affinity mask (``taskset``, ``numactl``, Slurm, Docker
   ``--cpuset-cpus``), capped by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``; Docker
   ``--cpus``, Kubernetes CPU limits), rounded down, at least 1.

:func:`configure_threads` is called once by the ``ciml`` command before any work.

Example:
    >>> choose_threads({}, affinity=8, quota=2.5)
    ThreadChoice(threads=2, source='cgroup', affinity=8, quota=2.5)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ciml.errors import CimlError

CGROUP_ROOT = Path("/sys/fs/cgroup")

#: What ``ciml --help`` and the README say about running several jobs on one machine.
SEVERAL_JOBS_HELP = (
    "Threads: ciml gives torch one thread per CPU this process may use (its affinity mask, capped by a "
    "cgroup CPU quota), or OMP_NUM_THREADS when set. To run several jobs on one machine, give each its "
    "own CPUs, e.g. `taskset -c 0-3 ciml train ...` beside `taskset -c 4-7 ciml train ...`, or set "
    "OMP_NUM_THREADS so that the jobs' threads add up to the cores: two torch processes that each use "
    "every core slow each other down several times."
)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen and why.

    Attributes:
        threads: the count.
        source: ``OMP_NUM_THREADS``, ``affinity`` or ``cgroup`` (the quota was the tighter limit).
        affinity: CPUs in the affinity mask.
        quota: CPUs' worth of time the cgroup grants, None without a quota.
    """

    threads: int
    source: str
    affinity: int
    quota: float | None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all the machine's where the OS has no masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _cgroup_folders(root: Path, proc_cgroup: Path) -> tuple[list[Path], list[Path]]:
    """(v2 folders, v1 cpu-controller folders) that may hold this process's CPU quota.

    Each cgroup and its ancestors (a parent's quota binds too), under every place its hierarchy may be
    mounted; inside a container the cgroup namespace shows our own cgroup as the root, which the
    ancestors include.
    """
    v2: list[Path] = []
    v1: list[Path] = []
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        parts = [p for p in path.split("/") if p]
        if hierarchy == "0" and not controllers:
            bases, found = [root, root / "unified"], v2  # unified: hybrid v1/v2 hosts
        elif "cpu" in controllers.split(","):
            bases, found = [root / controllers, root / "cpu", root / "cpu,cpuacct"], v1
        else:
            continue
        found += [base.joinpath(*parts[:depth]) for base in bases for depth in range(len(parts), -1, -1)]
    return v2, v1


def _quota_v2(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        return None
    if quota == "max":
        return None
    return int(quota) / int(period or 100000)


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time a cgroup quota grants this process (the tightest of its cgroups), or None."""
    v2, v1 = _cgroup_folders(root, proc_cgroup)
    quotas = [q for q in map(_quota_v2, dict.fromkeys(v2)) if q is not None]
    quotas += [q for q in map(_quota_v1, dict.fromkeys(v1)) if q is not None]
    return min(quotas) if quotas else None


def _omp_threads(value: str) -> int:
    """The first number of ``OMP_NUM_THREADS`` (it may list one per nesting level: ``4,2``)."""
    first = value.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise CimlError(f"OMP_NUM_THREADS={value!r}: expected a positive number of threads, e.g. 1")
    return int(first)


def choose_threads(environ: Mapping[str, str], affinity: int, quota: float | None) -> ThreadChoice:
    """The intra-op thread count for a process with this environment, affinity and CPU quota."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(_omp_threads(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS", affinity, quota)
    if quota is not None and math.floor(quota) < affinity:
        return ThreadChoice(max(1, math.floor(quota)), "cgroup", affinity, quota)
    return ThreadChoice(max(1, affinity), "affinity", affinity, quota)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup quota (OMP_NUM_THREADS aside)."""
    return choose_threads({}, affinity_cpus(), cgroup_cpu_quota()).threads


def configure_threads(environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """Set torch's intra-op threads for this process (see the module's docstring); returns the choice."""
    choice = choose_threads(os.environ if environ is None else environ, affinity_cpus(), cgroup_cpu_quota())
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
