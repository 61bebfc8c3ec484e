"""Information maps add up to the loss's KL term, and `ciml explain` writes them on the case's own grid.

Everything is tiny (16^3 inputs, 20x24x16 volumes, widths 4/8/16) and generated in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ciml.cli import main
from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import plan_preprocessing, preprocess_case
from ciml.errors import CimlError, ParameterError
from ciml.explain import (
    Explainer,
    explain_cases,
    information_maps,
    information_maps_of,
    information_totals,
    upsample_replicate,
)
from ciml.explain.information import parse_gate_key
from ciml.inference import InferenceSettings
from ciml.losses import CIMLLoss
from ciml.models import build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import load_task

SHAPE = (20, 24, 16)
# Voxel axes run along -A (1 mm), +S (1.5 mm) and -R (2 mm): the maps must come back on this grid.
AFFINE = np.array([[0, 0, -2.0, 30.0], [-1.0, 0, 0, 20.0], [0, 1.5, 0, -10.0], [0, 0, 0, 1]])
TUMOUR = (slice(6, 12), slice(8, 15), slice(5, 10))
MODALITIES = ("flair", "t1", "t1ce", "t2")

CPU = InferenceSettings(device="cpu")


def trained_like(name: str = "ciml", widths=(4, 8, 16), seed: int = 0):
    """A BraTS network with non-zero messages and settled gate statistics (what training leaves)."""
    torch.manual_seed(seed)
    model = build_model(name, load_task("brats2020"), widths=widths, spatial_dims=3)
    for gate in getattr(model, "gates", {}).values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 4, 16, 16, 16))
    return model.eval()


# ------------------------------------------------------------------------------------- invariants


def test_level_maps_average_to_the_kl_terms_and_messages_sum_to_the_loss_kl():
    model = trained_like()
    x = torch.randn(1, 4, 16, 16, 16)
    output, maps = information_maps_of(model, x)
    assert set(output.kl_maps) == set(output.kl_terms) and len(output.kl_maps) == 3 * 4 * 3
    for key, level_map in output.kl_maps.items():
        level = parse_gate_key(key)[0]
        assert level_map.shape == (1, 1, *[16 // 2**level] * 3)
        assert float(level_map.mean()) == pytest.approx(float(output.kl_terms[key]), rel=1e-6)
    assert sum(float(t) for t in output.kl_terms.values()) == pytest.approx(float(output.kl), rel=1e-6)

    totals = information_totals(output)
    assert len(maps) == 12 and set(maps) == set(totals)  # 4 receivers x 3 senders, levels summed
    for name, values in maps.items():
        assert values.shape == (1, 1, 16, 16, 16) and float(values.min()) >= 0.0
        levels = [k for k in output.kl_terms if k.split("/")[1] == name]
        assert len(levels) == 3
        expected = sum(float(output.kl_terms[k]) for k in levels)
        assert float(values.mean()) == pytest.approx(expected, rel=1e-5)
        assert totals[name] == pytest.approx(expected, rel=1e-6)
    reported = CIMLLoss(["WT", "TC", "ET"], beta=1e-3)(output, torch.zeros(1, 3, 16, 16, 16)).as_dict()["kl"]
    assert sum(float(v.mean()) for v in maps.values()) == pytest.approx(reported, rel=1e-5)


def test_closed_gates_send_nothing_and_networks_without_gates_have_no_maps():
    model = trained_like()
    with torch.no_grad():
        closed = model(torch.randn(1, 4, 16, 16, 16), return_maps=True, close_gates=True)
    maps = information_maps(closed, (16, 16, 16))
    assert all(float(v.abs().max()) < 1e-4 for v in maps.values())  # lambda = 0: no information, KL 0
    with torch.no_grad():
        joint = trained_like("joint")(torch.randn(1, 4, 16, 16, 16), return_maps=True)
    assert information_maps(joint, (16, 16, 16)) == {} and information_totals(joint) == {}


def test_replication_keeps_the_mean_and_refuses_non_integer_factors():
    coarse = torch.rand(1, 1, 2, 3, 4)
    fine = upsample_replicate(coarse, (4, 6, 8))
    assert float(fine.mean()) == pytest.approx(float(coarse.mean()))
    assert torch.equal(fine[0, 0, ::2, ::2, ::2], coarse[0, 0])
    with pytest.raises(ValueError, match="integer multiple"):
        upsample_replicate(coarse, (5, 6, 8))
    with pytest.raises(ValueError, match="gate key"):
        parse_gate_key("flair<-t1")


# ------------------------------------------------------------------------------------ on disk


def write_cases(root: Path, n_cases: int = 2) -> Path:
    """BraTS layout on AFFINE: a bright tumour (labels 2 > 1 > 4 inwards) in every modality."""
    for n in range(n_cases):
        folder = root / f"case{n}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(n)
        label = np.zeros(SHAPE, np.uint8)
        label[TUMOUR] = 2
        label[7:11, 9:14, 6:9] = 1
        label[8:10, 10:12, 7] = 4
        for i, modality in enumerate(MODALITIES):
            values = rng.normal(100 + 10 * i, 5, SHAPE).astype(np.float32)
            values[label > 0] += 40 + 10 * i
            nib.save(nib.Nifti1Image(values, AFFINE), folder / f"case{n}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), folder / f"case{n}_seg.nii.gz")
    return root


def make_run(folder: Path, data: Path, name: str = "ciml") -> RunFolder:
    """A run folder as training writes it (run.json, fold_0/checkpoint_last.pt), weights trained-like."""
    spec = load_task("brats2020")
    model = trained_like(name)
    run = RunFolder(folder)
    save_checkpoint({"model": model.state_dict(), "config": model.config}, run.checkpoint(0, "last"))
    run.write_info(
        {
            "task": spec.to_dict(),
            "model": model.config,
            "preprocessing": plan_preprocessing(read_dataset(data, spec), spec).to_dict(),
            "patch_size": [16, 16, 16],
            "data": {"path": str(data), "layout": "brats"},
            "train": {},
        }
    )
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("brats"))


def test_explain_writes_maps_on_the_cases_grid_that_keep_the_information(dataset, tmp_path):
    run = make_run(tmp_path / "run", dataset)
    [summary] = explain_cases(run, ["case0"], tmp_path / "out", settings=CPU, progress=False)
    folder = tmp_path / "out" / "case0"
    assert summary["extent"] == "case" and summary["method"] == "gradcam" and summary["level"] == 0
    info_files = sorted(folder.glob("info_*_from_*.nii.gz"))
    gradcam_files = sorted(folder.glob("gradcam_*_*_from_*.nii.gz"))
    assert len(info_files) == 12 and len(gradcam_files) == 6 * 4  # 6 segmentor:region pairs x 4 modalities
    assert {"gradcam.png", "information.png", "contributions.png"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob(".*"))  # no temporary file left behind
    source = nib.load(dataset / "case0" / "case0_flair.nii.gz")
    for path in info_files[:2] + gradcam_files[:2]:
        image = nib.load(path)
        assert image.shape == SHAPE and image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, source.affine)
        assert np.asarray(image.dataobj).min() >= 0
    written = json.loads((folder / "explanation.json").read_text(encoding="utf-8"))
    assert written["information_nats_per_voxel"] == pytest.approx(summary["information_nats_per_voxel"])
    assert sum(written["information_nats_per_voxel"].values()) == pytest.approx(written["kl_nats_per_voxel"])
    # this grid needs no resampling, so each written map is the preprocessed one, reoriented: same mean
    name = "flair<-t2"
    values = np.asarray(nib.load(folder / "info_flair_from_t2.nii.gz").dataobj)
    assert float(values.mean()) == pytest.approx(written["information_nats_per_voxel"][name], rel=1e-4)
    for contribution in written["contributions"]:
        assert sum(contribution["fractions"].values()) == pytest.approx(1.0)

    with pytest.raises(CimlError, match="already exists"):
        explain_cases(run, ["case0"], tmp_path / "out", settings=CPU, progress=False)
    with pytest.raises(CimlError, match="no case nope"):
        explain_cases(run, ["nope"], tmp_path / "other", settings=CPU, progress=False)


def test_a_case_over_the_budget_is_explained_in_a_window_around_the_tumour(dataset, tmp_path):
    run = make_run(tmp_path / "run", dataset)
    explainer = Explainer.from_run(run, CPU)
    case = read_dataset(dataset, explainer.spec)[1]
    pre = preprocess_case(case, explainer.spec, explainer.plan)
    explanation = explainer.explain_preprocessed(pre, max_voxels=1000)
    start, end = explanation.window
    assert explanation.extent == "patch"
    assert tuple(e - s for s, e in zip(start, end, strict=True)) == (16, 16, 16)
    assert "window of the run's patch size" in explanation.notes[0]
    outside = np.ones(pre.image.shape[1:], bool)
    outside[tuple(slice(s, e) for s, e in zip(start, end, strict=True))] = False
    for values in [*explanation.information.values(), *explanation.gradcam.contributions[0].maps.values()]:
        values = np.asarray(values)
        assert values.shape == pre.image.shape[1:] and not values[outside].any()
    assert np.isfinite(explanation.probabilities).all()
    whole = explainer.explain_preprocessed(pre, extent="case")
    assert whole.extent == "case" and whole.window == ((0, 0, 0), pre.image.shape[1:])
    with pytest.raises(ParameterError, match="^extent: must be one of"):
        explainer.explain_preprocessed(pre, extent="everything")


def test_cli_explains_a_joint_run_and_says_how(dataset, tmp_path, capsys):
    run = make_run(tmp_path / "run", dataset, name="joint")
    args = ["explain", "--run", str(run.path), "--case", "case1", "--out", str(tmp_path / "out")]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "input_gradient" in printed and "joint:WT" in printed
    summary = json.loads((tmp_path / "out" / "case1" / "explanation.json").read_text(encoding="utf-8"))
    assert any("input-gradient x input" in note for note in summary["notes"])
    assert not list((tmp_path / "out" / "case1").glob("info_*"))  # no gates, no information maps
    assert main([*args, "--device", "cpu"]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
