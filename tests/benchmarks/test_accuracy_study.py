"""The pure parts of benchmarks/accuracy.py on hand-made numbers: plateau, bootstrap, tables, budget."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import accuracy

REGIONS = ("WT", "TC", "ET")


def make_run(key: str, seed: int, dice: dict[str, float], converged: bool = True) -> dict:
    """A finished run record whose every test case has the Dice ``dice[case]`` in every region."""
    cases = {case: {r: {"dice": value, "hd95": 5.0} for r in REGIONS} for case, value in dice.items()}
    mean = sum(dice.values()) / len(dice)
    return {
        "key": key,
        "seed": seed,
        "train_s": 10.0,
        "inference_s": 1.0,
        "inference_s_per_case": 0.5,
        "curve": [{"iteration": 10, "mean": mean, "dice": {r: mean for r in REGIONS}}],
        "plateau": {"converged": converged, "best": mean, "last_mean": mean, "tail_gain": 0.0, "reason": ""},
        "dice": {**{r: mean for r in REGIONS}, "mean": mean},
        "hd95": {r: 5.0 for r in REGIONS},
        "cases": cases,
    }


# ------------------------------------------------------------------------------------------ plateau


def test_a_flat_curve_has_converged() -> None:
    iterations = list(range(30, 301, 30))
    scores = [0.3, 0.6, 0.75, 0.8, 0.82, 0.83, 0.835, 0.834, 0.836, 0.835]
    result = accuracy.plateau(iterations, scores, 300)
    assert result["converged"] and result["reason"] == "plateaued"
    assert result["best"] == pytest.approx((0.835 + 0.834 + 0.836) / 3)  # the 3-mean ending at 270 (and 300)
    assert result["last_mean"] == pytest.approx((0.834 + 0.836 + 0.835) / 3)
    # the best 3-mean up to iteration 210 ends there: (0.82 + 0.83 + 0.835) / 3
    assert result["tail_gain"] == pytest.approx(0.835 - (0.82 + 0.83 + 0.835) / 3)


def test_a_flat_but_noisy_curve_has_converged_and_a_noisy_rising_one_has_not() -> None:
    """One low validation of a flat curve (3 validation cases are noisy) is no reason to call it unconverged;
    the same noise on a curve that keeps rising does not hide the rise."""
    iterations = list(range(50, 601, 50))
    flat = [0.19, 0.46, 0.45, 0.59, 0.62, 0.67, 0.66, 0.66, 0.67, 0.67, 0.64, 0.66]  # a pilot ensemble run
    assert accuracy.plateau(iterations, flat, 600)["converged"]
    rising = [0.28, 0.57, 0.59, 0.69, 0.67, 0.67, 0.70, 0.75, 0.74, 0.69, 0.75, 0.77]  # a pilot ciml run
    result = accuracy.plateau(iterations, rising, 600)
    assert not result["converged"] and "raised the best 3-mean by" in result["reason"]


def test_a_curve_still_rising_in_the_tail_has_not_converged() -> None:
    iterations = list(range(30, 301, 30))
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.72, 0.74, 0.76]
    result = accuracy.plateau(iterations, scores, 300)
    assert not result["converged"]
    assert result["tail_gain"] == pytest.approx(0.74 - 0.6)  # 3-means ending at 300 and at 210
    assert "raised the best 3-mean by 0.140" in result["reason"]


def test_a_curve_that_fell_from_its_best_has_not_converged_and_nan_counts_as_zero() -> None:
    iterations = [25, 50, 75, 100, 125]
    result = accuracy.plateau(iterations, [0.8, 0.9, 0.85, math.nan, 0.8], 125)
    assert not result["converged"] and "below the best" in result["reason"]
    assert result["last_mean"] == pytest.approx((0.85 + 0.0 + 0.8) / 3)
    assert result["best"] == pytest.approx((0.8 + 0.9 + 0.85) / 3)


def test_too_few_validations_never_count_as_converged() -> None:
    result = accuracy.plateau([2, 4], [0.5, 0.5], 4)
    assert not result["converged"] and "needs at least 4" in result["reason"]


def test_the_validation_curve_is_read_from_the_run_log() -> None:
    log = [
        {"iteration": 1, "loss": 1.0},
        {"iteration": 2, "loss": 0.9, "val/dice/WT": 0.5, "val/dice/TC": 0.4, "val/dice/ET": 0.3},
        {"event": "end"},
    ]
    log[1]["val/dice/mean"] = 0.4
    assert accuracy.validation_curve(log, REGIONS) == [
        {"iteration": 2, "mean": 0.4, "dice": {"WT": 0.5, "TC": 0.4, "ET": 0.3}}
    ]


# ---------------------------------------------------------------------------------------- bootstrap


def test_a_constant_difference_wins_with_a_zero_width_interval() -> None:
    cases = [f"c{i}" for i in range(10)]
    a = [make_run("ciml", s, {c: 0.5 + 0.01 * i + 0.1 for i, c in enumerate(cases)}) for s in (0, 1)]
    b = [make_run("joint", s, {c: 0.5 + 0.01 * i for i, c in enumerate(cases)}) for s in (0, 1)]
    result = accuracy.paired_difference(a, b, [*REGIONS, "mean"], samples=500)
    assert result["seeds"] == [0, 1]
    for key in (*REGIONS, "mean"):
        value = result["keys"][key]
        assert value["estimate"] == pytest.approx(0.1)
        assert value["low"] == pytest.approx(0.1) and value["high"] == pytest.approx(0.1)
        assert value["verdict"] == "wins" and value["cases"] == 10
    reverse = accuracy.paired_difference(b, a, ["mean"], samples=500)
    assert reverse["keys"]["mean"]["verdict"] == "loses"


def test_the_bootstrap_pairs_by_seed_and_averages_over_seeds_before_resampling() -> None:
    # seed 0: a is 0.2 above b on every case; seed 1: 0.2 below; seed 2 only a ran (ignored)
    a = [make_run("ciml", 0, {"x": 0.8, "y": 0.6}), make_run("ciml", 1, {"x": 0.4, "y": 0.2})]
    a.append(make_run("ciml", 2, {"x": 1.0, "y": 1.0}))
    b = [make_run("joint", 0, {"x": 0.6, "y": 0.4}), make_run("joint", 1, {"x": 0.6, "y": 0.4})]
    result = accuracy.paired_difference(a, b, ["mean"], samples=200)
    assert result["seeds"] == [0, 1]
    assert result["keys"]["mean"]["estimate"] == pytest.approx(0.0)
    assert result["keys"]["mean"]["verdict"] == "ties"


def test_symmetric_noise_ties_and_the_interval_repeats_with_its_seed() -> None:
    differences = [0.05, -0.04, 0.03, -0.06, 0.02, -0.01, 0.04, -0.03, 0.01, -0.02]
    a = [make_run("ciml", 0, {f"c{i}": 0.5 + d for i, d in enumerate(differences)})]
    b = [make_run("ensemble", 0, {f"c{i}": 0.5 for i in range(10)})]
    first = accuracy.paired_difference(a, b, ["mean"], samples=1000, seed=3)["keys"]["mean"]
    again = accuracy.paired_difference(a, b, ["mean"], samples=1000, seed=3)["keys"]["mean"]
    assert first == again
    assert first["low"] < first["estimate"] < first["high"] and first["verdict"] == "ties"


def test_cases_with_an_undefined_dice_are_left_out_and_no_shared_seed_is_nan() -> None:
    a = [make_run("ciml", 0, {"x": 0.9, "y": 0.8})]
    a[0]["cases"]["y"]["ET"]["dice"] = None  # as results.json stores NaN
    b = [make_run("joint", 0, {"x": 0.7, "y": 0.7})]
    result = accuracy.paired_difference(a, b, ["WT", "ET", "mean"], samples=100)
    assert result["keys"]["WT"]["cases"] == 2 and result["keys"]["ET"]["cases"] == 1
    assert result["keys"]["mean"]["estimate"] == pytest.approx(0.2)  # only case x has a mean
    none = accuracy.paired_difference(a, [make_run("joint", 5, {"x": 0.7})], ["mean"], samples=100)
    assert math.isnan(none["keys"]["mean"]["estimate"]) and accuracy.verdict(math.nan, 0.1) == "n/a"


# ------------------------------------------------------------------------------------------- tables


def hand_result() -> dict:
    settings = accuracy.PRESETS["cpu"]
    variants = [
        {**vars(v), "widths": list(v.widths), "params": 1000, "fwd_gflops": 0.5}
        for v in accuracy.study_variants(settings, ["ciml", "joint", "ensemble"])
    ]
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        runs.append(make_run("ciml", seed, {f"c{i}": 0.80 + shift + 0.01 * i for i in range(10)}))
        runs.append(make_run("joint", seed, {f"c{i}": 0.70 + shift + 0.01 * i for i in range(10)}))
        ensemble = {f"c{i}": 0.80 + shift + 0.01 * i for i in range(10)}
        runs.append(make_run("ensemble", seed, ensemble, converged=seed != 1))
    return {
        "environment": {
            "hardware": "x86_64, 2 CPUs",
            "cpu_model": "AMD EPYC",
            "cpu_count": 2,
            "torch": "2.x",
            "torch_threads": 1,
            "date": "2026-01-01T00:00:00+00:00",
            "git_commit": "abc1234",
        },
        "settings": {**vars(settings), "validate_every": settings.validate_every},
        "regions": list(REGIONS),
        "variants": variants,
        "robustness_variants": [],
        "estimate": {"total_s": 4800.0},
        "runs": runs,
        "robustness_runs": [],
        "robustness": {},
        "status": "complete",
        "total_s": 4700.0,
        "shapes": None,
    }


def test_study_tables_give_mean_and_std_over_seeds_and_the_verdicts() -> None:
    result = hand_result()
    accuracy.study_tables(result)
    rows = {row["key"]: row for row in result["models"]}
    assert list(rows) == ["ciml", "joint", "ensemble"]
    assert rows["ciml"]["dice"]["mean"] == pytest.approx(0.845 + 0.02)
    assert rows["ciml"]["dice_std"]["WT"] == pytest.approx(0.02)  # sample std of +0, +0.02, +0.04
    assert rows["ciml"]["converged"] and rows["ciml"]["converged_seeds"] == 3
    assert not rows["ensemble"]["converged"] and rows["ensemble"]["converged_seeds"] == 2
    comparisons = {(c["a"], c["b"]): c for c in result["comparisons"]}
    assert list(comparisons) == [("ciml", "ensemble"), ("ciml", "joint")]  # only pairs that both ran
    assert comparisons[("ciml", "joint")]["keys"]["mean"]["verdict"] == "wins"
    assert comparisons[("ciml", "joint")]["keys"]["mean"]["estimate"] == pytest.approx(0.1)
    assert comparisons[("ciml", "ensemble")]["keys"]["mean"]["verdict"] == "ties"
    assert comparisons[("ciml", "joint")]["converged"] and not comparisons[("ciml", "ensemble")]["converged"]

    markdown = accuracy.render_markdown(result)
    assert "commit abc1234" in markdown and "AMD EPYC (2 CPUs)" in markdown and "2026-01-01" in markdown
    assert "| ciml | 8/16/32 | 1,000 | 0.500 | 3 | 0.865 ± 0.020 |" in markdown
    assert "| ciml - joint | 3 | 10 | +0.100 [+0.100, +0.100] wins |" in markdown
    assert "| ciml - ensemble | 3 | 10 |" in markdown and "**ties** | no |" in markdown
    assert "| ensemble | 8/16/32 |" in markdown and "| no (2/3) |" in markdown
    assert "(estimated 80 min)" in markdown


def test_the_budget_adds_training_validation_prediction_and_robustness() -> None:
    settings = accuracy.PRESETS["cpu"]
    main = accuracy.study_variants(settings, ["ciml", "joint"])
    robust = accuracy.robustness_variants(settings)[:1]  # ciml+dropout
    timings = {
        "ciml": accuracy.Timing(1.0, 2.0),
        "joint": accuracy.Timing(0.1, 0.5),
        "ciml+dropout": accuracy.Timing(1.0, 2.0),
    }
    estimate = accuracy.budget(settings, main, robust, timings, validation_cases=2)
    ciml = estimate["models"]["ciml"]
    assert ciml["runs"] == 3
    assert ciml["train"] == pytest.approx(3 * 600 * 1.0)
    assert ciml["validation"] == pytest.approx(3 * 8 * 2 * 2.0)  # 8 validations of 2 cases per run
    assert ciml["prediction"] == pytest.approx(3 * 10 * (2.0 + accuracy.PREDICT_OVERHEAD_S))
    assert ciml["robustness"] == 0.0
    dropout = estimate["models"]["ciml+dropout"]
    assert dropout["runs"] == 1 and dropout["prediction"] == 0.0
    assert dropout["robustness"] == pytest.approx(15 * 10 * (2.0 + accuracy.SUBSET_OVERHEAD_S))
    phantoms = 24 * accuracy.PHANTOM_S
    runs = sum(row["total"] for row in estimate["models"].values())
    assert estimate["total_s"] == pytest.approx(phantoms + runs)
    assert estimate["jobs"] == 2 and estimate["wall_s"] < estimate["total_s"]
    assert "estimated total" in accuracy.budget_lines(estimate)[-1]
    assert "in 2 worker processes" in accuracy.budget_lines(estimate)[-1]


@pytest.mark.parametrize(
    ("seconds", "workers", "wall"),
    [
        ([5.0, 3.0, 3.0, 2.0, 2.0, 1.0], 2, 8.0),  # {5, 2, 1} and {3, 3, 2}
        ([5.0, 3.0, 3.0, 2.0, 2.0, 1.0], 1, 16.0),
        ([1.0, 1.0, 10.0], 2, 10.0),  # one long run is the floor, wherever it was listed
        ([4.0], 3, 4.0),
        ([], 2, 0.0),
    ],
)
def test_the_wall_time_hands_the_longest_runs_out_first(seconds: list, workers: int, wall: float) -> None:
    assert accuracy.makespan(seconds, workers) == pytest.approx(wall)


def test_runs_are_handed_out_longest_first_by_their_estimate() -> None:
    settings = accuracy.PRESETS["cpu"]
    variants = {v.key: v for v in accuracy.study_variants(settings, ["ciml", "joint"])}
    jobs = [
        accuracy.Job(i, 3, variants[key], 0, False) for i, key in enumerate(["joint", "ciml", "joint"], 1)
    ]
    estimate = {"models": {"ciml": {"total": 30.0, "runs": 3}, "joint": {"total": 6.0, "runs": 3}}}
    assert [job.index for job in accuracy.longest_first(jobs, estimate)] == [2, 1, 3]


# ----------------------------------------------------------------------------------------- settings


def test_every_model_gets_the_same_recipe_and_the_equal_flops_row_narrower_widths(tmp_path: Path) -> None:
    settings = accuracy.PRESETS["cpu"]
    variants = {v.key: v for v in accuracy.study_variants(settings, accuracy.ALL_MODELS)}
    assert variants["ciml-flops"].model == "ciml" and variants["ciml-flops"].label == "ciml (equal FLOPs)"
    widths, ciml_flops, joint_flops = accuracy.equal_flops_widths(settings.widths)
    assert variants["ciml-flops"].widths == widths and max(widths) < max(settings.widths)
    assert abs(ciml_flops - joint_flops) / joint_flops < 0.25
    trained = [settings.train_settings(v, 2, tmp_path, tmp_path / v.key, False) for v in variants.values()]
    for training in trained:
        assert (training.optimizer, training.lr, training.seed) == ("adamw", 1e-2, 2)
        assert training.iterations == 600 and training.patch_size == (24, 24, 24)
        assert training.augment == "mirror" and training.validate_every == 75
        assert training.target_spacing is None and training.modality_dropout == 0.0  # the phantoms' 3 mm
        assert training.memory_format == "auto"
    assert settings.inference().memory_format == "auto"
    assert settings.phantom_spacing_mm == 3.0
    robust = {v.key: v for v in accuracy.robustness_variants(settings)}
    assert set(robust) == {"ciml+dropout", "ensemble+dropout", "joint+dropout"}
    assert "zero-filled" in robust["joint+dropout"].label
    joint = settings.train_settings(robust["joint+dropout"], 0, tmp_path, tmp_path / "j", False)
    assert joint.modality_dropout == 0.5


def test_seeds_are_parsed_and_duplicates_refused(capsys: pytest.CaptureFixture) -> None:
    args = accuracy.parse_args(["--setting", "cpu", "--seeds", "3,4", "--models", "ciml,joint"])
    settings, models = accuracy.settings_from_args(args)
    assert settings.seeds == (3, 4) and models == ["ciml", "joint"]
    assert settings.robustness_models == ("ciml", "joint")  # the defaults among --models
    assert accuracy.main(["--quick", "--seeds", "1,1", "--out", "/nonexistent/x"]) == 1
    assert "--seeds" in capsys.readouterr().err
    assert accuracy.main(["--quick", "--seeds", "a", "--out", "/nonexistent/x"]) == 1
    assert "integers" in capsys.readouterr().err
    assert accuracy.settings_from_args(accuracy.parse_args(["--setting", "cpu"]))[0].jobs == 2
    assert accuracy.main(["--quick", "--jobs", "0", "--out", "/nonexistent/x"]) == 1
    assert "--jobs" in capsys.readouterr().err


def test_sizes_are_overridden_from_the_command_line_and_bad_ones_refused(
    capsys: pytest.CaptureFixture,
) -> None:
    args = ["--setting", "cpu", "--patch", "32", "--widths", "4,8,16", "--inference-patch", "32"]
    args += ["--validations", "5", "--test-cases", "4", "--iterations", "50", "--phantom-spacing", "4"]
    args += ["--memory-format", "contiguous"]
    settings, _ = accuracy.settings_from_args(accuracy.parse_args(args))
    assert (settings.patch, settings.inference_patch, settings.validations) == (32, 32, 5)
    assert (settings.phantom_spacing_mm, settings.memory_format) == (4.0, "contiguous")
    assert settings.widths == settings.segresnet_widths == (4, 8, 16)
    assert (settings.test_cases, settings.iterations, settings.validate_every) == (4, 50, 10)
    preset = accuracy.PRESETS["cpu"]
    kept = (settings.train_cases, settings.seeds, settings.lr)
    assert kept == (preset.train_cases, preset.seeds, preset.lr)
    for bad, named in (
        (["--patch", "15"], "patch 15"),  # the quick widths 4,8 halve once: a multiple of 2
        (["--inference-patch", "0"], "inference patch 0"),
        (["--widths", "4,x"], "--widths"),
        (["--widths", "0,8"], "--widths"),
    ):
        assert accuracy.main(["--quick", *bad, "--out", "/nonexistent/x"]) == 1
        assert named in capsys.readouterr().err, bad


def test_a_study_from_before_memory_formats_resumes_only_in_the_contiguous_layout(tmp_path: Path) -> None:
    """Studies committed before the setting existed trained contiguous; resuming them in another layout
    would mix float roundings in one table."""
    settings = accuracy.PRESETS["cpu"]
    stored = {**dataclasses.asdict(settings), "validate_every": settings.validate_every}
    del stored["memory_format"]
    previous = json.loads(json.dumps({"settings": stored}))
    contiguous = dataclasses.replace(settings, memory_format="contiguous")
    accuracy.check_resumable(previous, contiguous, tmp_path / "results.json")
    with pytest.raises(accuracy.CimlError, match="memory_format 'contiguous' there, 'auto' now"):
        accuracy.check_resumable(previous, settings, tmp_path / "results.json")
