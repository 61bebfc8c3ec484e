"""Smoke test of benchmarks/speed.py: the quick setting runs end to end and writes a sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speed

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
NETWORKS = ("joint", "ciml", "ciml (per-segmentor)", "dynunet", "segresnet")
MEASURED = ("params", "fwd_gflops", "ms_per_step", "peak_mem_mb", "inference_s")


@pytest.mark.slow
def test_quick_run_writes_every_row_with_ratios_to_joint(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["network"]: row for row in result["rows"]}
    assert tuple(rows) == NETWORKS
    for name, row in rows.items():
        for key in MEASURED:
            assert row[key] > 0, (name, key, row[key])
        assert row["note"] == "", (name, row["note"])
    assert all(rows["joint"][f"{m}_ratio"] == 1.0 for m in ("step", "mem", "inference"))
    assert rows["ciml"]["step_ratio"] == pytest.approx(
        rows["ciml"]["ms_per_step"] / rows["joint"]["ms_per_step"]
    )
    # the width search matched CIML's forward FLOPs to the joint U-Net's
    assert rows["ciml"]["fwd_gflops"] == pytest.approx(rows["joint"]["fwd_gflops"], rel=0.25)
    assert rows["ciml (per-segmentor)"]["fwd_gflops"] == rows["ciml"]["fwd_gflops"]  # same model
    assert result["complete"] is True
    assert result["settings"]["patch"] == 16 and result["environment"]["torch"] == torch.__version__
    assert "| joint |" in proc.stdout and not list(tmp_path.glob(".*.tmp"))


def test_existing_output_is_refused_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.json"
    out.write_text("keep me", encoding="utf-8")
    assert speed.main(["--quick", "--device", "cpu", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "--overwrite" in error and str(out) in error
    assert out.read_text(encoding="utf-8") == "keep me"


def test_live_tensor_bytes_counts_the_peak_of_tensors_alive_together() -> None:
    with speed.LiveTensorBytes([]) as counter:
        a = torch.ones(1024)  # 4 KiB
        b = a + 1  # 8 KiB alive together
        del a, b
        c = torch.ones(256)  # 1 KiB, after both were freed
    assert counter.peak == 8192
    assert counter.live == c.numel() * 4
