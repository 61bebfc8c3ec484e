"""Memory-aware planning: the planned step fits the budget, explicit sizes that cannot fit are refused."""

from __future__ import annotations

import json

import pytest
import torch

from ciml.cli import main
from ciml.errors import ParameterError
from ciml.models import build_model
from ciml.training.memory import step_memory
from ciml.training.planning import (
    MAX_COUNTS,
    NNUNET_WIDTHS,
    forward_flops,
    match_widths,
    plan_training,
    smaller_patches,
)

from .test_engine import dataset, write_tiny_brats  # noqa: F401  (the module's tiny dataset fixture)

MB = 2**20
TINY = (4, 8)


def test_the_plan_shrinks_the_patch_until_the_exact_count_fits() -> None:
    # ciml at widths 4/8, float32, batch 2: about 72 MB at 32^3, 9 MB at 16^3
    plan = plan_training(
        "ciml", "brats2020", 40 * MB, widths=TINY, start_patch=(32, 32, 32), dtype=torch.float32
    )
    assert plan.batch_size == 2 and plan.widths == TINY
    assert max(plan.patch_size) < 32 and all(e % 2 == 0 for e in plan.patch_size)
    assert plan.peak_bytes <= 0.9 * 40 * MB and plan.dtype == "float32" and "shrunk" in plan.reason
    exact = step_memory(
        lambda: build_model("ciml", "brats2020", widths=TINY), "brats2020", plan.patch_size, 2
    )
    assert plan.peak_bytes == exact.peak_bytes
    # one step larger (the previous candidate) would not have fitted
    larger = smaller_patches((32, 32, 32), 2, 4)
    previous = larger[larger.index(plan.patch_size) - 1]
    over = step_memory(lambda: build_model("ciml", "brats2020", widths=TINY), "brats2020", previous, 2)
    assert over.peak_bytes > 0.9 * 40 * MB


def _linear(calls: list) -> object:
    """A stand-in for the exact count: 1 MB of weights and state, 100 bytes per batch voxel."""

    def count(patch, batch):
        calls.append((patch, batch))
        return MB + 100 * batch * patch[0] * patch[1] * patch[2], MB

    return count


def test_the_batch_drops_to_1_only_when_no_patch_fits_at_2() -> None:
    calls: list = []
    # at the smallest patch (32^3 for 5 levels), batch 2 needs 7.6 MB, batch 1 4.3 MB: plan 1
    budget = int((MB + 100 * 32**3 * 1.5) / 0.9)
    plan = plan_training("joint", "brats2020", budget, count=_linear(calls))
    assert plan.batch_size == 1 and plan.widths == (32, 64, 128, 256, 320) and "batch 1" in plan.reason
    assert plan.peak_bytes <= 0.9 * budget and plan.patch_size[0] % 16 == 0
    assert len(calls) <= MAX_COUNTS
    roomy = plan_training("joint", "brats2020", 10 * 2**30, count=_linear([]))
    assert (roomy.patch_size, roomy.batch_size, roomy.reason) == ((128, 128, 128), 2, "defaults fit")


def test_an_explicit_patch_that_cannot_fit_is_refused_naming_one_that_would() -> None:
    with pytest.raises(ParameterError) as error:
        plan_training("joint", "brats2020", 60 * MB, patch_size=(128, 128, 128), count=_linear([]))
    assert error.value.parameter == "patch_size"
    assert "would fit at batch 2" in str(error.value)
    named = tuple(int(e) for e in str(error.value).split("patch_size ")[-1].split(" would")[0].split())
    fits = plan_training("joint", "brats2020", 60 * MB, patch_size=named, batch_size=2, count=_linear([]))
    assert fits.patch_size == named and fits.reason == "as chosen"
    with pytest.raises(ParameterError) as error:
        plan_training("joint", "brats2020", MB, count=_linear([]))
    assert error.value.parameter == "gpu_memory" and "checkpoint_activations" in error.value.problem


def test_default_ciml_widths_have_the_joint_unets_forward_flops() -> None:
    shape = (1, 4, 32, 32, 32)  # the smallest patch 5 levels take; FLOPs scale exactly with voxels
    widths, ciml, joint = match_widths("brats2020", NNUNET_WIDTHS, shape)
    assert abs(ciml - joint) / joint < 0.03 and widths == (16, 32, 56, 112, 144)  # as at 128^3
    recount = forward_flops(lambda: build_model("ciml", "brats2020", widths=widths), shape)
    assert recount == ciml


def _train(data, out, *extra: str) -> list[str]:
    return [
        "train", "--task", "brats2020", "--data", str(data), "--out", str(out), "--device", "cpu",
        "--widths", "4", "8", "--no-progress", "--iterations", "1", "--workers", "0", *extra,
    ]  # fmt: skip


def test_ciml_train_plans_to_gpu_memory_and_records_the_plan(dataset, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "run"
    # 20 MB: 32^3 (the task's 128^3 shrunk) does not fit at batch 2; about 20^3 does
    assert main(_train(dataset, out, "--gpu-memory", str(20 / 1024))) == 0
    printed = capsys.readouterr().out
    assert "plan: patch " in printed and "estimated peak" in printed
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    plan = info["plan"]
    assert plan["patch_size"] == info["patch_size"] and max(plan["patch_size"]) < 32
    assert plan["widths"] == [4, 8] == info["model"]["widths"] and plan["batch_size"] == 2
    assert plan["peak_bytes"] <= 0.9 * plan["budget_bytes"] and info["train"]["gpu_memory"] == 20 / 1024


def test_an_explicit_patch_over_gpu_memory_is_refused_before_anything_is_written(
    dataset,  # noqa: F811
    tmp_path,
    capsys,
) -> None:
    out = tmp_path / "run"
    args = _train(dataset, out, "--gpu-memory", str(20 / 1024), "--patch", "32", "32", "32")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--patch: 32 32 32 needs an estimated" in err and "would fit at batch 2" in err
    assert "Traceback" not in err and not out.exists()


def test_a_resumed_planned_run_keeps_its_recorded_sizes(dataset, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--gpu-memory", str(20 / 1024))) == 0
    first = json.loads((out / "run.json").read_text(encoding="utf-8"))["plan"]
    # a larger budget would plan a larger patch; the run keeps the one it was made with
    assert main([*_train(dataset, out, "--gpu-memory", "1"), "--iterations", "2", "--resume"]) == 0
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert len(plans) == 2 and plans[1].startswith(f"plan: patch {'x'.join(map(str, first['patch_size']))}, ")
