"""`ciml demo` end to end at toy size: phantom -> check -> train -> predict -> evaluate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ciml.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    args = [
        "demo", "--out", str(out), "--train-cases", "3", "--test-cases", "1", "--iterations", "2",
        "--patch", "16", "16", "16", "--inference-patch", "32", "32", "32", "--widths", "4", "8",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "5/6 evaluating" in printed and "WT" in printed and "report.html" in printed
    summary = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert set(summary["timings_s"]) == {"phantom", "check", "train", "predict", "evaluate", "report"}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "WT" in html
    prediction = nib.load(out / "predictions" / "BraTS20_Training_901.nii.gz")
    reference = nib.load(out / "data" / "test" / "BraTS20_Training_901" / "BraTS20_Training_901_seg.nii.gz")
    assert prediction.shape == reference.shape
    np.testing.assert_allclose(prediction.affine, reference.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 4}
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert "summary" in metrics
    assert main(args) == 1  # a second run refuses the non-empty folder
