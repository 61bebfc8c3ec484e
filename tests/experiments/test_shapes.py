"""`ciml shapes` end to end at toy size: table, results.json, figure, and no silent overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ciml.cli import main

TINY = [
    "--iterations", "3", "--batch-size", "4", "--size", "32", "32", "--widths", "4", "8",
    "--validation-samples", "8", "--no-progress",
]  # fmt: skip


@pytest.mark.slow
def test_shapes_writes_table_json_and_figure(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["shapes", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for method in ("ciml", "ciml-beta0", "joint", "ensemble", "unimodal m0", "unimodal m1"):
        assert f"| {method}" in printed
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(results["methods"]) == {"ciml", "ciml-beta0", "joint", "ensemble"}
    ciml = results["methods"]["ciml"]
    assert 0.0 <= ciml["composite_dice"] <= 1.0
    assert set(ciml["selectivity"]) == {"m0<-m1"}
    assert set(ciml["silence"]) == {"m1<-m0"}
    assert set(results["methods"]["ensemble"]["unimodal_dice"]) == {"m0", "m1"}
    assert results["methods"]["joint"]["selectivity"] == {}
    figure = np.asarray(Image.open(out / "examples.png").convert("L"), dtype=float)
    assert figure.std() > 10  # an actual picture, not a blank canvas


def test_shapes_refuses_to_overwrite_without_flag(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("{}", encoding="utf-8")
    assert main(["shapes", "--out", str(out), *TINY]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "results.json").read_text(encoding="utf-8") == "{}"


def test_shapes_rejects_a_task_that_is_not_shapecomposition(tmp_path, capsys) -> None:
    assert main(["shapes", "--out", str(tmp_path / "x"), "--task", "brats2020", *TINY]) == 1
    assert "brats2020" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shapes", "--methods", "nonsense"])
