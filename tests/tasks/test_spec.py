"""Task specs: presets load, validation names the offending key, assembly reproduces label maps."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from ciml.tasks import TaskSpecError, assemble_labels, load_task, preset_names

BRATS = {
    "name": "mine",
    "modalities": {"flair": "mri", "t1": "mri", "t1ce": "mri", "t2": "mri"},
    "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
    "decomposition": {"flair": ["WT"], "t1": ["TC"], "t2": ["WT", "TC"], "t1ce": ["TC", "ET"]},
    "assembly": [["WT", 2], ["TC", 1], ["ET", 4]],
}


def _with(**changes):
    spec = yaml.safe_load(yaml.safe_dump(BRATS))
    spec.update(changes)
    return spec


def test_every_preset_loads_and_round_trips() -> None:
    assert {"brats2020", "autopet", "hecktor2022", "shapecomposition"} <= set(preset_names())
    for name in preset_names():
        spec = load_task(name)
        assert load_task(spec.to_dict()) == spec


def test_brats_decomposition_is_the_papers() -> None:
    spec = load_task("brats2020")
    assert spec.owners("WT") == ("flair", "t2")
    assert spec.owners("TC") == ("t1", "t1ce", "t2")
    assert spec.owners("ET") == ("t1ce",)
    assert spec.label_values == (0, 1, 2, 4)


def test_assembly_reproduces_brats_labels() -> None:
    spec = load_task("brats2020")
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4], size=(7, 9, 5))
    assert np.array_equal(assemble_labels(spec, spec.labels_to_regions(labels)), labels)


def test_intersection_steps_paint_only_where_all_regions_are_on() -> None:
    spec = load_task("shapecomposition3")
    labels = np.array([0, 1, 2, 3, 4])
    assert np.array_equal(spec.regions_to_labels(spec.labels_to_regions(labels)), labels)


def test_user_yaml_file_loads(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(BRATS), encoding="utf-8")
    assert load_task(path).name == "mine"


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"decomposition": {"flair": ["WT"], "t1": ["TC"]}}, "regions.ET"),
        ({"decomposition": {"flair": ["WT"], "pet": ["TC", "ET"]}}, "decomposition.pet"),
        ({"decomposition": {"flair": ["WT", "XX"], "t1": ["TC", "ET"]}}, "decomposition.flair"),
        ({"assembly": [["WT", 2], ["TC", 1]]}, "assembly"),
        ({"assembly": [["WT", 2], ["TC", 1], ["ET", 7]]}, "assembly[2]"),
        ({"assembly": [["ET", 4], ["TC", 1], ["WT", 2]]}, "assembly"),
        ({"regions": {"WT": [1, 2, 4], "TC": [1, 1, 4], "ET": [4]}}, "regions.TC"),
        ({"regions": {"WT": [1, 2, 4], "TC": [4, 1], "ET": [1, 4]}}, "regions.ET"),
        ({"modalities": {"flair": "xray", "t1": "mri", "t1ce": "mri", "t2": "mri"}}, "modalities.flair"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_validation_errors_name_the_offending_key(changes, key) -> None:
    with pytest.raises(TaskSpecError, match=f"'{key}'".replace("[", r"\[").replace("]", r"\]")):
        load_task(_with(**changes))


def test_missing_key_and_unknown_name_are_clear(tmp_path) -> None:
    spec = dict(BRATS)
    del spec["regions"]
    with pytest.raises(TaskSpecError, match="'regions': missing required key"):
        load_task(spec)
    with pytest.raises(TaskSpecError, match="not a preset"):
        load_task("no-such-task")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed", encoding="utf-8")
    with pytest.raises(TaskSpecError, match="bad.yaml: not valid YAML"):
        load_task(bad)
