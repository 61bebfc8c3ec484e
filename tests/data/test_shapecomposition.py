"""ShapeComposition: generator invariants (labels, visibility, images), seeding, spec checks, metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from ciml.data import shapecomposition as sc
from ciml.errors import CimlError
from ciml.tasks.spec import TaskSpec, load_task

PRESETS = {2: "shapecomposition", 3: "shapecomposition3", 4: "shapecomposition4"}
SIZES = {"2d": (40, 40), "3d": (20, 20, 20)}
CLEAN = sc.ShapeCompositionConfig(noise_std=0.0, texture_std=0.0)


@pytest.fixture(params=sorted(PRESETS), ids=lambda k: f"K{k}")
def spec(request) -> TaskSpec:
    return load_task(PRESETS[request.param])


@pytest.fixture(params=sorted(SIZES))
def size(request) -> tuple[int, ...]:
    return SIZES[request.param]


def _samples(spec: TaskSpec, size, n: int = 4, config=sc.DEFAULT_CONFIG) -> list[sc.ShapeSample]:
    return [sc.generate_sample(spec, np.random.default_rng(seed), size, config) for seed in range(n)]


# --- generator: shapes, dtypes, consistency --------------------------------------------------------------


def test_sample_arrays_have_documented_shapes_and_dtypes(spec, size):
    k = len(spec.modalities)
    sample = sc.generate_sample(spec, np.random.default_rng(0), size)
    assert sample.image.shape == (k, *size) and sample.image.dtype == np.float32
    assert sample.label.shape == size and sample.label.dtype == np.uint8
    assert sample.visibility.shape == (k, *size) and sample.visibility.dtype == bool
    assert sample.instances.shape == size
    assert len(sample.shapes) >= 1
    assert set(np.unique(sample.label)) <= set(spec.label_values)
    assert np.isfinite(sample.image).all()


def test_label_regions_and_visibility_agree(spec, size):
    k = len(spec.modalities)
    for sample in _samples(spec, size):
        label, visibility = sample.label, sample.visibility
        regions = dict(zip(spec.region_names, spec.labels_to_regions(label), strict=True))
        np.testing.assert_array_equal(regions["composite"], visibility.any(axis=0))
        for index, name in enumerate(spec.modality_names[1:], start=1):
            np.testing.assert_array_equal(regions[f"visible_{name}"], visibility[index])
        np.testing.assert_array_equal(visibility[0], np.isin(label, [1, 2]))
        assert visibility[:, label == 1].all()  # redundant: every modality shows it
        specific = label >= 2
        assert (visibility[:, specific].sum(axis=0) == 1).all()  # specific: exactly one shows it
        for modality in range(k):
            assert visibility[modality][label == 2 + modality].all()
        assert not visibility[:, label == 0].any()


def test_shape_records_match_the_maps(spec, size):
    for sample in _samples(spec, size):
        for index, shape in enumerate(sample.shapes, start=1):
            inside = sample.instances == index
            assert inside.sum() == shape.voxels >= sc.MIN_SHAPE_VOXELS
            assert (sample.label[inside] == shape.label).all()
            assert sum(shape.visible) == (len(shape.visible) if shape.label == 1 else 1)
            for modality, shown in enumerate(shape.visible):
                assert sample.visibility[modality][inside].all() == shown
                assert (shape.intensity[modality] != 0) == shown


def test_shapes_keep_the_margin_between_them(size):
    spec = load_task("shapecomposition")
    ball = sc._ball(sc.OVERLAP_MARGIN_VOXELS, len(size))
    for sample in _samples(spec, size, n=6):
        for index in range(1, len(sample.shapes) + 1):
            grown = ndimage.binary_dilation(sample.instances == index, structure=ball)
            others = sample.instances[grown]
            assert set(np.unique(others)) <= {0, index}


def test_modality_shows_exactly_its_visible_shapes_without_noise(spec, size):
    for sample in _samples(spec, size, config=CLEAN):
        np.testing.assert_array_equal(sample.image != 0, sample.visibility)


def test_intensity_sign_varies_so_thresholding_is_not_enough():
    spec = load_task("shapecomposition")
    samples = _samples(spec, (32, 32), n=12)
    for modality in range(2):
        values = [s.intensity[modality] for sample in samples for s in sample.shapes if s.visible[modality]]
        assert min(values) < 0 < max(values)
        assert all(
            sc.INTENSITY_MAGNITUDE_RANGE[0] <= abs(v) <= sc.INTENSITY_MAGNITUDE_RANGE[1] for v in values
        )


@pytest.mark.parametrize("size", [(64, 64), (32, 32, 32)], ids=["2d", "3d"])
def test_noisy_images_differ_from_local_background_only_inside_shown_shapes(size):
    """Mean |inside - surrounding ring| is large where a modality shows a shape, small where it does not."""
    spec = load_task("shapecomposition3")
    ring_outer, ring_inner = sc._ball(4, len(size)), sc._ball(sc.OVERLAP_MARGIN_VOXELS, len(size))
    contrast: dict[bool, list[float]] = {True: [], False: []}
    for sample in _samples(spec, size, n=6):
        for index, shape in enumerate(sample.shapes, start=1):
            inside = sample.instances == index
            ring = ndimage.binary_dilation(inside, ring_outer) & ~ndimage.binary_dilation(inside, ring_inner)
            ring &= sample.instances == 0
            for modality, shown in enumerate(shape.visible):
                image = sample.image[modality]
                contrast[shown].append(abs(image[inside].mean() - image[ring].mean()))
    shown, hidden = np.mean(contrast[True]), np.mean(contrast[False])
    # The smooth texture alone differs a little between a shape and its ring; a shown shape adds >= 0.5.
    assert shown > 0.6 and hidden < 0.3, (shown, hidden)
    assert shown > 5 * hidden, (shown, hidden)


def _neighbour_correlation(image: np.ndarray) -> float:
    a, b = image[..., :-1].ravel(), image[..., 1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("size", [(64, 64), (32, 32, 32)], ids=["2d", "3d"])
def test_background_is_smooth_texture_plus_white_noise(size):
    spec = load_task("shapecomposition")
    no_shapes = {"radius_fraction": (0.01, 0.01), "shape_count": (1, 1)}  # one tiny shape at most
    texture = sc.generate_sample(spec, 0, size, sc.ShapeCompositionConfig(noise_std=0.0, **no_shapes)).image
    noise = sc.generate_sample(spec, 0, size, sc.ShapeCompositionConfig(texture_std=0.0, **no_shapes)).image
    both = sc.generate_sample(spec, 0, size, sc.ShapeCompositionConfig(**no_shapes)).image
    assert _neighbour_correlation(texture) > 0.8  # smooth field
    assert abs(_neighbour_correlation(noise)) < 0.1  # white noise
    expected_std = np.hypot(sc.NOISE_STD, sc.TEXTURE_STD)
    assert both.std() == pytest.approx(expected_std, rel=0.15)
    assert not np.array_equal(texture[0], texture[1])  # each modality has its own background


def test_every_shape_kind_appears_and_redundancy_is_about_as_configured(size):
    spec = load_task("shapecomposition")
    shapes = [s for sample in _samples(spec, size, n=30) for s in sample.shapes]
    assert {s.kind for s in shapes} == set(sc.SHAPE_KINDS[len(size)])
    redundant = np.mean([s.label == 1 for s in shapes])
    assert abs(redundant - sc.REDUNDANT_PROBABILITY) < 0.12
    owners = np.bincount([s.label - 2 for s in shapes if s.label >= 2], minlength=2)
    assert owners.min() > 0.3 * owners.sum()


def test_config_changes_the_generator():
    spec = load_task("shapecomposition")
    config = sc.ShapeCompositionConfig(shape_count=(2, 2), redundant_probability=1.0)
    samples = _samples(spec, (48, 48), n=5, config=config)
    assert all(len(s.shapes) == 2 for s in samples)
    assert all(set(np.unique(s.label)) == {0, 1} for s in samples)


# --- seeding -------------------------------------------------------------------------------------------


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_repeats_and_other_seeds_differ(size):
    spec = load_task("shapecomposition3")
    first = sc.generate_sample(spec, np.random.default_rng(11), size)
    again = sc.generate_sample(spec, np.random.default_rng(11), size)
    other = sc.generate_sample(spec, np.random.default_rng(12), size)
    for name in ("image", "label", "visibility", "instances"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.label, other.label)


def test_make_batch_repeats_per_seed_and_advances_on_one_generator():
    spec = load_task("shapecomposition")
    _assert_same(sc.make_batch(spec, 5, 3, (32, 32)), sc.make_batch(spec, 5, 3, (32, 32)))
    rng = np.random.default_rng(5)
    first, second = sc.make_batch(spec, rng, 3, (32, 32)), sc.make_batch(spec, rng, 3, (32, 32))
    assert not torch.equal(first["image"], second["image"])


def test_make_batch_layout(spec, size):
    k, r = len(spec.modalities), len(spec.regions)
    batch = sc.make_batch(spec, 0, 3, size)
    assert batch["image"].shape == (3, k, *size) and batch["image"].dtype == torch.float32
    assert batch["regions"].shape == (3, r, *size) and batch["regions"].dtype == torch.float32
    assert batch["visibility"].shape == (3, k, *size) and batch["visibility"].dtype == torch.bool
    assert batch["label"].shape == (3, *size) and batch["label"].dtype == torch.uint8
    for b in range(3):
        expected = spec.labels_to_regions(batch["label"][b].numpy()).astype(np.float32)
        np.testing.assert_array_equal(batch["regions"][b].numpy(), expected)
    composite = spec.region_names.index("composite")
    assert torch.equal(batch["regions"][:, composite].bool(), batch["visibility"].any(dim=1))


def test_dataset_items_depend_only_on_seed_and_index():
    spec = load_task("shapecomposition")
    dataset = sc.ShapeCompositionDataset(spec, n=4, seed=3, size=(32, 32))
    twin = sc.ShapeCompositionDataset(spec, n=4, seed=3, size=(32, 32))
    other = sc.ShapeCompositionDataset(spec, n=4, seed=4, size=(32, 32))
    assert len(dataset) == 4
    _assert_same(dataset[2], twin[2])
    _assert_same(dataset[-1], dataset[3])
    assert not torch.equal(dataset[0]["image"], dataset[1]["image"])
    assert not torch.equal(dataset[0]["image"], other[0]["image"])
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 2, 32, 32)
    _assert_same({k: v[1] for k, v in batch.items()}, dataset[1])
    with pytest.raises(IndexError):
        dataset[4]
    with pytest.raises(CimlError, match="'seed'"):
        sc.ShapeCompositionDataset(spec, n=4, seed=-1)


def test_batch_generation_is_fast():
    """DESIGN asks for well under 50 ms per 16 samples of 64x64; allow for a busy shared machine."""
    spec = load_task("shapecomposition")
    sc.make_batch(spec, 0, 16)
    start = time.perf_counter()
    sc.make_batch(spec, 1, 16)
    assert time.perf_counter() - start < 0.5


# --- validation ----------------------------------------------------------------------------------------


def _spec(regions: dict, assembly: list, modalities: tuple[str, ...] = ("m0", "m1")) -> TaskSpec:
    owned = {name: [r for r in regions if r == "composite" or r.endswith(name)] for name in modalities}
    decomposition = {name: owned[name] for name in modalities if owned[name]}
    leftover = [r for r in regions if not any(r in v for v in decomposition.values())]
    decomposition.setdefault(modalities[0], [])
    decomposition[modalities[0]] = decomposition[modalities[0]] + leftover
    return TaskSpec.from_dict(
        {
            "name": "custom",
            "modalities": dict.fromkeys(modalities, "synthetic"),
            "regions": regions,
            "decomposition": decomposition,
            "assembly": assembly,
        }
    )


@pytest.mark.parametrize(
    ("regions", "assembly", "message"),
    [
        ({"composite": [1, 2, 3]}, [["composite", 2]], "needs region 'visible_m1'"),
        (
            {"composite": [1, 2, 3], "visible_m1": [1, 2]},
            [["composite", 3], ["visible_m1", 2]],
            r"regions.visible_m1'.*expects labels \[1, 3\]",
        ),
        (
            {"composite": [1, 2, 3], "visible_m1": [1, 3], "extra": [2]},
            [["composite", 2], ["visible_m1", 3], ["extra", 2]],
            "regions.extra'.*not a ShapeComposition region",
        ),
    ],
    ids=["missing", "wrong-labels", "extra"],
)
def test_spec_outside_the_convention_is_rejected(regions, assembly, message):
    spec = _spec(regions, assembly)
    with pytest.raises(CimlError, match=message):
        sc.generate_sample(spec, 0, (32, 32))
    with pytest.raises(CimlError, match=message):
        sc.ShapeCompositionDataset(spec, n=2, seed=0)


def test_other_specs_and_single_modality_are_rejected():
    with pytest.raises(CimlError, match="brats2020.*composite"):
        sc.validate_spec(load_task("brats2020"))
    single = _spec({"composite": [1, 2]}, [["composite", 2]], modalities=("m0",))
    with pytest.raises(CimlError, match="at least 2"):
        sc.validate_spec(single)
    assert sc.validate_spec(load_task("shapecomposition4")) == 4


@pytest.mark.parametrize("size", [(64,), (64, 64, 64, 64), (4, 64)])
def test_bad_size_is_rejected(size):
    with pytest.raises(CimlError, match="'size'"):
        sc.generate_sample(load_task("shapecomposition"), 0, size)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redundant_probability", 1.5),
        ("shape_count", (3, 2)),
        ("noise_std", -1.0),
        ("intensity_magnitude", (0, 1)),
    ],
)
def test_bad_config_is_rejected(field, value):
    with pytest.raises(CimlError, match=field):
        sc.ShapeCompositionConfig(**{field: value})


# --- metrics -------------------------------------------------------------------------------------------


def test_composite_dice_follows_the_brats_convention():
    target = np.zeros((4, 8, 8), bool)
    pred = np.zeros((4, 8, 8), bool)
    target[0, :4] = pred[0, :4] = True  # perfect
    target[1, :4], pred[1, 2:6] = True, True  # half of each overlaps
    target[3, :2] = True  # missed entirely; sample 2 empty in both
    dice = sc.composite_dice(pred, target)
    np.testing.assert_allclose(dice, [1.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(
        sc.composite_dice(torch.from_numpy(pred[:, None]).float(), target[:, None]), dice
    )
    with pytest.raises(ValueError, match="differ in shape"):
        sc.composite_dice(pred, target[:, :4])


def _hand_visibility() -> np.ndarray:
    """Batch of 1, K=3, one row of 8 voxels: receiver 0, sender 1, third modality 2."""
    visibility = np.zeros((1, 3, 1, 8), bool)
    visibility[0, 1, 0, 0:2] = True  # only the sender shows these: specific
    visibility[0, :2, 0, 2:4] = True  # receiver and sender: redundant
    visibility[0, 1:, 0, 4] = True  # sender and third, not receiver: neither
    visibility[0, 2, 0, 5] = True  # only the third
    return visibility  # voxels 6, 7: background


def test_selectivity_on_hand_made_maps():
    kl = np.array([[[5.0, 5.0, 1.0, 1.0, 100.0, 100.0, 0.5, 0.5]]])
    result = sc.message_selectivity(kl, _hand_visibility(), receiver_index=0, sender_index=1)
    assert result["specific"] == 5.0 and result["redundant"] == 1.0 and result["background"] == 0.5
    assert result["selectivity"] == 5.0 and result["specific_over_background"] == 10.0
    assert (result["n_specific"], result["n_redundant"], result["n_background"]) == (2, 2, 2)
    with_channel = sc.message_selectivity(torch.from_numpy(kl[:, None]), _hand_visibility(), 0, 1)
    assert with_channel == result


def test_selectivity_on_generated_visibility_gives_five():
    spec = load_task("shapecomposition")
    batch = sc.make_batch(spec, 2, 4, (32, 32))
    label = batch["label"].float()
    kl = 5.0 * (label == 3) + 1.0 * (label == 1)  # m1-specific shapes 5 nats, redundant 1
    result = sc.message_selectivity(kl, batch["visibility"], receiver_index=0, sender_index=1)
    assert result["selectivity"] == pytest.approx(5.0)
    assert result["background"] == 0.0 and result["specific_over_background"] == float("inf")


def test_selectivity_empty_masks_give_nan():
    visibility = np.zeros((1, 2, 1, 4), bool)
    visibility[0, 1, 0, :2] = True  # sender-specific only; no redundant shape
    result = sc.message_selectivity(np.ones((1, 1, 4)), visibility, 0, 1)
    assert result["specific"] == 1.0 and np.isnan(result["redundant"]) and np.isnan(result["selectivity"])
    assert result["specific_over_background"] == 1.0
    empty = sc.message_selectivity(np.ones((1, 1, 4)), np.zeros((1, 2, 1, 4), bool), 0, 1)
    assert np.isnan(empty["specific"]) and np.isnan(empty["selectivity"])
    assert np.isnan(empty["specific_over_background"]) and empty["background"] == 1.0


def test_selectivity_meter_accumulates_sums_not_means():
    spec = load_task("shapecomposition3")
    first, second = sc.make_batch(spec, 0, 3, (24, 24)), sc.make_batch(spec, 1, 1, (24, 24))
    rng = np.random.default_rng(0)
    kl_first, kl_second = rng.gamma(2.0, size=(3, 24, 24)), 3 * rng.gamma(2.0, size=(1, 24, 24))
    meter = sc.SelectivityMeter(receiver_index=0, sender_index=2)
    meter.update(kl_first, first["visibility"])
    meter.update(torch.from_numpy(kl_second), second["visibility"])
    together = sc.message_selectivity(
        np.concatenate([kl_first, kl_second]), torch.cat([first["visibility"], second["visibility"]]), 0, 2
    )
    accumulated = meter.result()
    assert accumulated.keys() == together.keys()
    for key in together:
        assert accumulated[key] == pytest.approx(together[key], rel=1e-12), key
    parts = [sc.message_selectivity(kl_first, first["visibility"], 0, 2)["specific"]]
    parts.append(sc.message_selectivity(kl_second, second["visibility"], 0, 2)["specific"])
    assert np.mean(parts) != pytest.approx(together["specific"], rel=1e-3)  # mean of means would be wrong


def test_selectivity_spreads_a_coarse_kl_map_over_full_resolution():
    spec = load_task("shapecomposition")
    batch = sc.make_batch(spec, 4, 2, (32, 32))
    coarse = torch.rand(2, 8, 8, dtype=torch.float64)
    full = coarse.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert sc.message_selectivity(coarse, batch["visibility"], 0, 1) == sc.message_selectivity(
        full, batch["visibility"], 0, 1
    )
    with pytest.raises(ValueError, match="does not divide"):
        sc.message_selectivity(torch.rand(2, 5, 5), batch["visibility"], 0, 1)


def test_selectivity_rejects_bad_indices_and_shapes():
    visibility = _hand_visibility()
    with pytest.raises(ValueError, match="must differ"):
        sc.SelectivityMeter(1, 1)
    with pytest.raises(ValueError, match="out of range"):
        sc.message_selectivity(np.ones((1, 1, 8)), visibility, 0, 3)
    with pytest.raises(ValueError, match="does not match"):
        sc.message_selectivity(np.ones((2, 1, 8)), visibility, 0, 1)
