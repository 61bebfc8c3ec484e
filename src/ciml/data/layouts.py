"""Dataset readers: turn a folder (or a CSV list) in a layout users already have into ``list[Case]``.

Readers only look at file names; nothing is decompressed here. A file a case should have but lacks is
still put in the case (at the path it should have), so that :mod:`ciml.data.integrity` reports it with
every other problem instead of the reader stopping at the first one. Readers raise
:class:`DatasetLayoutError` only when no list of cases can be built at all (empty or unknown folder,
malformed ``dataset.json`` or CSV, duplicate case ids).

Layouts (``layout=`` names):

* ``brats``: ``BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii(.gz)``; validation
  cases have no ``seg`` (label None). The folder may hold the case folders or folders of them.
* ``autopet``: ``PATIENT/STUDY/{SUV,CTres,SEG}.nii.gz`` (or study folders directly); pet <- SUV,
  ct <- CTres, and ``Case.group`` is the patient so that splits are patient-level.
* ``hecktor``: ``imagesTr/CHUM-001__CT.nii.gz``, ``imagesTr/CHUM-001__PT.nii.gz``,
  ``labelsTr/CHUM-001.nii.gz``.
* ``nnunet``: ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz`` and ``dataset.json``.
* ``csv``: a CSV file with ``case_id``, one column per modality, optional ``label`` and ``group``;
  relative paths are relative to the CSV file.

For ``hecktor`` and ``nnunet`` the folder is the dataset root (``imagesTr`` is read, or ``imagesTs``
when there is no ``imagesTr``) or an ``images*`` folder itself (its labels come from the sibling
``labels*`` folder when there is one): point at ``imagesTs`` to read test cases.

Example:
    >>> cases = read_dataset("MICCAI_BraTS2020_TrainingData", "brats2020")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ciml.data.cases import Case
from ciml.data.io import NIFTI_SUFFIXES, FileProblemError, image_suffix, is_image_file, strip_image_suffix
from ciml.tasks import TaskSpec, load_task

logger = logging.getLogger(__name__)

LAYOUTS = ("brats", "autopet", "hecktor", "nnunet", "csv")
LIST_SUFFIXES = (".csv", ".tsv")


class DatasetLayoutError(FileProblemError):
    """No list of cases can be built from a folder or list file; ``path`` and ``reason`` say why."""


# --------------------------------------------------------------------------------------------- API


def read_dataset(
    folder_or_csv: str | Path,
    spec: TaskSpec | str | Path,
    layout: str = "auto",
    *,
    check_unique: bool = True,
) -> list[Case]:
    """Read a dataset folder or CSV list into cases whose ``images`` keys are the spec's modalities.

    Args:
        folder_or_csv: dataset folder (layouts above) or CSV list file.
        spec: task spec (or preset name / YAML path); it says which modalities to look for.
        layout: one of :data:`LAYOUTS`, or ``auto`` to detect it from the file names.
        check_unique: raise on duplicate case ids. The integrity check turns this off so that it
            can report duplicates together with every other problem.

    Raises:
        DatasetLayoutError: missing or empty folder, unrecognised layout, no cases, duplicate ids.
    """
    spec = load_task(spec)
    path = Path(folder_or_csv)
    if not path.exists():
        raise DatasetLayoutError(path, "no such folder or file")
    if path.is_dir() and not any(path.iterdir()):
        raise DatasetLayoutError(path, "empty folder, no cases to read")
    name = detect_layout(path) if layout == "auto" else layout
    if name not in _READERS:
        raise DatasetLayoutError(path, f"unknown layout {layout!r} (known: auto, {', '.join(LAYOUTS)})")
    cases = _READERS[name](path, spec)
    if not cases:
        raise DatasetLayoutError(path, f"no cases found for layout '{name}' ({_LAYOUT_HINTS[name]})")
    if check_unique:
        _raise_on_duplicates(cases, path)
    return cases


def detect_layout(path: str | Path) -> str:
    """The layout name of a folder or list file, judged from file names only.

    Raises:
        DatasetLayoutError: the folder is empty or matches none of :data:`LAYOUTS`.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return "csv"
        raise DatasetLayoutError(path, "a file, but not a CSV/TSV case list (expected a folder or a .csv)")
    if not path.is_dir():
        raise DatasetLayoutError(path, "no such folder or file")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise DatasetLayoutError(path, "empty folder, no cases to read")
    images, _ = _images_and_labels_folders(path)
    if any(_HECKTOR_FILE.match(strip_image_suffix(p)) for p in _image_files(images)):
        return "hecktor"
    if _find_dataset_json(path, images) is not None:
        return "nnunet"
    if _brats_case_folders(path):
        return "brats"
    if _autopet_studies(path):
        return "autopet"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise DatasetLayoutError(
        path,
        f"unrecognised dataset layout (holds {shown}); expected one of: "
        + "; ".join(f"{k}: {v}" for k, v in _LAYOUT_HINTS.items())
        + ". Name the layout, or list the cases in a CSV",
    )


def duplicate_case_ids(cases: Iterable[Case]) -> dict[str, list[Case]]:
    """Case ids that occur more than once, each with all the cases that carry it."""
    cases = list(cases)
    counts = Counter(c.case_id for c in cases)
    return {cid: [c for c in cases if c.case_id == cid] for cid, n in counts.items() if n > 1}


def case_location(case: Case) -> Path | None:
    """A file that identifies the case on disk (its first image, else its label) for messages."""
    for path in case.images.values():
        return path
    return case.label


def load_dataset_json(path: str | Path) -> dict[str, Any]:
    """Read and validate an nnU-Net v2 ``dataset.json`` (required keys, channel ids 0..n-1).

    Returns the parsed JSON with ``channel_names`` keyed by int, in channel order.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(path, f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetLayoutError(path, "expected a JSON object")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise DatasetLayoutError(path, f"'{key}': missing required key (nnU-Net v2 dataset.json)")
    raw = data["channel_names"]
    if not isinstance(raw, Mapping) or not raw:
        raise DatasetLayoutError(path, "'channel_names': must map channel ids ('0', '1', ...) to names")
    try:
        channels = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DatasetLayoutError(path, "'channel_names': keys must be channel ids 0, 1, ...") from None
    if sorted(channels) != list(range(len(channels))):
        raise DatasetLayoutError(
            path, f"'channel_names': ids must be 0..{len(channels) - 1}, got {sorted(channels)}"
        )
    data["channel_names"] = dict(sorted(channels.items()))
    if not isinstance(data["file_ending"], str) or not data["file_ending"].startswith("."):
        raise DatasetLayoutError(path, "'file_ending': expected a suffix such as '.nii.gz'")
    return data


# ------------------------------------------------------------------------------------------ helpers


def _map_modalities(
    path: Path, spec: TaskSpec, aliases: Mapping[str, str], by_type: Mapping[str, str], layout: str
) -> dict[str, str]:
    """Spec modality -> the layout's file token, by modality name first, then by modality type."""
    mapping = {}
    for name, kind in spec.modalities.items():
        token = aliases.get(name.lower()) or by_type.get(kind)
        if token is None:
            raise DatasetLayoutError(
                path,
                f"task '{spec.name}': modality '{name}' has no file in the {layout} layout "
                f"(its files are {', '.join(sorted(set(aliases.values())))})",
            )
        mapping[name] = token
    repeated = [t for t, n in Counter(mapping.values()).items() if n > 1]
    if repeated:
        names = [m for m, t in mapping.items() if t == repeated[0]]
        raise DatasetLayoutError(
            path,
            f"task '{spec.name}': modalities {', '.join(names)} all map to {layout} file '{repeated[0]}'",
        )
    return mapping


def _existing_or_default(folder: Path, stem: str, suffixes: Iterable[str], default_suffix: str) -> Path:
    """``folder/stem+suffix`` for the first suffix that exists, else the default (reported missing later)."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return folder / f"{stem}{default_suffix}"


def _image_files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _raise_on_duplicates(cases: list[Case], source: Path) -> None:
    duplicates = duplicate_case_ids(cases)
    if duplicates:
        cid, group = next(iter(duplicates.items()))
        where = ", ".join(str(case_location(c)) for c in group)
        more = f" ({len(duplicates) - 1} more duplicated ids)" if len(duplicates) > 1 else ""
        raise DatasetLayoutError(source, f"duplicate case id '{cid}' ({where}){more}")


# -------------------------------------------------------------------------------------------- BraTS

_BRATS_ALIASES = {
    "flair": "flair",
    "t2flair": "flair",
    "t1": "t1",
    "t1ce": "t1ce",
    "t1gd": "t1ce",
    "t1c": "t1ce",
    "t2": "t2",
}
# Kaggle's BraTS2020 copy names case 355's label W39_1998.09.19_Segm.nii (ANCHORS E.1).
_BRATS_LABEL_ALIAS = re.compile(r"(^|_)segm?\.nii(\.gz)?$", re.IGNORECASE)


def _is_brats_case(folder: Path) -> bool:
    return any(
        (folder / f"{folder.name}_{token}{suffix}").is_file()
        for token in ("flair", "t1", "t1ce", "t2")
        for suffix in NIFTI_SUFFIXES
    )


def _brats_case_folders(path: Path) -> list[Path]:
    """Case folders at depth 0, 1 or 2 (a case, a training folder, or a folder of training/validation)."""
    if _is_brats_case(path):
        return [path]
    found = []
    for child in _subfolders(path):
        if _is_brats_case(child):
            found.append(child)
        else:
            found.extend(sub for sub in _subfolders(child) if _is_brats_case(sub))
    return found


def read_brats(path: Path, spec: TaskSpec) -> list[Case]:
    """BraTS 2018-2021 folders: one folder per case, files ``<case>_<modality>.nii(.gz)``."""
    mapping = _map_modalities(path, spec, _BRATS_ALIASES, {}, "brats")
    return [_brats_case(folder, mapping) for folder in _brats_case_folders(path)]


def _brats_case(folder: Path, mapping: dict[str, str]) -> Case:
    cid = folder.name
    suffixes = Counter(image_suffix(p) for p in folder.iterdir() if image_suffix(p) in NIFTI_SUFFIXES)
    default = suffixes.most_common(1)[0][0] if suffixes else ".nii.gz"
    order = (default,) + tuple(s for s in NIFTI_SUFFIXES if s != default)
    images = {
        m: _existing_or_default(folder, f"{cid}_{token}", order, default) for m, token in mapping.items()
    }
    label = _existing_or_default(folder, f"{cid}_seg", order, default)
    extra = {"layout": "brats"}
    if not label.is_file():
        aliases = [p for p in folder.iterdir() if p.is_file() and _BRATS_LABEL_ALIAS.search(p.name)]
        label = aliases[0] if len(aliases) == 1 else None
        if label is not None:
            extra["label_alias"] = label.name
    return Case(case_id=cid, images=images, label=label, extra=extra)


# ------------------------------------------------------------------------------------------ autoPET

_AUTOPET_ALIASES = {"pet": "SUV", "suv": "SUV", "ct": "CTres", "ctres": "CTres"}
_AUTOPET_BY_TYPE = {"pet": "SUV", "ct": "CTres"}


def _is_autopet_study(folder: Path) -> bool:
    return any(
        (folder / f"{name}{suffix}").is_file() for name in ("SUV", "CTres") for suffix in NIFTI_SUFFIXES
    )


def _autopet_studies(path: Path) -> list[tuple[str | None, Path]]:
    """(patient or None, study folder) pairs: a study, study folders, or patient/study folders."""
    if _is_autopet_study(path):
        return [(None, path)]
    found: list[tuple[str | None, Path]] = []
    for child in _subfolders(path):
        if _is_autopet_study(child):
            found.append((None, child))
        else:
            found.extend((child.name, study) for study in _subfolders(child) if _is_autopet_study(study))
    return found


def read_autopet(path: Path, spec: TaskSpec) -> list[Case]:
    """autoPET (FDG-PET-CT-Lesions): ``PATIENT/STUDY/{SUV,CTres,SEG}.nii.gz``; group = patient."""
    mapping = _map_modalities(path, spec, _AUTOPET_ALIASES, _AUTOPET_BY_TYPE, "autopet")
    cases = []
    for patient, study in _autopet_studies(path):
        images = {
            m: _existing_or_default(study, token, NIFTI_SUFFIXES, ".nii.gz") for m, token in mapping.items()
        }
        label = _existing_or_default(study, "SEG", NIFTI_SUFFIXES, ".nii.gz")
        extra = {"layout": "autopet", "study": study.name}
        if patient is not None:
            extra["patient"] = patient
        cases.append(
            Case(
                case_id=f"{patient}_{study.name}" if patient else study.name,
                images=images,
                label=label if label.is_file() else None,
                group=patient,
                extra=extra,
            )
        )
    return cases


# --------------------------------------------------------------------------- images*/labels* folders


def _images_and_labels_folders(path: Path) -> tuple[Path | None, Path | None]:
    """The images folder to read and its labels folder (None when absent), per the module docstring."""
    if path.is_file():
        return None, None
    for images_name in ("imagesTr", "imagesTs"):
        if (path / images_name).is_dir():
            return path / images_name, _labels_for(path / images_name)
    if path.name.lower().startswith("images"):
        return path, _labels_for(path)
    return path, None


def _labels_for(images: Path) -> Path | None:
    labels = images.parent / ("labels" + images.name[len("images") :])
    return labels if labels.is_dir() else None


def _label_path(labels: Path | None, cid: str, suffixes: tuple[str, ...], default: str) -> Path | None:
    """Label in the labels folder; when that folder exists but lacks the file, the expected path."""
    if labels is None:
        return None
    return _existing_or_default(labels, cid, suffixes, default)


# ----------------------------------------------------------------------------------------- HECKTOR

_HECKTOR_FILE = re.compile(r"^(?P<case>.+)__(?P<token>CT|PT)$")
_HECKTOR_ALIASES = {"ct": "CT", "pet": "PT", "pt": "PT"}
_HECKTOR_BY_TYPE = {"ct": "CT", "pet": "PT"}


def read_hecktor(path: Path, spec: TaskSpec) -> list[Case]:
    """HECKTOR 2022: ``imagesTr/<Center>-<ID>__{CT,PT}.nii.gz`` and ``labelsTr/<Center>-<ID>.nii.gz``.

    CT and PET keep their own grids here (PET is coarser); preprocessing resamples them onto one.
    """
    mapping = _map_modalities(path, spec, _HECKTOR_ALIASES, _HECKTOR_BY_TYPE, "hecktor")
    images_dir, labels_dir = _images_and_labels_folders(path)
    found: dict[str, dict[str, Path]] = {}
    for file in _image_files(images_dir):
        match = _HECKTOR_FILE.match(strip_image_suffix(file))
        if match:
            found.setdefault(match["case"], {})[match["token"]] = file
    cases = []
    for cid in sorted(found):
        files = found[cid]
        default = image_suffix(next(iter(files.values())))
        images = {
            m: files.get(token, images_dir / f"{cid}__{token}{default}") for m, token in mapping.items()
        }
        label = _label_path(labels_dir, cid, (default,) + NIFTI_SUFFIXES, default)
        cases.append(Case(case_id=cid, images=images, label=label, extra={"layout": "hecktor"}))
    return cases


# ----------------------------------------------------------------------------------------- nnU-Net

_NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _find_dataset_json(path: Path, images: Path | None) -> Path | None:
    for folder in (path, images.parent if images is not None else None):
        if folder is not None and (folder / "dataset.json").is_file():
            return folder / "dataset.json"
    return None


def read_nnunet(path: Path, spec: TaskSpec) -> list[Case]:
    """nnU-Net v2 raw: ``imagesTr/CASE_XXXX<ending>``, ``labelsTr/CASE<ending>``, ``dataset.json``.

    Channels map to the spec's modalities by name (case-insensitive) when the names match, else by
    order (logged, since e.g. autoPET's conversion names both channels "CT").
    """
    images_dir, labels_dir = _images_and_labels_folders(path)
    json_path = _find_dataset_json(path, images_dir)
    if json_path is None or images_dir is None:
        raise DatasetLayoutError(path, "no dataset.json here or next to the images folder (nnU-Net layout)")
    info = load_dataset_json(json_path)
    ending = info["file_ending"]
    channel_of = _map_channels(spec, info["channel_names"], json_path)
    found = _nnunet_files(images_dir, ending, len(info["channel_names"]), json_path)
    cases = []
    for cid in sorted(found):
        images = {
            m: found[cid].get(ch, images_dir / f"{cid}_{ch:04d}{ending}") for m, ch in channel_of.items()
        }
        label = labels_dir / f"{cid}{ending}" if labels_dir is not None else None
        extra = {"layout": "nnunet", "channels": ",".join(f"{m}={ch:04d}" for m, ch in channel_of.items())}
        cases.append(Case(case_id=cid, images=images, label=label, extra=extra))
    expected = info.get("numTraining")
    if images_dir.name == "imagesTr" and isinstance(expected, int) and expected != len(cases):
        raise DatasetLayoutError(
            json_path, f"'numTraining' is {expected} but {images_dir} holds {len(cases)} cases"
        )
    return cases


def _map_channels(spec: TaskSpec, channels: dict[int, str], json_path: Path) -> dict[str, int]:
    names = [n.lower() for n in channels.values()]
    if len(channels) != len(spec.modalities):
        raise DatasetLayoutError(
            json_path,
            f"'channel_names' lists {len(channels)} channels ({', '.join(channels.values())}) "
            f"but task '{spec.name}' has {len(spec.modalities)} modalities ({', '.join(spec.modalities)})",
        )
    if len(set(names)) == len(names) and set(names) == {m.lower() for m in spec.modalities}:
        return {m: names.index(m.lower()) for m in spec.modalities}
    logger.warning(
        "%s: channel names %s do not match task '%s' modalities %s; mapping them by order",
        json_path,
        list(channels.values()),
        spec.name,
        list(spec.modalities),
    )
    return {m: i for i, m in enumerate(spec.modalities)}


def _nnunet_files(
    images_dir: Path, ending: str, n_channels: int, json_path: Path
) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for file in sorted(images_dir.iterdir()):
        if not file.name.endswith(ending) or file.name.startswith("."):
            continue
        match = _NNUNET_FILE.match(file.name[: -len(ending)])
        if not match:
            raise DatasetLayoutError(
                file, f"not named CASE_XXXX{ending} (4-digit channel id), as nnU-Net expects"
            )
        channel = int(match["channel"])
        if channel >= n_channels:
            raise DatasetLayoutError(
                file, f"channel {channel:04d}, but {json_path} lists {n_channels} channels"
            )
        found.setdefault(match["case"], {})[channel] = file
    return found


# --------------------------------------------------------------------------------------------- CSV


def read_csv_list(path: Path, spec: TaskSpec) -> list[Case]:
    """A CSV (or TSV) list: ``case_id``, one column per modality, optional ``label`` and ``group``.

    Empty label cells mean no label; empty modality cells leave the modality out of the case (the
    integrity check reports it).
    """
    rows, columns = _read_table(path)
    lower = {c.lower(): c for c in columns}
    wanted = ["case_id", *spec.modalities]
    missing = [w for w in wanted if w.lower() not in lower]
    if missing:
        raise DatasetLayoutError(
            path, f"missing column(s) {', '.join(missing)} (columns: {', '.join(columns)})"
        )
    cases = []
    for line, row in enumerate(rows, start=2):
        cid = (row.get(lower["case_id"]) or "").strip()
        if not cid:
            raise DatasetLayoutError(path, f"line {line}: empty case_id")
        images = {
            m: _resolve(path, row[lower[m.lower()]])
            for m in spec.modalities
            if (row.get(lower[m.lower()]) or "").strip()
        }
        label_cell = (row.get(lower.get("label", ""), "") or "").strip()
        group = (row.get(lower.get("group", ""), "") or "").strip() or None
        cases.append(
            Case(
                case_id=cid,
                images=images,
                label=_resolve(path, label_cell) if label_cell else None,
                group=group,
                extra={"layout": "csv"},
            )
        )
    return cases


def _read_table(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetLayoutError(path, f"cannot read the case list: {exc}") from None
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    return rows, columns


def _resolve(list_file: Path, cell: str) -> Path:
    path = Path(cell.strip()).expanduser()
    return path if path.is_absolute() else list_file.parent / path


_READERS: dict[str, Callable[[Path, TaskSpec], list[Case]]] = {
    "brats": read_brats,
    "autopet": read_autopet,
    "hecktor": read_hecktor,
    "nnunet": read_nnunet,
    "csv": read_csv_list,
}

_LAYOUT_HINTS = {
    "brats": "CASE/CASE_{flair,t1,t1ce,t2,seg}.nii.gz",
    "autopet": "PATIENT/STUDY/{SUV,CTres,SEG}.nii.gz",
    "hecktor": "imagesTr/CASE__{CT,PT}.nii.gz and labelsTr/CASE.nii.gz",
    "nnunet": "dataset.json, imagesTr/CASE_0000.nii.gz and labelsTr/CASE.nii.gz",
    "csv": "a .csv with case_id, one column per modality and an optional label",
}
