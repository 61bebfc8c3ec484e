"""Reading medical images and their headers: the one place in ciml that opens image files.

check-data, preprocessing (training and prediction), evaluation, explain and the writers' reference
headers all read through this module, so every consumer applies the same checks (size limits, voxel
sizes, affine sanity, one DICOM series per folder) and reports the same errors.

NIfTI goes through nibabel; NRRD, MHA/MHD and DICOM series folders go through SimpleITK. Whatever the
format, arrays come back in voxel order (i, j, k) and with a 4x4 affine mapping voxel indices to RAS
millimetres, exactly as nibabel returns NIfTI. ITK stores geometry in LPS, so its direction and origin are
flipped on the first two axes. Every failure is a :class:`ImageReadError` naming the file, because the
integrity check and the CLI show nothing else.

Example:
    >>> array, affine = read_image("BraTS20_Training_001_flair.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ciml.errors import CimlError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest image ciml reads (voxels, all axes): 2^30, i.e. 4 GiB as float32, ~7x a 512x512x600 CT.
#: A corrupt header promising more is refused before any memory is allocated (CIML_MAX_VOXELS overrides).
MAX_VOXELS = 2**30
#: Voxel sizes outside (0, MAX_SPACING_MM] are corrupt headers, not scans (resampling them would explode).
MAX_SPACING_MM = 1000.0

# nibabel logs broken headers itself (several lines on stderr); ciml reports them as one line instead.
logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)


class FileProblemError(CimlError):
    """A problem with one file or folder: ``path`` and ``reason`` stay available for reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ImageReadError(FileProblemError):
    """An image file is missing, empty, truncated, corrupt or not an image."""


@dataclass(frozen=True)
class ImageHeader:
    """Geometry and storage type of an image, read without its voxels where the format allows.

    Attributes:
        path: the file (or DICOM series folder).
        shape: array shape in voxel order (i, j, k[, components]).
        spacing: voxel size in mm along each spatial axis.
        affine: 4x4 voxel-to-RAS-mm matrix (nibabel's convention).
        dtype: storage data type (numpy name, e.g. ``int16``).
    """

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    dtype: str

    @property
    def orientation(self) -> str:
        """Axis codes such as ``RAS`` or ``LPS``: where each voxel axis points."""
        return "".join(code or "?" for code in nib.orientations.aff2axcodes(self.affine))

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[: len(self.spacing)]


def image_suffix(path: str | Path) -> str:
    """The format suffix of ``path`` (``.nii.gz`` counts as one), lower-cased; ``""`` for none."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES + (".gz",), key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def strip_image_suffix(path: str | Path) -> str:
    """File name without its image suffix (``CHUM-001__CT.nii.gz`` -> ``CHUM-001__CT``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def is_hidden(path: str | Path) -> bool:
    """Hidden files are never data: macOS ``._*`` resource forks (MSD's tars hold one per image), ``.tmp``."""
    return Path(path).name.startswith(".")


def is_image_file(path: str | Path) -> bool:
    return Path(path).is_file() and not is_hidden(path) and image_suffix(path) in IMAGE_SUFFIXES


def read_header(path: str | Path) -> ImageHeader:
    """Shape, spacing, RAS affine and dtype of an image, reading only its header when possible.

    NIfTI and ITK files are read header-only; a DICOM series folder is read in full (its geometry
    comes from every slice).
    """
    path = _check_exists(path)
    with _read_errors(path):
        if _is_nifti(path):
            return _open_nifti(path)[1]
        if path.is_dir():
            return _itk_header(path, _read_dicom_series(path))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return _itk_header(path, reader)


def load_image(path: str | Path, volume: int | None = None) -> tuple[np.ndarray, ImageHeader]:
    """Voxels and header from one read of the file; the voxels are fully decompressed.

    Decompressing everything is the point: a truncated ``.nii.gz`` usually has an intact header and
    fails only once the data are read. ``volume`` picks one 3D volume of a 4D image (MSD stores a case's
    modalities as the volumes of one file); the header then describes that volume.
    """
    path = _check_exists(path)
    with _read_errors(path):
        if _is_nifti(path):
            array, header = _load_nifti(path)
        else:
            image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
            array, header = _itk_array(image), _itk_header(path, image)
    return (array, header) if volume is None else select_volume(array, header, volume)


def select_volume(array: np.ndarray, header: ImageHeader, volume: int) -> tuple[np.ndarray, ImageHeader]:
    """Volume ``volume`` of a 4D image (last axis), with a header for that 3D volume.

    Raises:
        ImageReadError: the image is not 4D or has no such volume.
    """
    if array.ndim != 4 or len(header.spacing) != 3:
        raise ImageReadError(
            header.path, f"expected a 4D image to take volume {volume} of, got shape {array.shape}"
        )
    if not 0 <= volume < array.shape[3]:
        raise ImageReadError(
            header.path, f"has {array.shape[3]} volumes (shape {array.shape}), no volume {volume}"
        )
    sub = dataclasses.replace(header, shape=tuple(array.shape[:3]))
    return np.asarray(array[..., volume]), sub


def read_nifti_image(path: str | Path) -> nib.Nifti1Image | None:
    """The NIfTI image itself (full header, qform/sform codes; voxels not read), None for other formats.

    Writers copy this header into their outputs so a prediction overlays its input in any viewer; the
    header passes the same checks as :func:`read_header`.
    """
    if image_suffix(path) not in NIFTI_SUFFIXES:
        return None
    path = _check_exists(path)
    with _read_errors(path):
        image = _open_nifti(path)[0]
    return image if isinstance(image, nib.Nifti1Image) else None  # Nifti2Image is a subclass


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array in (i, j, k) order and its 4x4 voxel-to-RAS affine, like nibabel for NIfTI."""
    array, header = load_image(path)
    return array, header.affine


def max_voxels() -> int:
    """The voxel budget: :data:`MAX_VOXELS` unless the ``CIML_MAX_VOXELS`` variable sets another."""
    value = os.environ.get("CIML_MAX_VOXELS", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_VOXELS


def check_header(header: ImageHeader) -> ImageHeader:
    """Refuse headers no scan has, before their voxels are read (and memory is allocated for them).

    Raises:
        ImageReadError: a non-positive dimension, more voxels than :func:`max_voxels`, or voxel sizes or
            an affine that are not finite and positive (a corrupt header, which would explode resampling).
    """
    if not header.shape or any(s <= 0 for s in header.shape):
        raise ImageReadError(header.path, f"corrupt header: dimensions {header.shape} must be positive")
    voxels = int(np.prod([int(s) for s in header.shape], dtype=object))
    if voxels > max_voxels():
        raise ImageReadError(
            header.path,
            f"header promises {voxels:,} voxels (shape {header.shape}), over the {max_voxels():,} ciml reads "
            "(corrupt header? set CIML_MAX_VOXELS to allow more)",
        )
    spacing = np.asarray(header.spacing, dtype=float)
    if not (np.isfinite(spacing).all() and (spacing > 0).all() and (spacing <= MAX_SPACING_MM).all()):
        raise ImageReadError(
            header.path,
            f"corrupt header: voxel size {tuple(header.spacing)} mm must be finite, positive and at most "
            f"{MAX_SPACING_MM:g} mm",
        )
    if not np.isfinite(header.affine).all() or abs(np.linalg.det(header.affine[:3, :3])) < 1e-12:
        raise ImageReadError(
            header.path, "corrupt header: the voxel-to-world affine is not finite/invertible"
        )
    axes = nib.orientations.aff2axcodes(header.affine)
    if None in axes:
        raise ImageReadError(
            header.path,
            f"corrupt header: the affine gives voxel axis {axes.index(None)} no clear world direction "
            f"(axis codes {axes})",
        )
    return header


def describe_read_error(exc: BaseException) -> str:
    """A one-line reason for a low-level read failure (public for readers outside this module)."""
    return _describe(exc)


def itk_to_ras_affine(
    direction: tuple[float, ...], spacing: tuple[float, ...], origin: tuple[float, ...]
) -> np.ndarray:
    """ITK geometry (LPS direction matrix row-major, spacing, origin) as a voxel-to-RAS affine.

    2D images get the identity for the third axis so every image has a 4x4 affine.
    """
    dim = len(spacing)
    lps = np.eye(4)
    matrix = np.asarray(direction, dtype=float).reshape(dim, dim)
    lps[:dim, :dim] = matrix @ np.diag(np.asarray(spacing, dtype=float))
    lps[:dim, 3] = np.asarray(origin, dtype=float)
    return _LPS_TO_RAS @ lps


def _check_exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if path.is_dir() and not any(path.iterdir()):
        raise ImageReadError(path, "empty folder (expected a DICOM series)")
    return path


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn whatever a reader raises (nibabel and ITK raise many types) into one ImageReadError line."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, _describe(exc)) from None


def _is_nifti(path: Path) -> bool:
    return path.is_file() and image_suffix(path) in NIFTI_SUFFIXES


def _nifti_header(path: Path, image: nib.spatialimages.SpatialImage) -> ImageHeader:
    zooms = image.header.get_zooms()
    ndim_spatial = min(3, len(image.shape))
    return ImageHeader(
        path=path,
        shape=tuple(int(s) for s in image.shape),
        spacing=tuple(float(z) for z in zooms[:ndim_spatial]),
        affine=np.asarray(image.affine, dtype=float),
        dtype=str(image.get_data_dtype()),
    )


def _open_nifti(path: Path, **options: bool) -> tuple[nib.spatialimages.SpatialImage, ImageHeader]:
    """The nibabel image (voxels not read yet) and its checked header."""
    image = nib.load(str(path), **options)
    return image, check_header(_nifti_header(path, image))


def _load_nifti(path: Path) -> tuple[np.ndarray, ImageHeader]:
    image, header = _open_nifti(path, mmap=False)
    dtype = np.dtype(image.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "buif":
        raise ImageReadError(
            path, f"voxel type {dtype} is not a scalar number (RGB/complex images are not supported)"
        )
    if image_suffix(path) == ".nii":
        _check_nifti_length(path, image)
    return np.asanyarray(image.dataobj), header


def _check_nifti_length(path: Path, image: nib.spatialimages.SpatialImage) -> None:
    """An uncompressed NIfTI shorter than its header promises is truncated: say so with the numbers."""
    offset = int(getattr(image.dataobj, "offset", 0))
    expected = offset + int(np.prod(image.shape)) * np.dtype(image.get_data_dtype()).itemsize
    size = path.stat().st_size
    if size < expected:
        raise ImageReadError(path, f"truncated file: {size} bytes, the header promises {expected}")


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in ``folder``; several are refused, since picking one would be a guess."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(folder, "folder holds no DICOM series (and is not an image file)")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    if len(series) > 1:
        found = ", ".join(f"{uid} ({len(names)} files)" for uid, names in files.items())
        raise ImageReadError(
            folder,
            f"folder holds {len(series)} DICOM series: {found}; ciml reads one series per folder "
            "(move each series into a folder of its own)",
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[series[0]])
    return reader.Execute()


def _itk_header(path: Path, source: sitk.Image | sitk.ImageFileReader) -> ImageHeader:
    size = tuple(int(s) for s in source.GetSize())
    components = int(
        source.GetNumberOfComponentsPerPixel()
        if isinstance(source, sitk.Image)
        else source.GetNumberOfComponents()
    )
    shape = size + ((components,) if components > 1 else ())
    dtype = _ITK_DTYPES.get(source.GetPixelID(), sitk.GetPixelIDValueAsString(source.GetPixelID()))
    spacing = tuple(float(s) for s in source.GetSpacing())
    header = ImageHeader(
        path=path,
        shape=shape,
        spacing=spacing,
        affine=itk_to_ras_affine(source.GetDirection(), spacing, source.GetOrigin()),
        dtype=dtype,
    )
    return check_header(header)


def _itk_array(image: sitk.Image) -> np.ndarray:
    """ITK's array is (k, j, i[, components]); reverse the spatial axes to nibabel's (i, j, k)."""
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def _describe(exc: BaseException) -> str:
    """A short reason for a low-level read failure, in the user's terms (always one line)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError):
        return "not enough memory to read the image (corrupt header or a far larger volume than expected)"
    if isinstance(exc, struct.error | OverflowError):
        return f"corrupt header ({type(exc).__name__}: {detail})"
    if isinstance(exc, OSError) and "Expected" in detail and "bytes" in detail:
        return f"truncated or corrupt image data ({detail.split(' from ')[0].removesuffix(' from')})"
    if isinstance(exc, gzip.BadGzipFile) or "not a gzip file" in detail:
        return f"not gzip-compressed although named .gz ({detail})"
    if isinstance(exc, EOFError | zlib.error):
        return f"truncated or corrupt compressed data ({detail})"
    if isinstance(exc, nib.filebasedimages.ImageFileError):
        return f"not a readable image ({detail})"
    if isinstance(exc, RuntimeError) and "ITK" in str(exc):
        reason = _itk_reason(str(exc))
        if "Unable to determine ImageIO" in reason:
            return f"not a readable image (SimpleITK: {reason})"
        return f"truncated or corrupt image (SimpleITK: {reason})"
    return f"cannot read image: {type(exc).__name__}: {detail}"


def _itk_reason(message: str) -> str:
    """ITK's exception text is several lines of source locations; keep the line that says why."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else message


_ITK_DTYPES = {
    sitk.sitkUInt8: "uint8",
    sitk.sitkInt8: "int8",
    sitk.sitkUInt16: "uint16",
    sitk.sitkInt16: "int16",
    sitk.sitkUInt32: "uint32",
    sitk.sitkInt32: "int32",
    sitk.sitkUInt64: "uint64",
    sitk.sitkInt64: "int64",
    sitk.sitkFloat32: "float32",
    sitk.sitkFloat64: "float64",
}
