"""Augmentation: labels move with the image, intensity transforms leave labels alone, seeds repeat patches."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from ciml.data.augmentation import (
    AUGMENTATIONS,
    DEFAULT_AUGMENTATIONS,
    SPATIAL,
    Augmentation,
    augmentation_config,
    parse_selection,
)
from ciml.data.sampling import sample_patches
from ciml.errors import ParameterError
from ciml.tasks import TaskSpec, TaskSpecError, load_task

INTENSITY = tuple(n for n in AUGMENTATIONS if n not in SPATIAL)
SHAPE = (20, 20, 20)


#: Elastic deformation strong enough to move a marker visibly in a 20^3 patch.
STRONG = {"elastic": {"sigma": [4, 5], "magnitude": [300, 400]}}


def only(name: str, p: float = 1.0) -> Augmentation:
    """One transform, always applied."""
    return Augmentation({name: {**augmentation_config(name)[name], **STRONG.get(name, {}), "p": p}})


def marker_patch() -> tuple[np.ndarray, np.ndarray]:
    """Two modalities and two region masks: a ball off the centre, drawn into both modalities too."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1)
    ball = np.linalg.norm(grid - np.array([6.0, 12.0, 9.0]), axis=-1) < 4
    noise = np.random.default_rng(0).normal(0, 0.01, (2, *SHAPE))
    image = (np.stack([ball * 1.0, ball * 2.0]) + noise).astype(np.float32)
    target = np.stack([ball, np.zeros_like(ball)]).astype(np.uint8)
    return image, target


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask)).mean(axis=1)


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_transforms_move_the_labels_with_the_image(name):
    image, target = marker_patch()
    moved = 0
    for seed in range(3):
        img, tgt = only(name)(image.copy(), target.copy(), np.random.default_rng(seed))
        assert tgt.dtype == np.uint8 and set(np.unique(tgt)) <= {0, 1}  # nearest: masks stay binary
        assert not tgt[1].any()
        marker = img[0] > 0.5
        assert tgt[0].sum() > 50 and marker.sum() > 50
        np.testing.assert_allclose(centroid(marker), centroid(tgt[0]), atol=0.75)
        overlap = 2 * (marker & (tgt[0] > 0)).sum() / (marker.sum() + tgt[0].sum())
        assert overlap > 0.85
        moved += np.linalg.norm(centroid(tgt[0]) - centroid(target[0])) > 0.5
    assert moved >= 2  # the transform really moved the marker (not vacuously aligned)


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_never_touch_labels(name):
    image, target = marker_patch()
    img, tgt = only(name)(image.copy(), target.copy(), np.random.default_rng(1))
    np.testing.assert_array_equal(tgt, target)
    assert img.shape == image.shape and img.dtype == np.float32
    assert not np.allclose(img, image)


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_transform_repeats_with_its_seed(name):
    image, target = marker_patch()
    augment = only(name)
    a = augment(image.copy(), target.copy(), np.random.default_rng(5))
    augment(image.copy(), target.copy(), np.random.default_rng(6))  # state in between must not matter
    b = only(name)(image.copy(), target.copy(), np.random.default_rng(5))
    c = augment(image.copy(), target.copy(), np.random.default_rng(5))
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_the_default_chain_varies_with_the_seed_and_repeats_with_it():
    cases = [marker_patch()]
    augment = Augmentation(augmentation_config("default"))
    first = sample_patches(cases, (16, 16, 16), 4, np.random.default_rng(0), augment=augment)
    again = sample_patches(cases, (16, 16, 16), 4, np.random.default_rng(0), augment=augment)
    other = sample_patches(cases, (16, 16, 16), 4, np.random.default_rng(1), augment=augment)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_label_maps_without_a_channel_axis_keep_their_shape_and_values():
    image, target = marker_patch()
    label = (target[0] * 4).astype(np.uint8)
    _, moved = only("rotation")(image, label, np.random.default_rng(0))
    assert moved.shape == label.shape and set(np.unique(moved)) == {0, 4}


def test_defaults_are_nnunets_probabilities():
    config = augmentation_config()
    assert tuple(config) == DEFAULT_AUGMENTATIONS and "elastic" not in config
    expected = {
        "rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15,
        "low_resolution": 0.25, "gamma_inverted": 0.1, "gamma": 0.3, "mirror": 0.5,
    }  # fmt: skip
    assert {n: c["p"] for n, c in config.items()} == expected
    assert config["rotation"]["degrees"] == 30 and config["scaling"]["range"] == [0.7, 1.4]
    assert config["gamma"]["range"] == [0.7, 1.5] and config["low_resolution"]["zoom"] == [0.5, 1.0]


def test_selections_and_probability_overrides():
    assert augmentation_config("none") == {} and augmentation_config(False) == {}
    assert list(augmentation_config("mirror,rotation")) == ["rotation", "mirror"]  # run order
    assert list(augmentation_config("default,elastic")) == [
        "rotation",
        "scaling",
        "elastic",
        *INTENSITY,
        "mirror",
    ]
    config = augmentation_config(["default"], [("rotation", 0.5), ("gamma", 0.0)])
    assert config["rotation"]["p"] == 0.5 and config["gamma"]["p"] == 0.0
    assert Augmentation(augmentation_config("gamma", {"gamma": 0.0})).compose is None  # p 0: off
    image, target = marker_patch()
    assert Augmentation({})(image, target, np.random.default_rng(0)) == (image, target)


def test_unknown_names_and_bad_overrides_are_refused_with_the_valid_ones():
    with pytest.raises(
        ParameterError, match=r"^augment: unknown augmentation 'rotate'; valid: default, none, "
    ):
        augmentation_config("rotate,mirror")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_selection("none,mirror")
    with pytest.raises(
        ParameterError, match=r"augment_probability: 'elastic' is not selected.*default,elastic"
    ):
        augmentation_config("default", {"elastic": 0.2})
    with pytest.raises(ParameterError, match=r"augment_probability: rotation.p must be a probability"):
        augmentation_config("default", {"rotation": 1.5})


def spec_with(augmentation) -> TaskSpec:
    data = load_task("brats2020").to_dict()
    data["training"] = {"augmentation": augmentation}
    return TaskSpec.from_dict(yaml.safe_load(yaml.safe_dump(data)), source="spec.yaml")


def test_the_task_spec_selects_and_tunes_and_the_settings_override_its_selection():
    spec = spec_with({"transforms": "default,elastic", "rotation": {"p": 0.4, "degrees": 15}, "gamma": 0.5})
    assert spec.to_dict()["training"]["augmentation"]["rotation"] == {"p": 0.4, "degrees": 15}
    config = augmentation_config(spec=spec)
    assert "elastic" in config and config["rotation"] == {"p": 0.4, "degrees": 15.0}
    assert config["gamma"]["p"] == 0.5
    assert augmentation_config("rotation", spec=spec) == {"rotation": {"p": 0.4, "degrees": 15.0}}
    assert augmentation_config("none", spec=spec) == {}
    assert list(augmentation_config(spec=spec_with("mirror"))) == ["mirror"]
    assert augmentation_config(spec=spec_with(["none"])) == {}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("rotate", r"unknown augmentation 'rotate'; valid: default, none"),
        ({"rotate": 0.2}, r"unknown augmentation 'rotate'; valid: rotation"),
        ({"transforms": "mirror", "gamma": 0.3}, r"gamma has parameters but is not selected"),
        ({"rotation": {"angle": 10}}, r"rotation: unknown parameter 'angle' \(allowed: p, degrees\)"),
        ({"gamma": {"range": [1.5, 0.7]}}, r"gamma.range must be \[low, high\] with low <= high"),
    ],
)
def test_a_bad_spec_block_is_refused_naming_the_key(block, message):
    with pytest.raises(TaskSpecError, match=r"task brats2020: 'training.augmentation': " + message):
        augmentation_config(spec=spec_with(block))


def test_a_spec_block_of_the_wrong_shape_is_refused_on_load():
    with pytest.raises(TaskSpecError, match=r"spec.yaml: 'training.augmentation': must be a selection"):
        spec_with(3)
