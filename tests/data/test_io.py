"""Image IO: one (i, j, k) + RAS-affine convention for NIfTI, NRRD/MHA and DICOM; errors name the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ciml.data.io import (
    ImageReadError,
    image_suffix,
    itk_to_ras_affine,
    load_image,
    read_header,
    read_image,
    strip_image_suffix,
)
from ciml.errors import CimlError

AFFINE = np.array(
    [[0.0, 0.0, 2.0, -10.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 1.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


def _volume(shape=(8, 9, 10), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(dtype)


def _itk_image(array_zyx: np.ndarray) -> sitk.Image:
    """An ITK image with anisotropic spacing, an oblique-free but flipped LPS direction and an origin."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((0.8, 1.2, 3.0))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def test_nifti_round_trip_keeps_array_affine_and_header(tmp_path: Path) -> None:
    data = _volume()
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    array, affine = read_image(path)
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    header = read_header(path)
    assert header.shape == (8, 9, 10)
    np.testing.assert_allclose(header.spacing, (1.5, 1.0, 2.0), atol=1e-6)
    assert header.dtype == "float32"
    assert header.orientation == "".join(nib.aff2axcodes(AFFINE))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_match_what_itk_itself_writes_as_nifti(tmp_path: Path, suffix: str) -> None:
    """ITK's own NIfTI writer converts LPS to RAS; our conversion of NRRD/MHA must agree with it."""
    zyx = _volume((5, 6, 7))
    image = _itk_image(zyx)
    sitk.WriteImage(image, str(tmp_path / f"img{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    array, affine = read_image(tmp_path / f"img{suffix}")
    reference = nib.load(tmp_path / "img.nii.gz")
    assert array.shape == (7, 6, 5)
    np.testing.assert_array_equal(array, np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(affine, reference.affine, atol=1e-5)
    header = read_header(tmp_path / f"img{suffix}")
    assert header.shape == (7, 6, 5)
    assert header.spacing == pytest.approx((0.8, 1.2, 3.0))
    assert header.dtype == "float32"
    np.testing.assert_allclose(header.affine, affine)


def test_lps_to_ras_flips_first_two_axes() -> None:
    affine = itk_to_ras_affine((1, 0, 0, 0, 1, 0, 0, 0, 1), (2.0, 3.0, 4.0), (10.0, 20.0, 30.0))
    np.testing.assert_allclose(affine, [[-2, 0, 0, -10], [0, -3, 0, -20], [0, 0, 4, 30], [0, 0, 0, 1]])
    assert "".join(nib.aff2axcodes(affine)) == "LPS"


def test_dicom_series_folder(tmp_path: Path, dicom_series) -> None:
    zyx = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = dicom_series(tmp_path / "series", zyx)
    array, affine = read_image(tmp_path / "series")
    np.testing.assert_array_equal(array, zyx.transpose(2, 1, 0))
    expected = itk_to_ras_affine(volume.GetDirection(), volume.GetSpacing(), volume.GetOrigin())
    np.testing.assert_allclose(affine, expected, atol=1e-5)
    assert read_header(tmp_path / "series").shape == (6, 5, 4)


def test_header_is_read_without_the_voxels(tmp_path: Path) -> None:
    """A truncated .nii.gz keeps its header: read_header works, load_image must fail on the data."""
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(_volume((16, 16, 16)), AFFINE), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert read_header(path).shape == (16, 16, 16)
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz: truncated or corrupt compressed data"):
        load_image(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.nii.gz", b"", "empty file"),
        ("plain.nii.gz", b"this is not gzip" * 40, "not gzip-compressed"),
        ("junk.nii", b"this is not nifti" * 40, "not a readable image"),
        ("junk.nrrd", b"this is not nrrd" * 40, "not a readable image"),
        ("notes.txt", b"hello", "not a readable image"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == path
    assert isinstance(info.value, CimlError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nothere\.nii\.gz: file not found"):
        read_header(tmp_path / "nothere.nii.gz")


def test_truncated_uncompressed_nifti_reports_sizes(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(_volume((8, 8, 8)), AFFINE), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImageReadError, match=r"cut\.nii: truncated file: \d+ bytes, the header promises \d+"):
        load_image(path)


def test_truncated_nrrd(tmp_path: Path) -> None:
    path = tmp_path / "cut.nrrd"
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.UseCompressionOn()
    writer.Execute(_itk_image(_volume((12, 12, 12))))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageReadError, match=r"cut\.nrrd: truncated or corrupt image"):
        load_image(path)


def test_suffix_helpers() -> None:
    assert image_suffix("a/CHUM-001__CT.nii.gz") == ".nii.gz"
    assert image_suffix("x.NRRD") == ".nrrd"
    assert strip_image_suffix("BraTS20_Training_001_flair.nii") == "BraTS20_Training_001_flair"
    assert strip_image_suffix("case_0000.mha") == "case_0000"
