"""Patch sampling: shapes, forced foreground share, padding of small volumes, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from ciml.data.preprocessing import PreprocessedCase
from ciml.data.sampling import forced_foreground_count, random_mirror, sample_patches


def tiny_foreground_case(shape=(32, 32, 32), value=2) -> tuple[np.ndarray, np.ndarray]:
    """Two modalities and a 2^3 foreground cube in a corner, so random patches rarely hit it."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[1:3, 28:30, 2:4] = value
    return image, label


def test_shapes_and_dtypes():
    image, target = sample_patches([tiny_foreground_case()], (8, 12, 16), 5, np.random.default_rng(0))
    assert image.shape == (5, 2, 8, 12, 16) and image.dtype == np.float32
    assert target.shape == (5, 8, 12, 16) and target.dtype == np.uint8


def test_region_mask_labels_keep_their_channels():
    image, label = tiny_foreground_case()
    regions = np.stack([label > 0, label == 2, np.zeros_like(label, bool)])
    _, target = sample_patches([(image, regions)], (8, 8, 8), 3, np.random.default_rng(0), 1.0)
    assert target.shape == (3, 3, 8, 8, 8) and target.dtype == bool
    assert all(t[0].any() for t in target)


def test_patches_come_from_the_volume():
    image, label = tiny_foreground_case()
    label = (np.arange(label.size) % 7).reshape(label.shape).astype(np.uint8)
    image[0] = label
    images, targets = sample_patches([(image, label)], (8, 8, 8), 4, np.random.default_rng(1))
    np.testing.assert_array_equal(images[:, 0], targets)


@pytest.mark.parametrize("batch_size, fraction", [(3, 1 / 3), (2, 0.5), (4, 1.0)])
def test_every_batch_has_at_least_the_forced_share_of_foreground(batch_size, fraction):
    case = tiny_foreground_case()
    rng = np.random.default_rng(2)
    with_foreground = 0
    for _ in range(100):
        _, target = sample_patches([case], (8, 8, 8), batch_size, rng, fraction)
        hits = int(sum(t.any() for t in target))
        assert hits >= int(np.floor(batch_size * fraction + 1e-9))
        with_foreground += hits
    assert with_foreground / (100 * batch_size) >= fraction - 0.05


def test_batch_of_one_is_forced_a_third_of_the_time():
    rng = np.random.default_rng(3)
    counts = [forced_foreground_count(1, 1 / 3, rng) for _ in range(3000)]
    assert set(counts) == {0, 1}
    assert abs(np.mean(counts) - 1 / 3) < 0.03


def test_no_forcing_rarely_hits_a_tiny_foreground():
    case = tiny_foreground_case()
    _, target = sample_patches([case], (8, 8, 8), 200, np.random.default_rng(4), foreground_fraction=0.0)
    assert np.mean([t.any() for t in target]) < 0.2


def test_cases_without_foreground_fall_back_to_random_patches():
    image, label = tiny_foreground_case()
    _, target = sample_patches([(image, np.zeros_like(label))], (8, 8, 8), 3, np.random.default_rng(5), 1.0)
    assert target.shape == (3, 8, 8, 8) and not target.any()


def test_small_volumes_are_zero_padded_and_centred():
    image = np.ones((1, 5, 6, 7), np.float32)
    label = np.zeros((5, 6, 7), np.uint8)
    label[0, 0, 0] = 1
    images, targets = sample_patches([(image, label)], (8, 8, 8), 3, np.random.default_rng(6), 1.0)
    assert images.shape == (3, 1, 8, 8, 8)
    expected = np.zeros((8, 8, 8), np.float32)
    expected[1:6, 1:7, 0:7] = 1  # padding (3, 2, 1) split as (1, 2), (1, 1), (0, 1)
    for patch, target in zip(images, targets, strict=True):
        np.testing.assert_array_equal(patch[0], expected)
        assert target[1, 1, 0] == 1 and target.sum() == 1


def test_partly_small_volumes_are_padded_only_where_needed():
    image, label = tiny_foreground_case(shape=(4, 32, 32))
    images, targets = sample_patches([(image, label)], (8, 8, 8), 6, np.random.default_rng(7), 0.5)
    assert images.shape == (6, 2, 8, 8, 8)
    assert np.all(images[:, :, :2] == 0) and np.all(images[:, :, 6:] == 0)
    assert np.all(images[:, :, 2:6] != 0)
    assert sum(t.any() for t in targets) >= 3


def test_same_seed_same_batch_other_seed_other_batch():
    cases = [tiny_foreground_case(), tiny_foreground_case(shape=(20, 24, 28))]
    a = sample_patches(cases, (8, 8, 8), 4, np.random.default_rng(42))
    b = sample_patches(cases, (8, 8, 8), 4, np.random.default_rng(42))
    c = sample_patches(cases, (8, 8, 8), 4, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_accepts_preprocessed_cases_and_memory_maps(tmp_path):
    image, label = tiny_foreground_case()
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    case = PreprocessedCase("c", mapped, label, {})
    images, targets = sample_patches([case], (8, 8, 8), 3, np.random.default_rng(8), 1.0)
    assert type(images) is np.ndarray and images.shape == (3, 2, 8, 8, 8)
    assert targets[0].any()


def test_random_mirror_keeps_image_and_target_aligned():
    image, label = tiny_foreground_case()
    label = (np.arange(label.size) % 5).reshape(label.shape).astype(np.uint8)
    image[1] = label
    images, targets = sample_patches(
        [(image, label)], (8, 8, 8), 16, np.random.default_rng(9), augment=random_mirror
    )
    np.testing.assert_array_equal(images[:, 1], targets)


def test_random_mirror_reaches_every_flip_combination():
    target = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    image = np.stack([target, -target]).astype(np.float32)
    rng = np.random.default_rng(10)
    seen = set()
    for _ in range(64):
        img, tgt = random_mirror(image, target, rng)
        np.testing.assert_array_equal(img[0], tgt)
        flips = tuple(bool(tgt[(0,) * a + (-1,) + (0,) * (2 - a)] < tgt[(0, 0, 0)]) for a in range(3))
        np.testing.assert_array_equal(tgt, np.flip(target, [a for a in range(3) if flips[a]]))
        seen.add(flips)
    assert len(seen) == 8


def test_bad_input_is_refused():
    image, label = tiny_foreground_case()
    with pytest.raises(ValueError, match="no label"):
        sample_patches([(image, None)], (8, 8, 8), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match"):
        sample_patches([(image, label[:-1])], (8, 8, 8), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="foreground_fraction"):
        sample_patches([(image, label)], (8, 8, 8), 2, np.random.default_rng(0), foreground_fraction=1.5)
    with pytest.raises(ValueError, match="at least one case"):
        sample_patches([], (8, 8, 8), 2, np.random.default_rng(0))
