"""Real anisotropic scans: pyradiomics 3.0.1's brain MRI and lung CT cases (NRRD, LPS headers).

The scans come from the pyradiomics 3.0.1 source archive, the only scans here that no one in this
project made. Where they are looked for, in order: ``$CIML_PYRADIOMICS_DATA`` (its ``data/`` folder, the
unpacked archive, or the ``.tar.gz``), the cache (``${XDG_CACHE_HOME:-~/.cache}/ciml/pyradiomics-3.0.1``),
``/tmp/pyrad``, pip's cache folder and site-packages. When none holds them, the archive is fetched with
pip (``pip download --no-deps --no-binary :all: pyradiomics==3.0.1``, PyPI only, checked against its
SHA-256) and the six scans are unpacked into the cache, so only the first run downloads (34 MB).

Without the data the tests skip and say why, except in CI (``CI`` set to true, as ``.ci/run`` does): there
they fail, so a CI run cannot pass without having tested real scans.

The expected geometry is parsed from the NRRD text header by hand, independently of SimpleITK.
"""

from __future__ import annotations

import hashlib
import os
import re
import site
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ciml.data.integrity import check_dataset
from ciml.data.io import read_header, read_image
from ciml.data.layouts import read_dataset
from ciml.tasks import load_task

SCANS = ("brain1", "brain2", "lung1")
FILES = tuple(f"{scan}_{kind}.nrrd" for scan in SCANS for kind in ("image", "label"))
ARCHIVE = "pyradiomics-3.0.1.tar.gz"
ARCHIVE_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
#: pip prepares an sdist's metadata even to download it: pyradiomics' setup.py imports numpy, which an
#: isolated build environment lacks, so it runs in this environment (numpy and setuptools are installed).
PIP_DOWNLOAD = ("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--quiet")
SPEC = load_task(
    {
        "name": "pyradiomics",
        "modalities": {"scan": "mri"},
        "regions": {"roi": [1]},
        "decomposition": {"scan": ["roi"]},
        "assembly": [["roi", 1]],
    }
)


def cache_folder() -> Path:
    """Where the fetched scans are kept between runs (outside the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ciml" / "pyradiomics-3.0.1"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _candidates() -> list[Path]:
    """Places that may hold the data folder, the unpacked archive or the archive itself."""
    places = []
    if os.environ.get("CIML_PYRADIOMICS_DATA"):
        places.append(Path(os.environ["CIML_PYRADIOMICS_DATA"]).expanduser())
    places.append(cache_folder())
    places.append(Path("/tmp/pyrad"))
    places.append(Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip")))
    places.extend(Path(p) for p in {*site.getsitepackages(), site.getusersitepackages(), *sys.path} if p)
    return places


def _search(place: Path) -> Path | None:
    """A data folder holding every needed file, or the archive, at or just below ``place``."""
    if place.is_file() and place.name.endswith(".tar.gz"):
        return place
    if not place.is_dir():
        return None
    for folder in (place, place / "data", place / "pyradiomics-3.0.1" / "data", place / "radiomics" / "data"):
        if all((folder / name).is_file() for name in FILES):
            return folder
    archives = sorted(place.glob(ARCHIVE)) + sorted(place.glob(f"*/{ARCHIVE}"))
    return archives[0] if archives else None


def _unpack(archive: Path, target: Path) -> Path:
    wanted = {f"pyradiomics-3.0.1/data/{name}" for name in FILES}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name in wanted:
                tar.extract(member, target, filter="data")
    return target / "pyradiomics-3.0.1" / "data"


def fetch(cache: Path) -> Path:
    """Download the archive with pip, check its hash, unpack the scans into ``cache``/data; returns it.

    Raises:
        RuntimeError: pip failed (no network, no PyPI) or the archive is not the expected one.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", tmp, "pyradiomics==3.0.1"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        archive = Path(tmp) / ARCHIVE
        if proc.returncode != 0 or not archive.is_file():
            raise RuntimeError(f"`{' '.join(command[2:])}` failed: {(proc.stderr or proc.stdout)[-1500:]}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != ARCHIVE_SHA256:
            raise RuntimeError(f"{ARCHIVE} has SHA-256 {digest}, expected {ARCHIVE_SHA256}")
        staged = Path(tmp) / "staged"
        folder = _unpack(archive, staged)
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise RuntimeError(f"{ARCHIVE} lacks {', '.join(missing)}")
        staged.joinpath("pyradiomics-3.0.1").rename(staged / "data-root")
        try:
            os.rename(staged / "data-root", cache)  # atomic: a reader sees all six files or none
        except OSError:
            if _search(cache) is None:  # not another run's copy that got there first
                raise
    return cache / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    places = _candidates()
    for place in places:
        found = _search(place)
        if found is not None and found.is_dir():
            return found
        if found is not None:
            folder = _unpack(found, tmp_path_factory.mktemp("pyradiomics"))
            if all((folder / name).is_file() for name in FILES):
                return folder
    try:
        return fetch(cache_folder())
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        named = [str(p) for p in places if "site-packages" not in str(p)]
        reason = (
            f"pyradiomics 3.0.1 data ({', '.join(FILES)}) not found (looked in {', '.join(named)} and "
            f"site-packages) and not fetched: {exc}. Set CIML_PYRADIOMICS_DATA to its data folder or archive"
        )
        if in_ci():
            pytest.fail(f"CI must test real scans: {reason}", pytrace=False)
        pytest.skip(reason)


def _nrrd_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(sizes, voxel-to-RAS affine) from the NRRD text header, parsed without SimpleITK."""
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    fields = dict(line.split(": ", 1) for line in header.splitlines()[1:] if ": " in line)
    assert fields["space"] == "left-posterior-superior"
    sizes = tuple(int(s) for s in fields["sizes"].split())
    vectors = [
        [float(v) for v in vec.split(",")] for vec in re.findall(r"\(([^)]*)\)", fields["space directions"])
    ]
    origin = [float(v) for v in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")]
    lps = np.eye(4)
    lps[:3, :3] = np.array(vectors).T  # one column per voxel axis
    lps[:3, 3] = origin
    return sizes, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("name", FILES)
def test_geometry_matches_the_nrrd_header(data_dir: Path, name: str) -> None:
    path = data_dir / name
    sizes, expected = _nrrd_geometry(path)
    header = read_header(path)
    array, affine = read_image(path)
    assert header.shape == array.shape == sizes
    np.testing.assert_allclose(affine, expected, atol=1e-6)
    np.testing.assert_allclose(header.affine, expected, atol=1e-6)
    np.testing.assert_allclose(header.spacing, np.linalg.norm(expected[:3, :3], axis=0), rtol=1e-6)
    assert max(header.spacing) / min(header.spacing) > 5  # thick slices: anisotropic
    assert header.orientation.endswith("S")  # slices stacked foot to head
    assert np.issubdtype(array.dtype, np.integer)


def test_intensities_are_plausible(data_dir: Path) -> None:
    """Byte order and axis order are right: CT in Hounsfield units, MRI non-negative, label 0/1."""
    ct, _ = read_image(data_dir / "lung1_image.nrrd")
    assert ct.min() >= -1100 and ct.max() <= 4000
    assert -1100 < np.median(ct) < 200  # much of a chest CT slab is air and lung
    mri, _ = read_image(data_dir / "brain1_image.nrrd")
    assert mri.min() >= 0 and mri.max() > 100
    label, _ = read_image(data_dir / "lung1_label.nrrd")
    assert set(np.unique(label).tolist()) == {0, 1}
    inside = ct[label == 1]
    assert np.median(inside) > -500  # the lung tumour is soft tissue, not air


def test_agrees_with_itk_own_nifti_export(data_dir: Path, tmp_path: Path) -> None:
    """SimpleITK writes NIfTI in RAS itself; nibabel reading that file must see what we read."""
    path = data_dir / "brain1_image.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp_path / "brain1.nii.gz"))
    reference = nib.load(tmp_path / "brain1.nii.gz")
    array, affine = read_image(path)
    np.testing.assert_allclose(affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(array, np.asanyarray(reference.dataobj))


def test_case_list_of_real_scans_passes_the_integrity_check(data_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "cases.csv"
    rows = [f"{s},{data_dir / f'{s}_image.nrrd'},{data_dir / f'{s}_label.nrrd'}" for s in SCANS]
    listing.write_text("case_id,scan,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    cases = read_dataset(listing, SPEC)
    assert [c.case_id for c in cases] == list(SCANS)
    report = check_dataset(cases, SPEC, progress=False)
    assert report.problems == []
    assert report.n_files == 2 * len(SCANS)

    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        f"case_id,scan,label\nbad,{data_dir / 'brain1_image.nrrd'},{data_dir / 'lung1_label.nrrd'}\n",
        encoding="utf-8",
    )
    (problem,) = check_dataset(read_dataset(mixed, SPEC), SPEC, progress=False).errors
    assert problem.file == str(data_dir / "lung1_label.nrrd")
    assert "shape (512, 512, 48) vs (256, 256, 25)" in problem.reason
