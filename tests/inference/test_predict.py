"""Prediction: geometry round trip, outputs on disk, missing modalities, TTA and fold ensembling.

Everything is tiny (20x24x16 volumes, widths (4, 8), 16^3 patches) and generated in tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import ciml.files
from ciml.cli import main
from ciml.data.cases import Case
from ciml.data.preprocessing import ModalityNormalization, PreprocessingPlan, plan_preprocessing
from ciml.errors import CimlError, ParameterError
from ciml.evaluation.robustness import evaluate_robustness
from ciml.inference import InferenceSettings, Predictor, predict_case, predict_cases, writing
from ciml.inference.predict import run_postprocessing
from ciml.inferers import Postprocessing, RegionRule, mirror_axes_combinations
from ciml.models import SegmentationNetwork, SegmentationOutput, build_model
from ciml.runs import RunFolder, save_checkpoint
from ciml.tasks import TaskSpec, load_task

SHAPE = (20, 24, 16)
# Voxel axes i, j, k run along -A (1 mm), +S (1.5 mm) and -R (3 mm): flipped, permuted, anisotropic.
FLIPPED = np.array([[0, 0, -3.0, 30.0], [-1.0, 0, 0, 20.0], [0, 1.5, 0, -10.0], [0, 0, 0, 1]])
BODY = (slice(3, 17), slice(4, 21), slice(2, 14))
TUMOUR = (slice(6, 12), slice(8, 15), slice(5, 10))
PATCH = (16, 16, 16)
MODALITIES = ("flair", "t1", "t1ce", "t2")


@pytest.fixture
def spec() -> TaskSpec:
    """brats2020's decomposition alone: without its fallback owners some subsets leave regions orphaned."""
    return dataclasses.replace(load_task("brats2020"), fallback_owners={})


def _save(array: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(array, FLIPPED)
    image.set_qform(FLIPPED, code=1)  # scanner
    image.set_sform(FLIPPED, code=2)  # aligned: codes that must survive
    nib.save(image, str(path))
    return path


def write_brats(root: Path, n_cases: int = 2) -> list[Case]:
    """BraTS layout; FLAIR is 100 in TUMOUR, ~10 elsewhere in BODY, 0 outside; label 2/1/4 in TUMOUR."""
    cases = []
    for n in range(n_cases):
        case_id = f"case{n}"
        folder = root / case_id
        folder.mkdir(parents=True)
        rng = np.random.default_rng(n)
        images = {}
        for i, modality in enumerate(MODALITIES):
            values = np.zeros(SHAPE, np.float32)
            values[BODY] = rng.normal(10 + 5 * i, 1.0, values[BODY].shape)
            values[TUMOUR] += 90.0 if modality == "flair" else rng.normal(20, 5, values[TUMOUR].shape)
            images[modality] = _save(values, folder / f"{case_id}_{modality}.nii.gz")
        label = np.zeros(SHAPE, np.uint8)
        label[TUMOUR] = 2
        label[7:10, 9:12, 6:8] = 1
        label[8, 10, 7] = 4
        cases.append(Case(case_id, images, _save(label, folder / f"{case_id}_seg.nii.gz")))
    return cases


def simple_plan(spec: TaskSpec) -> PreprocessingPlan:
    """A plan for in-memory tests that never preprocess files."""
    norms = {m: ModalityNormalization("zscore_nonzero") for m in spec.modalities}
    return PreprocessingPlan(dict(spec.modalities), (1.0, 1.0, 1.0), norms)


def cpu_predictor(spec: TaskSpec, models: list[nn.Module], plan=None, **settings) -> Predictor:
    """A predictor on the CPU in float32 (``auto`` would pick CUDA and bf16 where there is a GPU)."""
    return Predictor(
        spec, plan or simple_plan(spec), models, PATCH, InferenceSettings(device="cpu", **settings)
    )


def trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero message projections and settled running statistics, so that messages matter."""
    torch.manual_seed(seed)
    for gate in getattr(model, "gates", {}).values():
        torch.nn.init.normal_(gate.project.weight, std=0.5)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, len(model.modalities), *PATCH))
    return model.eval()


def tiny_model(spec: TaskSpec, name: str = "ciml", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained_like(build_model(name, spec, widths=(4, 8), spatial_dims=3), seed)


def make_run(folder: Path, spec: TaskSpec, cases: list[Case], name: str = "ciml", folds=(0,)) -> RunFolder:
    """A run folder as training writes it: run.json and fold_K/checkpoint_last.pt."""
    run = RunFolder(folder)
    for fold in folds:
        model = tiny_model(spec, name, seed=fold)
        save_checkpoint({"model": model.state_dict(), "config": model.config}, run.checkpoint(fold, "last"))
    run.write_info(
        {
            "task": spec.to_dict(),
            "model": model.config,
            "preprocessing": plan_preprocessing(cases, spec).to_dict(),
            "patch_size": list(PATCH),
            "data": {"path": str(folder), "layout": "brats"},
            "train": {},
        }
    )
    return run


class FlairThreshold(SegmentationNetwork):
    """WT wherever the normalised FLAIR is clearly positive: a network whose answer is known per voxel."""

    def __init__(self) -> None:
        super().__init__(("flair", "t1", "t1ce", "t2"))

    owners = property(lambda self: {r: ("fake",) for r in ("WT", "TC", "ET")})
    primary_inputs = property(lambda self: {"fake": self.modalities})
    size_divisor = property(lambda self: 1)

    def forward(self, x: torch.Tensor, present=None, **_: object) -> SegmentationOutput:
        wt = 20.0 * x[:, :1] - 1.0
        off = torch.full_like(wt, -20.0)
        return SegmentationOutput(
            logits={"fake": torch.cat([wt, off, off], dim=1)},
            owned={"fake": ("WT", "TC", "ET")},
            kl=x.new_zeros(()),
        )


def forward_probabilities(model: nn.Module, x: torch.Tensor, spec: TaskSpec, present=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, present=present).region_probabilities(spec.region_names)


# ------------------------------------------------------------------------------------------ geometry


def test_prediction_comes_back_on_the_inputs_own_grid_with_its_header(tmp_path, spec):
    cases = write_brats(tmp_path / "data", n_cases=1)
    predictor = cpu_predictor(spec, [FlairThreshold()], plan_preprocessing(cases, spec))
    [result] = predict_cases(predictor, cases, tmp_path / "out", progress=False)
    out, source = nib.load(result.outputs[0]), nib.load(cases[0].images["flair"])
    assert out.shape == source.shape == SHAPE
    np.testing.assert_allclose(out.affine, source.affine)
    assert out.get_data_dtype() == np.uint8
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    np.testing.assert_allclose(out.get_qform(), source.get_qform())
    expected = np.zeros(SHAPE, np.uint8)
    expected[TUMOUR] = 2  # WT alone is painted as edema
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


# -------------------------------------------------------------------------------------- files on disk


def test_cli_predicts_writes_atomically_and_never_overwrites_without_the_flag(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data")
    run = make_run(tmp_path / "run", spec, cases)
    out = tmp_path / "out"
    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--output", str(out)]
    assert main([*args, "--save-probabilities", "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == [  # no temporary file left behind
        "case0.nii.gz",
        "case0_probabilities.nii.gz",
        "case1.nii.gz",
        "case1_probabilities.nii.gz",
    ]
    for case in cases:
        label, source = nib.load(out / f"{case.case_id}.nii.gz"), nib.load(case.images["flair"])
        assert label.shape == SHAPE
        np.testing.assert_allclose(label.affine, source.affine)
        values = np.asarray(label.dataobj)
        assert set(np.unique(values)) <= set(spec.label_values)
        probabilities = nib.load(out / f"{case.case_id}_probabilities.nii.gz")
        assert probabilities.shape == (*SHAPE, 3) and probabilities.get_data_dtype() == np.float32
        p = np.moveaxis(np.asarray(probabilities.dataobj), -1, 0)
        assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
        np.testing.assert_array_equal(values, spec.regions_to_labels(p > 0.5))
    assert "case0:" in capsys.readouterr().out  # per-case time

    finished = (out / "case0.nii.gz").read_bytes()
    (out / "case1.nii.gz").write_bytes(b"not replaced")
    assert main(args) == 0
    assert (out / "case0.nii.gz").read_bytes() == finished
    assert (out / "case1.nii.gz").read_bytes() == b"not replaced"
    assert "skipped" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert nib.load(out / "case1.nii.gz").shape == SHAPE


def test_failed_write_leaves_neither_output_nor_temporary_file(tmp_path, monkeypatch):
    def refuse(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ciml.files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        writing.write_label_map(np.zeros((4, 4, 4), np.uint8), tmp_path / "c.nii.gz", np.eye(4), None)
    assert list(tmp_path.iterdir()) == []


def test_missing_modality_files_are_never_read(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data", n_cases=1)
    run = make_run(tmp_path / "run", spec, cases)
    cases[0].images["t1"].unlink()
    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "all")]) == 1
    assert "case0_t1.nii.gz" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "sub"), "--modalities", "flair,t1ce,t2"]) == 0
    assert nib.load(tmp_path / "sub" / "case0.nii.gz").shape == SHAPE
    files = [f"{m}={cases[0].images[m]}" for m in ("flair", "t1ce")]
    single = ["predict", "--run", str(run.path), "--files", *files, "--case-id", "one", "--output"]
    assert main([*single, str(tmp_path / "files")]) == 0
    assert nib.load(tmp_path / "files" / "one.nii.gz").shape == SHAPE


# -------------------------------------------------------------------------------- missing modalities


def test_subset_prediction_is_the_forward_without_them_and_with_their_gates_closed(spec):
    model = tiny_model(spec)
    predictor = cpu_predictor(spec, [model])
    subset = ("flair", "t1ce")
    x = torch.randn(1, 4, *PATCH)  # the window covers the whole volume: no blending
    predicted = torch.from_numpy(predictor.probabilities(x[0].numpy(), subset))
    plain = forward_probabilities(model, x, spec, present=subset)[0]
    torch.testing.assert_close(predicted, plain, atol=1e-5, rtol=1e-5)

    absent = {"t1", "t2"}
    for gate_name, gate in model.gates.items():
        if gate_name.split("<-")[1] in absent:
            gate.forward = lambda receiver, sender, closed=False, noise=None, g=gate: type(g).forward(
                g, receiver, sender, True, noise
            )
    with torch.no_grad(), model.per_segmentor():  # gate by gate, so the patched forwards run
        out = model(x)  # absent senders still compute, but their gates pass nothing
    kept = SegmentationOutput(
        logits={m: out.logits[m] for m in subset}, owned={m: out.owned[m] for m in subset}, kl=out.kl
    )
    torch.testing.assert_close(plain, kept.region_probabilities(spec.region_names)[0], atol=1e-5, rtol=1e-5)
    full = torch.from_numpy(cpu_predictor(spec, [tiny_model(spec)]).probabilities(x[0].numpy()))
    assert not torch.allclose(full[0], predicted[0], atol=1e-4)  # WT without t2 is flair's alone


def test_unpredictable_regions_are_named_with_their_missing_owners(spec):
    predictor = cpu_predictor(spec, [tiny_model(spec)])
    with pytest.raises(CimlError, match=r"TC \(owners t1, t1ce, t2: all missing\); ET \(owners t1ce"):
        predictor.check(("flair",))
    partial = predictor.probabilities(np.random.rand(4, *PATCH).astype(np.float32), ("flair",), partial=True)
    assert np.isfinite(partial[0]).all() and np.isnan(partial[1:]).all()  # n/a, not an empty mask


def test_stacked_networks_refuse_missing_modalities_with_their_own_message(tmp_path, spec):
    joint = cpu_predictor(spec, [tiny_model(spec, "joint")])
    joint.check(MODALITIES)  # complete: fine
    with pytest.raises(CimlError, match="joint model needs every modality and cannot run without t2"):
        joint.check(("flair", "t1", "t1ce"))
    with pytest.raises(CimlError, match="cannot run without"):
        predict_cases(joint, [Case("c", {})], tmp_path / "out", modalities=("flair",), progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ TTA and ensembling


def test_tta_averages_the_flipped_forwards(spec):
    model = tiny_model(spec)
    x = torch.randn(1, 4, *PATCH)
    combos = mirror_axes_combinations(3)
    assert len(set(combos)) == 8 and combos[0] == ()
    manual = sum(
        torch.flip(forward_probabilities(model, torch.flip(x, axes), spec), axes) for axes in combos
    ) / len(combos)
    tta = cpu_predictor(spec, [model], tta=True)
    predicted = torch.from_numpy(tta.probabilities(x[0].numpy()))
    torch.testing.assert_close(predicted, manual[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(predicted, forward_probabilities(model, x, spec)[0], atol=1e-4)


def test_folds_are_ensembled_by_averaging_probabilities(spec):
    a, b = tiny_model(spec, seed=0), tiny_model(spec, seed=1)
    image = np.random.default_rng(0).normal(size=(4, 20, 16, 24)).astype(np.float32)  # several windows

    def probabilities(models: list[nn.Module]) -> np.ndarray:
        return cpu_predictor(spec, models).probabilities(image)

    np.testing.assert_allclose(
        probabilities([a, b]), (probabilities([a]) + probabilities([b])) / 2, atol=1e-6
    )


def test_bad_settings_are_refused_with_the_parameter_name_and_the_cli_names_the_flag(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data", n_cases=1)
    run = make_run(tmp_path / "run", spec, cases)
    with pytest.raises(ParameterError, match=r"^step: must be in \(0, 1\]") as refused:
        Predictor.from_run(run, InferenceSettings(step=0.0, device="cpu"))
    assert refused.value.parameter == "step"
    with pytest.raises(CimlError, match="checkpoint_best.pt: checkpoint not found"):
        Predictor.from_run(run, InferenceSettings(checkpoint="best", device="cpu"))
    with pytest.raises(ParameterError, match="^modalities: unknown pd"):
        Predictor.from_run(run, InferenceSettings(device="cpu")).present_modalities(["flair", "pd"])
    common = [
        "predict",
        "--run",
        str(run.path),
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*common, "--step", "0", "--device", "cpu"]) == 1
    assert "error: --step: must be in (0, 1]" in capsys.readouterr().err
    assert main([*common, "--modalities", "flair,pd", "--device", "cpu"]) == 1
    assert "error: --modalities: unknown pd" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- postprocessing


def test_the_runs_postprocessing_is_applied_on_the_inputs_own_grid_unless_turned_off(tmp_path, spec):
    cases = write_brats(tmp_path / "data", n_cases=1)
    plan = plan_preprocessing(cases, spec)
    tumour = np.zeros(SHAPE, np.uint8)
    tumour[TUMOUR] = 2  # FlairThreshold's WT: 210 voxels of 4.5 mm^3 (945 mm^3) on the input's grid

    def labels(rule: Postprocessing, name: str, **settings) -> np.ndarray:
        predictor = Predictor(
            spec, plan, [FlairThreshold()], PATCH, InferenceSettings(device="cpu", **settings), None, rule
        )
        result = predict_case(predictor, cases[0], tmp_path / name, record_modalities=True)
        return np.asarray(nib.load(result.outputs[0]).dataobj)

    in_voxels = Postprocessing({"WT": RegionRule(min_volume=211)})  # counts as they are: 210 < 211
    assert not labels(in_voxels, "voxels").any()
    sidecar = json.loads((tmp_path / "voxels" / "case0_modalities.json").read_text(encoding="utf-8"))
    assert Postprocessing.from_dict(sidecar["postprocessing"]) == in_voxels
    in_mm = Postprocessing({"WT": RegionRule(min_volume=211)}, spacing=(1.0, 1.0, 1.0))  # 211 mm^3 < 945
    np.testing.assert_array_equal(labels(in_mm, "mm"), tumour)
    np.testing.assert_array_equal(labels(in_voxels, "off", postprocessing=False), tumour)
    assert "postprocessing" not in json.loads((tmp_path / "off" / "case0_modalities.json").read_text())


def test_cli_predict_applies_the_stored_rule_and_no_postprocessing_turns_it_off(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data", n_cases=1)
    run = make_run(tmp_path / "run", spec, cases)
    rule = Postprocessing({"WT": RegionRule(min_volume=10**9)})  # removes every tumour
    ciml.files.write_json_atomic(run.postprocessing_path(0), {"rule": rule.to_dict()})
    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "on")]) == 0
    assert (
        f"postprocessing (chosen on the run's validation folds): {rule.describe()}" in capsys.readouterr().out
    )
    assert not np.asarray(nib.load(tmp_path / "on" / "case0.nii.gz").dataobj).any()
    assert (
        main([*args, "--output", str(tmp_path / "off"), "--no-postprocessing", "--save-probabilities"]) == 0
    )
    assert "postprocessing" not in capsys.readouterr().out
    p = np.moveaxis(np.asarray(nib.load(tmp_path / "off" / "case0_probabilities.nii.gz").dataobj), -1, 0)
    values = np.asarray(nib.load(tmp_path / "off" / "case0.nii.gz").dataobj)
    np.testing.assert_array_equal(values, spec.regions_to_labels(p > 0.5))


def test_folds_that_disagree_apply_the_first_folds_rule_with_a_note(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    small_et = Postprocessing({"ET": RegionRule(min_volume=8)}, (1.0, 1.0, 1.0))
    for fold, rule in ((0, small_et), (1, small_et), (2, Postprocessing(spacing=(1.0, 1.0, 1.0)))):
        ciml.files.write_json_atomic(run.postprocessing_path(fold), {"rule": rule.to_dict()})
    assert run_postprocessing(run, [0, 1]) == small_et and capsys.readouterr().out == ""
    assert run_postprocessing(run, [2, 0]).is_identity
    note = capsys.readouterr().out
    assert "folds chose different postprocessing (fold 2: none; fold 0: ET: removed under 8" in note
    assert "applying fold 2's" in note
    assert run_postprocessing(run, [3]) == Postprocessing()  # a fold from before: none
    assert run_postprocessing(run, [2, 3]).is_identity and capsys.readouterr().out == ""  # both none
    run.postprocessing_path(1).write_text('{"rule": {"regions": {"ET": {"min_volume": -1}}}}')
    with pytest.raises(CimlError, match=r"fold_1/postprocessing.json: rule: 'regions.ET': min_volume"):
        run_postprocessing(run, [1])


# ------------------------------------------------------------------------------------------- tiles


def test_prediction_uses_the_tile_the_run_chose_unless_one_is_given(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data", n_cases=1)
    run = make_run(tmp_path / "run", spec, cases, folds=(0, 1))
    ciml.files.write_json_atomic(run.tile_path(0), {"tile": [32, 32, 16]})

    def tile(folds, patch=None) -> tuple:
        predictor = Predictor.from_run(run, InferenceSettings(device="cpu", folds=folds, patch_size=patch))
        return predictor.patch_size, predictor.tile_source

    assert tile((0,)) == ((32, 32, 16), "chosen on fold 0's validation cases")
    assert tile((0,), (24, 24, 24)) == ((24, 24, 24), "given")
    # fold 1 was trained without a choice: alone it predicts with the training patch; listed first, its
    # choice (none) is used, with a note
    assert tile((1,)) == (PATCH, "the training patch") and capsys.readouterr().out == ""
    assert tile((1, 0)) == (PATCH, "the training patch")
    out = capsys.readouterr().out
    assert "folds chose different tiles (fold 1: the training patch; fold 0: 32x32x16); using fold 1's" in out

    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "out"), "--folds", "0", "--allow-missing"]) == 0
    assert "tile 32x32x16 (chosen on fold 0's validation cases)" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "out" / "case0_modalities.json").read_text(encoding="utf-8"))
    assert sidecar["tile"] == {"size": [32, 32, 16], "source": "chosen on fold 0's validation cases"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"fold_0/tile.json: not valid JSON"),
        ('{"tile": [32, 32]}', r"fold_0/tile.json: 'tile' must be 3 positive integers, got \[32, 32\]"),
        ('{"tile": [32, 0, 16]}', r"'tile' must be 3 positive integers"),
        ('{"size": [32, 32, 16]}', r"'tile' must be 3 positive integers, got None"),
        ('{"tile": [31, 32, 16]}', r"fold_0/tile.json: 'tile' must be 3 positive integers divisible by 2"),
    ],
)
def test_a_malformed_tile_file_is_named(tmp_path, spec, content, message):
    cases = write_brats(tmp_path / "data", n_cases=1)
    run = make_run(tmp_path / "run", spec, cases)
    run.tile_path(0).write_text(content, encoding="utf-8")
    with pytest.raises(CimlError, match=message):
        Predictor.from_run(run, InferenceSettings(device="cpu"))


# ---------------------------------------------------------------------------------- fallback owners


@pytest.fixture
def fallback_spec(spec) -> TaskSpec:
    return load_task({**spec.to_dict(), "fallback_owners": {"ET": ["t1"], "WT": ["t1"]}})


def test_orphaned_regions_with_a_present_fallback_owner_are_predicted(fallback_spec):
    predictor = cpu_predictor(fallback_spec, [tiny_model(fallback_spec)])
    assert predictor.fallback_owners() == {"WT": ("t1",), "ET": ("t1",)}
    assert predictor.unpredictable_regions(("flair", "t1")) == {}  # ET: t1 stands in for t1ce
    predictor.check(("t1",))  # WT and ET from t1's fallback channels, TC its own
    with pytest.raises(CimlError, match=r"ET \(owners t1ce; fallback owners t1: all missing\)"):
        predictor.check(("flair", "t2"))
    x = np.random.default_rng(0).normal(size=(4, *PATCH)).astype(np.float32)
    predicted = predictor.probabilities(x, ("flair", "t1"))
    assert np.isfinite(predicted).all()
    expected = forward_probabilities(
        predictor.models[0], torch.from_numpy(x)[None], fallback_spec, ("flair", "t1")
    )
    np.testing.assert_allclose(predicted, expected[0].numpy(), atol=1e-5)


def test_cli_predicts_a_subset_through_fallback_owners_and_robustness_scores_it(
    tmp_path, spec, fallback_spec, capsys
):
    cases = write_brats(tmp_path / "data", n_cases=1)
    args = ["predict", "--input", str(tmp_path / "data"), "--device", "cpu", "--modalities", "flair,t1"]
    plain = make_run(tmp_path / "plain", spec, cases)
    assert main([*args, "--run", str(plain.path), "--output", str(tmp_path / "refused")]) == 1
    assert "ET (owners t1ce: all missing)" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "case0.nii.gz").exists()

    run = make_run(tmp_path / "fallback", fallback_spec, cases)
    assert main([*args, "--run", str(run.path), "--output", str(tmp_path / "out")]) == 0
    assert nib.load(tmp_path / "out" / "case0.nii.gz").shape == SHAPE

    settings = InferenceSettings(device="cpu")
    [row] = evaluate_robustness(
        run, tmp_path / "data", settings=settings, subsets=[("flair", "t1")], progress=False
    ).rows
    assert row.predictable == ("WT", "TC", "ET") and not np.isnan(row.dice["ET"])
    [row] = evaluate_robustness(
        plain, tmp_path / "data", settings=settings, subsets=[("flair", "t1")], progress=False
    ).rows
    assert row.predictable == ("WT", "TC") and np.isnan(row.dice["ET"])  # n/a without a fallback owner


# ---------------------------------------------------------------------- case folders with files missing


def test_a_missing_file_stops_with_the_file_and_the_modalities_to_use(tmp_path, capsys):
    preset = load_task("brats2020")  # fallback owners: every subset predicts every region
    cases = write_brats(tmp_path / "data", n_cases=2)
    cases[1].images["t1"].unlink()
    run = make_run(tmp_path / "run", preset, cases)
    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cases[1].images["t1"]) in err
    assert "1 of 2 case(s)" in err and "--modalities flair,t1ce,t2," in err and "--allow-missing" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    assert main([*args, "--output", str(tmp_path / "out"), "--allow-missing"]) == 0
    assert "case1: " in capsys.readouterr().out  # per-case line names the modalities used
    for case, used, missing in (("case0", MODALITIES, []), ("case1", ("flair", "t1ce", "t2"), ["t1"])):
        assert nib.load(tmp_path / "out" / f"{case}.nii.gz").shape == SHAPE
        record = json.loads((tmp_path / "out" / f"{case}_modalities.json").read_text(encoding="utf-8"))
        tile = {"size": list(PATCH), "source": "the training patch"}
        assert record == {"case_id": case, "modalities": list(used), "missing": missing, "tile": tile}


def test_when_no_common_subset_predicts_every_region_allow_missing_is_the_way(tmp_path, spec, capsys):
    cases = write_brats(tmp_path / "data", n_cases=2)
    cases[1].images["t1ce"].unlink()  # without a fallback owner, ET needs t1ce
    run = make_run(tmp_path / "run", spec, cases)
    args = ["predict", "--run", str(run.path), "--input", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no one --modalities fits every case" in err and "case1_t1ce" in err
    assert main([*args, "--output", str(tmp_path / "out"), "--allow-missing"]) == 1
    assert "case case1: without t1ce these regions are not predictable: ET" in capsys.readouterr().err
    assert not (tmp_path / "out" / "case0.nii.gz").exists()  # refused before the first case
