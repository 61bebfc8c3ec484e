"""Integrity check of a dataset before anything trains on it (nnU-Net's verify_dataset_integrity, stricter).

Every file is read once and fully decompressed (a truncated ``.nii.gz`` usually has an intact header),
and every problem is collected rather than stopping at the first, so one run lists all that must be
fixed. Each :class:`Problem` names the file and the reason.

Errors (the dataset must not be used): missing, empty, truncated or unreadable files; shape, spacing,
orientation or affine mismatch between a case's modalities and its label; NaN/inf voxels; constant
(zero-variance) modalities; non-integer label values or values the task spec does not know; no cases;
duplicate case ids. Warnings: a label with only background; a case without label in a set where
other cases have one. Notes: facts worth knowing that are not wrong, e.g. HECKTOR's PET on a coarser
grid than its CT (preprocessing resamples it).

Example:
    >>> cases = read_dataset("BraTS2020_TrainingData", "brats2020")  # doctest: +SKIP
    >>> report = check_dataset(cases, load_task("brats2020"))  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ciml.data.cases import Case
from ciml.data.io import ImageHeader, ImageReadError, load_image, select_volume
from ciml.data.layouts import (
    ChannelMappingError,
    DatasetLayoutError,
    case_location,
    duplicate_case_ids,
    read_dataset,
)
from ciml.errors import CimlError
from ciml.tasks import TaskSpec, load_task

ERROR, WARNING, NOTE = "error", "warning", "note"
SEVERITIES = (ERROR, WARNING, NOTE)

# Geometry tolerances: float noise from converters and float32 headers, far below a real mismatch.
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05  # origins may differ by 5 % of the smallest voxel size

# Layouts whose modalities legitimately come on different grids (HECKTOR: CT 1 mm, PET 4 mm).
MULTI_GRID_LAYOUTS = frozenset({"hecktor"})


class DatasetIntegrityError(CimlError):
    """The dataset has errors; the message is the report summary followed by the first errors."""


@dataclass(frozen=True)
class Problem:
    """One finding: ``severity`` is error, warning or note; ``file`` names where, ``reason`` what."""

    severity: str
    file: str
    reason: str
    case_id: str | None = None

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.reason}"


@dataclass
class IntegrityReport:
    """Everything :func:`check_dataset` found, plus what it looked at."""

    problems: list[Problem] = field(default_factory=list)
    n_cases: int = 0
    n_files: int = 0
    source: str | None = None

    def by_severity(self, severity: str) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self.by_severity(ERROR)

    @property
    def warnings(self) -> list[Problem]:
        return self.by_severity(WARNING)

    @property
    def notes(self) -> list[Problem]:
        return self.by_severity(NOTE)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and notes do not fail a dataset)."""
        return not self.errors

    def summary(self) -> str:
        where = f"{self.source}: " if self.source else ""
        counts = ", ".join(_plural(len(self.by_severity(s)), s) for s in SEVERITIES)
        verdict = "OK" if self.ok else "NOT usable until the errors are fixed"
        checked = f"{_plural(self.n_cases, 'case')} ({_plural(self.n_files, 'file')})"
        return f"{where}checked {checked}: {counts}; {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ok": self.ok,
            "n_cases": self.n_cases,
            "n_files": self.n_files,
            "counts": {s: len(self.by_severity(s)) for s in SEVERITIES},
            "summary": self.summary(),
            "problems": [asdict(p) for p in self.problems],
        }


def check_dataset(
    cases: Sequence[Case],
    spec: TaskSpec | str | Path,
    *,
    source: str | Path | None = None,
    require_labels: bool | None = None,
    progress: bool = True,
    workers: int = 1,
) -> IntegrityReport:
    """Check every file of every case and collect all problems (see the module docstring).

    Args:
        cases: cases from :func:`ciml.data.layouts.read_dataset` (duplicates are reported here).
        spec: task spec: its modalities must be present, its label values are the allowed ones.
        source: dataset folder or list file, named in dataset-level problems and the summary.
        require_labels: True for a training set (each unlabelled case is a warning, no label at all
            an error); False to ignore labels being absent; None to warn about unlabelled cases only
            when other cases have labels.
        progress: show a progress bar over cases.
        workers: processes reading cases in parallel (1: in this process). Reading is the cost:
            every file is decompressed in full.
    """
    spec = load_task(spec)
    cases = list(cases)
    where = str(source) if source is not None else "dataset"
    report = IntegrityReport(n_cases=len(cases), source=str(source) if source is not None else None)
    if not cases:
        report.problems.append(Problem(ERROR, where, "no cases found (empty dataset)"))
        return report
    report.problems.extend(_duplicate_problems(cases))
    report.problems.extend(_label_presence_problems(cases, where, require_labels))
    for problems, n_files in tqdm(
        _map_cases(cases, spec, workers),
        total=len(cases),
        desc="checking cases",
        unit="case",
        disable=not progress,
    ):
        report.problems.extend(problems)
        report.n_files += n_files
    report.problems = _summarise_background_only(report.problems, where)
    return report


_BACKGROUND_ONLY = "label holds only background (0): no foreground in this case"


def _summarise_background_only(problems: list[Problem], where: str, shown: int = 5) -> list[Problem]:
    """One line for all labels without foreground (autoPET has hundreds of negative studies), not one each."""
    empty = [p for p in problems if p.reason == f"label: {_BACKGROUND_ONLY}"]
    if len(empty) < 2:
        return problems
    ids = [p.case_id or p.file for p in empty]
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    line = Problem(
        WARNING,
        where,
        f"{len(ids)} cases have a label with only background (0), e.g. negative studies: "
        f"{', '.join(ids[:shown])}{more}",
    )
    first = problems.index(empty[0])
    kept = [p for p in problems if p not in empty]
    return kept[:first] + [line] + kept[first:]


def _map_cases(cases: list[Case], spec: TaskSpec, workers: int) -> Iterator[tuple[list[Problem], int]]:
    """Results of :func:`_check_case` in case order, from a process pool when ``workers > 1``."""
    if workers <= 1 or len(cases) == 1:
        yield from (_check_case(case, spec) for case in cases)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        yield from pool.map(_check_case, cases, itertools.repeat(spec))


def check_folder(
    folder_or_csv: str | Path,
    spec: TaskSpec | str | Path,
    layout: str = "auto",
    *,
    require_labels: bool | None = None,
    progress: bool = True,
    workers: int = 1,
    channels: Mapping[str, int] | None = None,
) -> IntegrityReport:
    """Read a dataset folder or CSV list and check it; a folder that yields no cases is one error.

    Duplicate case ids are reported with the other problems instead of stopping the read. ``channels``
    is that of :func:`~ciml.data.layouts.read_dataset`; the other keyword arguments are those of
    :func:`check_dataset`.

    Raises:
        ChannelMappingError: the dataset's channel names do not say which modality is which.
    """
    try:
        cases = read_dataset(folder_or_csv, spec, layout, check_unique=False, channels=channels)
    except ChannelMappingError:
        raise  # the caller has to say which channel is which; not a problem of the files
    except DatasetLayoutError as exc:
        report = IntegrityReport(source=str(folder_or_csv))
        report.problems.append(Problem(ERROR, str(exc.path), exc.reason))
        return report
    return check_dataset(
        cases, spec, source=folder_or_csv, require_labels=require_labels, progress=progress, workers=workers
    )


def ensure_dataset_ok(
    cases: Sequence[Case],
    spec: TaskSpec | str | Path,
    *,
    source: str | Path | None = None,
    require_labels: bool = True,
    progress: bool = True,
    workers: int = 1,
    max_listed: int = 10,
) -> IntegrityReport:
    """Check the cases and refuse them when there is any error (training calls this first).

    Returns:
        The report (it may hold warnings and notes).

    Raises:
        DatasetIntegrityError: with the summary and the first ``max_listed`` errors.
    """
    report = check_dataset(
        cases, spec, source=source, require_labels=require_labels, progress=progress, workers=workers
    )
    if not report.ok:
        listed = "; ".join(str(p) for p in report.errors[:max_listed])
        more = f"; ... and {len(report.errors) - max_listed} more" if len(report.errors) > max_listed else ""
        raise DatasetIntegrityError(
            f"{report.summary()}. {listed}{more}. Run `ciml check-data` for the full list"
        )
    return report


# ------------------------------------------------------------------------------------ dataset level


def _duplicate_problems(cases: list[Case]) -> list[Problem]:
    problems = []
    for cid, group in duplicate_case_ids(cases).items():
        first = case_location(group[0])
        for case in group[1:]:
            file = str(case_location(case) or cid)
            problems.append(Problem(ERROR, file, f"duplicate case id '{cid}' (also used by {first})", cid))
    return problems


def _label_presence_problems(cases: list[Case], where: str, require_labels: bool | None) -> list[Problem]:
    unlabelled = [c for c in cases if c.label is None]
    if require_labels is False or not unlabelled:
        return []
    if len(unlabelled) == len(cases):
        if require_labels:
            return [Problem(ERROR, where, "no case has a label file; training needs labels")]
        return [Problem(NOTE, where, "no case has a label file: usable for inference only")]
    return [
        Problem(
            WARNING, str(case_location(c) or c.case_id), f"case '{c.case_id}' has no label file", c.case_id
        )
        for c in unlabelled
    ]


# --------------------------------------------------------------------------------------- case level


@dataclass(frozen=True)
class _Checked:
    """What is kept of a file once its voxels are checked and dropped."""

    role: str
    header: ImageHeader
    spatial_shape: tuple[int, ...]


def _check_case(case: Case, spec: TaskSpec) -> tuple[list[Problem], int]:
    problems: list[Problem] = []
    checked: list[_Checked] = []
    roles: list[tuple[str, Path | None]] = [(m, case.images.get(m)) for m in spec.modalities]
    if case.label is not None:
        roles.append(("label", case.label))
    files: dict[Path, tuple[np.ndarray, ImageHeader] | ImageReadError] = {}  # a 4D file is read once
    for role, path in roles:
        if path is None:
            file = str(case_location(case) or case.case_id)
            reason = f"case '{case.case_id}' has no file for modality '{role}'"
            problems.append(Problem(ERROR, file, reason, case.case_id))
            continue
        if path not in files:
            files[path] = _read(path)
        file_problems, file_checked = _check_file(role, files[path], spec, case, path)
        problems.extend(file_problems)
        if file_checked is not None:
            checked.append(file_checked)
    problems.extend(_check_geometry(case, checked))
    return problems, len(files)


def _read(path: Path) -> tuple[np.ndarray, ImageHeader] | ImageReadError:
    try:
        return load_image(path)
    except ImageReadError as exc:
        return exc


def _check_file(
    role: str, read: tuple[np.ndarray, ImageHeader] | ImageReadError, spec: TaskSpec, case: Case, path: Path
) -> tuple[list[Problem], _Checked | None]:
    """Check one file's voxels (one volume of it for a 4D file) and keep its geometry (None if unreadable)."""
    case_id = case.case_id
    try:
        if isinstance(read, ImageReadError):
            raise read
        array, header = read
        if role in case.volumes:
            array, header = select_volume(array, header, case.volumes[role])
    except ImageReadError as exc:
        return [Problem(ERROR, str(path), f"{role}: {exc.reason}", case_id)], None
    n_spatial = len(header.spacing)
    array = _squeeze_extra_axes(array, n_spatial)
    problems = []
    if array.ndim not in (2, 3) or array.ndim != n_spatial:
        problems.append(
            Problem(
                ERROR, str(path), f"{role}: expected one 2D or 3D image, got shape {array.shape}", case_id
            )
        )
    check = _label_problems if role == "label" else _image_problems
    problems.extend(
        Problem(sev, str(path), f"{role}: {reason}", case_id) for sev, reason in check(array, spec)
    )
    return problems, _Checked(role, header, tuple(array.shape[:n_spatial]))


def _squeeze_extra_axes(array: np.ndarray, n_spatial: int) -> np.ndarray:
    """Drop singleton axes after the spatial ones (a 4D NIfTI with one volume is a 3D image)."""
    while array.ndim > n_spatial and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _nonfinite(array: np.ndarray) -> list[tuple[str, str]]:
    if not np.issubdtype(array.dtype, np.floating):
        return []
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if not n_nan and not n_inf:
        return []
    return [(ERROR, f"{n_nan} NaN and {n_inf} inf voxels (of {array.size})")]


def _image_problems(array: np.ndarray, spec: TaskSpec) -> list[tuple[str, str]]:
    problems = _nonfinite(array)
    finite = array[np.isfinite(array)] if problems else array
    if finite.size and finite.min() == finite.max():
        problems.append((ERROR, f"constant image: every voxel is {finite.flat[0].item():g} (zero variance)"))
    return problems


def _label_problems(array: np.ndarray, spec: TaskSpec) -> list[tuple[str, str]]:
    problems = _nonfinite(array)
    if problems:
        return problems
    values = _unique_values(array)
    fractional = values[values != np.round(values)]
    if fractional.size:
        shown = ", ".join(f"{v:g}" for v in fractional[:5])
        return [(ERROR, f"non-integer label values ({shown}{', ...' if fractional.size > 5 else ''})")]
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(spec.label_values))
    if unknown:
        allowed = ", ".join(str(v) for v in spec.label_values)
        shown = ", ".join(str(v) for v in unknown[:10])
        return [(ERROR, f"label values {shown} are not in task '{spec.name}' label values ({allowed})")]
    if values.size == 1 and values[0] == 0:
        return [(WARNING, _BACKGROUND_ONLY)]
    return []


def _unique_values(array: np.ndarray) -> np.ndarray:
    """Distinct values; a bincount for small non-negative integers, which is much faster than sorting."""
    if np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:
            return np.flatnonzero(np.bincount(array.ravel().astype(np.int64, copy=False), minlength=high + 1))
    return np.unique(array)


# ----------------------------------------------------------------------------------------- geometry


def _check_geometry(case: Case, checked: list[_Checked]) -> list[Problem]:
    """Modalities and label must share one grid; multi-grid layouts may differ between modalities."""
    images = [c for c in checked if c.role != "label"]
    label = next((c for c in checked if c.role == "label"), None)
    if not images:
        return []
    if case.extra.get("layout") not in MULTI_GRID_LAYOUTS:
        others = images[1:] + ([label] if label else [])
        return [p for other in others for p in _compare(images[0], other, case.case_id, ERROR)]
    problems = []
    for other in images[1:]:
        problems.extend(_multi_grid_problems(images[0], other, case.case_id))
    if label and all(_grid_differences(image, label) for image in images):
        problems.extend(_compare(images[0], label, case.case_id, ERROR))
    return problems


def _compare(ref: _Checked, other: _Checked, case_id: str, severity: str) -> list[Problem]:
    differences = _grid_differences(ref, other)
    if not differences:
        return []
    reason = f"{other.role}: grid differs from {ref.role} ({ref.header.path.name}): {'; '.join(differences)}"
    return [Problem(severity, str(other.header.path), reason, case_id)]


def _grid_differences(ref: _Checked, other: _Checked) -> list[str]:
    """Human-readable differences of shape, spacing, orientation and affine (empty when equal)."""
    a, b = ref.header, other.header
    out = []
    if ref.spatial_shape != other.spatial_shape:
        out.append(f"shape {other.spatial_shape} vs {ref.spatial_shape}")
    if len(a.spacing) != len(b.spacing) or not np.allclose(b.spacing, a.spacing, rtol=SPACING_RTOL, atol=0):
        out.append(f"spacing {_fmt(b.spacing)} mm vs {_fmt(a.spacing)} mm")
    if a.orientation != b.orientation:
        out.append(f"orientation {b.orientation} vs {a.orientation}")
        return out
    dir_a, dir_b = _directions(a.affine), _directions(b.affine)
    if not np.allclose(dir_a, dir_b, atol=DIRECTION_ATOL):
        angle = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->j", dir_a, dir_b).min(), -1, 1)))
        out.append(f"affine direction differs (axes rotated by up to {angle:.2g} degrees)")
    shift = float(np.linalg.norm(a.affine[:3, 3] - b.affine[:3, 3]))
    if shift > ORIGIN_TOL_VOXELS * min(min(a.spacing), min(b.spacing)):
        out.append(f"affine origin {shift:.3g} mm apart ({_fmt(b.affine[:3, 3])} vs {_fmt(a.affine[:3, 3])})")
    return out


def _multi_grid_problems(ref: _Checked, other: _Checked, case_id: str) -> list[Problem]:
    """Different grids are fine when the volumes overlap in space (a note); no overlap is an error."""
    differences = _grid_differences(ref, other)
    if not differences:
        return []
    overlap = _overlap_fraction(ref, other)
    path = str(other.header.path)
    if overlap <= 0:
        reason = f"{other.role}: does not overlap {ref.role} ({ref.header.path.name}) in physical space"
        return [Problem(ERROR, path, reason, case_id)]
    reason = (
        f"{other.role}: on a different grid than {ref.role} ({'; '.join(differences)}); the volumes overlap "
        f"({overlap:.0%} of the smaller one), preprocessing resamples onto one grid"
    )
    return [Problem(NOTE, path, reason, case_id)]


def _overlap_fraction(a: _Checked, b: _Checked) -> float:
    """Overlap of the two world-space bounding boxes, as a fraction of the smaller box's volume."""
    lows, highs = zip(*(_world_box(c) for c in (a, b)), strict=True)
    low, high = np.maximum(*lows), np.minimum(*highs)
    inter = float(np.prod(np.clip(high - low, 0, None)))
    smaller = min(float(np.prod(h - lo)) for lo, h in zip(lows, highs, strict=True))
    return inter / smaller if smaller > 0 else 0.0


def _world_box(c: _Checked) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box around the voxel corners (voxel centres +- half a voxel)."""
    shape = list(c.spatial_shape) + [1] * (3 - len(c.spatial_shape))
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    world = corners @ c.header.affine[:3, :3].T + c.header.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _directions(affine: np.ndarray) -> np.ndarray:
    matrix = affine[:3, :3]
    return matrix / np.linalg.norm(matrix, axis=0, keepdims=True)


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
