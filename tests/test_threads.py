"""Thread count: OMP_NUM_THREADS wins, else the affinity mask capped by a cgroup quota; the CLI applies it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ciml.cli import build_parser, main
from ciml.errors import CimlError
from ciml.threads import cgroup_cpu_quota, choose_threads, configure_threads


def test_omp_num_threads_wins_over_affinity_and_quota() -> None:
    assert choose_threads({"OMP_NUM_THREADS": "3"}, affinity=8, quota=1.0).threads == 3
    assert choose_threads({"OMP_NUM_THREADS": "4,2"}, affinity=8, quota=None).threads == 4  # nested levels
    choice = choose_threads({"OMP_NUM_THREADS": " "}, affinity=8, quota=None)  # blank: not set
    assert (choice.threads, choice.source) == (8, "affinity")
    for bad in ("0", "two", "-1"):
        with pytest.raises(CimlError, match="OMP_NUM_THREADS"):
            choose_threads({"OMP_NUM_THREADS": bad}, affinity=8, quota=None)


def test_a_cgroup_quota_caps_the_affinity_rounded_down_and_at_least_one() -> None:
    choice = choose_threads({}, affinity=8, quota=2.5)
    assert (choice.threads, choice.source) == (2, "cgroup")
    assert choose_threads({}, affinity=8, quota=0.5).threads == 1
    choice = choose_threads({}, affinity=2, quota=4.0)
    assert (choice.threads, choice.source) == (2, "affinity")
    assert choose_threads({}, affinity=3, quota=None).threads == 3


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/jobs/mine\n")
    root = tmp_path / "cgroup"
    _write(root / "jobs" / "mine" / "cpu.max", "max 100000\n")
    _write(root / "jobs" / "cpu.max", "150000 100000\n")
    _write(root / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    _write(root / "jobs" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_v2_inside_a_container_namespace(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/\n")
    _write(tmp_path / "cgroup" / "cpu.max", "300000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", proc) == pytest.approx(3.0)


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / "docker" / "abc"
    _write(folder / "cpu.cfs_quota_us", "250000\n")
    _write(folder / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", proc) == pytest.approx(2.5)
    _write(folder / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cgroup_cpu_quota(tmp_path / "cgroup", proc) is None
    assert cgroup_cpu_quota(tmp_path / "cgroup", tmp_path / "missing") is None


def test_configure_threads_sets_torch_and_the_cli_applies_it(monkeypatch, capsys) -> None:
    assert configure_threads({"OMP_NUM_THREADS": "2"}).threads == 2 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["tasks"]) == 0 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert main(["tasks"]) == 1
    assert "OMP_NUM_THREADS='lots'" in capsys.readouterr().err


def test_help_says_how_to_run_several_jobs_on_one_machine() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "several jobs on one machine" in text and "taskset" in text and "OMP_NUM_THREADS" in text
