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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciml.data.cases import Case
from ciml.data.io import (
    NIFTI_SUFFIXES,
    FileProblemError,
    image_suffix,
    is_hidden,
    is_image_file,
    strip_image_suffix,
)
from ciml.tasks import TaskSpec, TaskSpecError, load_task, preset_names

logger = logging.getLogger(__name__)

LAYOUTS = ("brats", "autopet", "hecktor", "nnunet", "msd", "csv")
#: Layouts whose channels are numbered (``channels=`` applies to them).
CHANNEL_LAYOUTS = ("nnunet", "msd")
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
    channels: Mapping[str, int] | None = None,
) -> list[Case]:
    """Read a dataset folder or CSV list into cases whose ``images`` keys are the spec's modalities.

    Args:
        folder_or_csv: dataset folder (layouts above) or CSV list file.
        spec: task spec (or preset name / YAML path); it says which modalities to look for.
        layout: one of :data:`LAYOUTS`, or ``auto`` to detect it from the file names.
        check_unique: raise on duplicate case ids. The integrity check turns this off so that it
            can report duplicates together with every other problem.
        channels: modality -> channel id, for datasets whose channel names do not say which channel is
            which modality (nnunet and msd layouts only).

    Raises:
        DatasetLayoutError: missing or empty folder, unrecognised layout, no cases, duplicate ids.
        ChannelMappingError: the dataset's channel names do not decide which modality is which.
    """
    spec = load_task(spec)
    path = Path(folder_or_csv)
    if not path.exists():
        raise DatasetLayoutError(path, "no such folder or file")
    if path.is_dir() and all(is_hidden(p) for p in path.iterdir()):
        raise DatasetLayoutError(path, "empty folder, no cases to read")
    name = detect_layout(path) if layout == "auto" else layout
    if name not in _READERS and name not in _CHANNEL_READERS:
        raise DatasetLayoutError(path, f"unknown layout {layout!r} (known: auto, {', '.join(LAYOUTS)})")
    if name in _CHANNEL_READERS:
        cases = _CHANNEL_READERS[name](path, spec, channels)
    elif channels is not None:
        raise DatasetLayoutError(path, f"channels: only for the nnunet and msd layouts, this is {name}")
    else:
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
    entries = sorted(p.name for p in path.iterdir() if not is_hidden(p))
    if not entries:
        raise DatasetLayoutError(path, "empty folder, no cases to read")
    images, _ = _images_and_labels_folders(path)
    if any(_HECKTOR_FILE.match(strip_image_suffix(p)) for p in _image_files(images)):
        return "hecktor"
    json_path = _find_dataset_json(path, images)
    if json_path is not None:
        return "msd" if _is_msd_json(json_path) else "nnunet"
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

# A modality is matched to a file or channel by what it is, not by how one release spells it.
_MODALITY_SYNONYMS = {
    "flair": ("flair", "t2flair", "t2f", "fla"),
    "t1": ("t1", "t1n", "t1w", "t1native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1contrast"),
    "t2": ("t2", "t2w"),
    "ct": ("ct", "ctres"),
    "pet": ("pet", "pt", "suv"),
}


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def modality_concept(name: str) -> str | None:
    """What a modality name means (``T1Gd``, ``t1c`` -> ``t1ce``; ``SUV`` -> ``pet``), or None."""
    key = _normalized(name)
    return next((concept for concept, names in _MODALITY_SYNONYMS.items() if key in names), None)


# Label names that mean the same tissue in different releases (BraTS 2020, 2023, 2024, MSD, nnU-Net).
_TISSUE_SYNONYMS = {
    "necrosis": ("ncr", "ncrnet", "netc", "net", "necrosis", "necrotic", "necrotictumorcore",
                 "nonenhancingtumor", "nonenhancingtumorcore", "nonenhancing"),
    "edema": ("ed", "snfh", "edema", "oedema", "peritumoraledema", "peritumoraledematissue"),
    "enhancing": ("et", "enhancingtumor", "enhancing", "enhancingtumour"),
    "cavity": ("rc", "resectioncavity", "cavity"),
    "cyst": ("cc", "cysticcomponent", "cyst"),
}  # fmt: skip


def tissue_concept(name: str) -> str:
    """What a label name means (``NETC``, ``non-enhancing tumour`` -> ``necrosis``), else the name itself."""
    key = _normalized(name.replace("tumour", "tumor"))
    return next((concept for concept, names in _TISSUE_SYNONYMS.items() if key in names), key)


def label_conflicts(dataset: Mapping[int, str], spec_names: Mapping[int, str]) -> list[int]:
    """Label values both sides name, with names that mean different tissues."""
    return [
        v
        for v in sorted(set(dataset) & set(spec_names))
        if tissue_concept(dataset[v]) != tissue_concept(spec_names[v])
    ]


def _refuse_label_conflicts(path: Path, what: str, dataset: Mapping[int, str], spec: TaskSpec) -> None:
    conflicts = label_conflicts(dataset, spec.label_names)
    if conflicts:
        raise DatasetLayoutError(
            path,
            f"label values mean other things here than in task '{spec.name}': {what} code "
            f"{_format_names(dataset)}, the task {_format_names(spec.label_names)} "
            f"(conflicting: {', '.join(map(str, conflicts))}); choose the task written for this dataset",
        )


@dataclass(frozen=True)
class _BratsNaming:
    """How one generation of BraTS releases names a case's files: ``<case><sep><token>.nii.gz``."""

    era: str
    separator: str
    tokens: dict[str, str]  # modality concept -> file token
    labels: dict[int, str]  # what the label values mean in this generation's files


_BRATS_NAMINGS = (
    _BratsNaming(
        "BraTS 2017-2021",
        "_",
        {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
        {1: "NCR/NET", 2: "ED", 4: "ET"},
    ),
    _BratsNaming(
        "BraTS 2023+",
        "-",
        {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
        {1: "NCR", 2: "SNFH", 3: "ET"},  # 2024 GLI adds 4 RC; the label check refuses it where unknown
    ),
)
# BraTS 2023+ case folders: BraTS-GLI-00000-000 (also MEN, MET, SSA, PED, GoAT ...).
_BRATS_2023_CASE = re.compile(r"^BraTS-(?P<challenge>[A-Za-z]+)-\d+-\d+$")
# Kaggle's BraTS2020 copy names case 355's label W39_1998.09.19_Segm.nii (ANCHORS E.1).
_BRATS_LABEL_ALIAS = re.compile(r"(^|_)segm?\.nii(\.gz)?$", re.IGNORECASE)
# Shipped presets whose labels are GLI's (1 NCR/NETC, 2 SNFH, 3 ET[, 4 RC]); PED 2024 codes other tissues.
_GLI_LABEL_PRESETS = ("brats2023", "brats2024")


def _brats_naming(folder: Path) -> _BratsNaming | None:
    """The naming of a case folder, judged by its image files (None: not a BraTS case)."""
    for naming in _BRATS_NAMINGS:
        for token in naming.tokens.values():
            if any((folder / f"{folder.name}{naming.separator}{token}{s}").is_file() for s in NIFTI_SUFFIXES):
                return naming
    return None


def _brats_case_folders(path: Path) -> list[Path]:
    """Case folders at depth 0, 1 or 2 (a case, a training folder, or a folder of training/validation)."""
    if _brats_naming(path):
        return [path]
    found = []
    for child in _subfolders(path):
        if _brats_naming(child):
            found.append(child)
        else:
            found.extend(sub for sub in _subfolders(child) if _brats_naming(sub))
    return found


def _brats_tokens(path: Path, spec: TaskSpec) -> dict[str, str]:
    """Spec modality -> modality concept (flair, t1, t1ce, t2), whatever the release calls it."""
    mapping = {}
    for name in spec.modalities:
        concept = modality_concept(name)
        if concept not in _BRATS_NAMINGS[0].tokens:
            raise DatasetLayoutError(
                path,
                f"task '{spec.name}': modality '{name}' has no file in the brats layout (its files are "
                "flair, t1, t1ce, t2 up to 2021 and t2f, t1n, t1c, t2w since 2023)",
            )
        mapping[name] = concept
    return mapping


def read_brats(path: Path, spec: TaskSpec) -> list[Case]:
    """BraTS case folders: ``<case>_<modality>.nii(.gz)`` (2017-2021) or ``<case>-<modality>`` (2023+)."""
    concepts = _brats_tokens(path, spec)
    cases = []
    for folder in _brats_case_folders(path):
        naming = _brats_naming(folder)
        assert naming is not None
        _check_brats_coding(folder, naming, spec)
        cases.append(_brats_case(folder, naming, concepts))
    return cases


def _check_brats_coding(folder: Path, naming: _BratsNaming, spec: TaskSpec) -> None:
    """Refuse a spec whose label values mean other tissues in these files (label checks cannot see it).

    A 2017-2021 file's 4 is ET, which a spec coded for 2023+ (label 3 = ET, 2024's 4 = cavity) would learn
    as the cavity; MSD's 1 is edema where BraTS 2023's 1 is necrosis; BraTS-PED 2024 codes 1 ET, 2 NETC,
    3 CC, 4 ED, which the GLI presets read as other tissues.
    """
    match = _BRATS_2023_CASE.match(folder.name)
    is_ped = bool(match and match["challenge"].upper() == "PED")
    if not is_ped:
        _refuse_label_conflicts(folder, f"{naming.era} files", naming.labels, spec)
    if naming is _BRATS_NAMINGS[0] and 3 in spec.label_values:
        raise DatasetLayoutError(
            folder,
            f"{naming.era} files code 1 NCR/NET, 2 ED, 4 ET and never use label 3, but task '{spec.name}' "
            f"uses label 3 (labels {list(spec.label_values)}: BraTS 2023+ coding, where 4 is the 2024 "
            "resection cavity); use the brats2020 preset or a spec with ET = 4",
        )
    if is_ped and spec.name in _GLI_LABEL_PRESETS:
        raise DatasetLayoutError(
            folder,
            f"BraTS-PED labels depend on the release (PED 2024: 1 ET, 2 NETC, 3 CC, 4 ED) and preset "
            f"'{spec.name}' reads them as GLI's ({_format_names(spec.label_names)}); write a spec with "
            "your release's regions and `labels:` (start from `ciml tasks brats2024`)",
        )


def _format_names(names: Mapping[int, str]) -> str:
    return ", ".join(f"{v} {n}" for v, n in sorted(names.items())) or "no label names"


def _brats_case(folder: Path, naming: _BratsNaming, concepts: dict[str, str]) -> Case:
    cid, sep = folder.name, naming.separator
    files = [p for p in folder.iterdir() if not is_hidden(p)]
    suffixes = Counter(image_suffix(p) for p in files if image_suffix(p) in NIFTI_SUFFIXES)
    default = suffixes.most_common(1)[0][0] if suffixes else ".nii.gz"
    order = (default,) + tuple(s for s in NIFTI_SUFFIXES if s != default)
    images = {
        m: _existing_or_default(folder, f"{cid}{sep}{naming.tokens[c]}", order, default)
        for m, c in concepts.items()
    }
    label = _existing_or_default(folder, f"{cid}{sep}seg", order, default)
    extra = {"layout": "brats", "naming": naming.era}
    match = _BRATS_2023_CASE.match(cid)
    if match:
        extra["challenge"] = match["challenge"].upper()
    if not label.is_file():
        aliases = [p for p in files if p.is_file() and _BRATS_LABEL_ALIAS.search(p.name)]
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


# ------------------------------------------------------------------------ dataset.json: nnU-Net, MSD

_NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class ChannelMappingError(DatasetLayoutError):
    """The channels of a dataset cannot be matched to the task's modalities by name.

    ``modalities`` and ``channels`` (id -> name) are the two sides; the caller passes ``channels=`` to
    :func:`read_dataset` (the CLI: ``--channels``) to say which is which.
    """

    def __init__(self, path: str | Path, reason: str, modalities: list[str], channels: Mapping[int, str]):
        self.modalities, self.channels = modalities, dict(channels)
        form = ", ".join(f"{m!r}: ID" for m in modalities)
        super().__init__(path, f"{reason}; say which channel id is which modality: channels={{{form}}}")


def _find_dataset_json(path: Path, images: Path | None) -> Path | None:
    for folder in (path, images.parent if images is not None else None):
        if folder is not None and (folder / "dataset.json").is_file():
            return folder / "dataset.json"
    return None


def _is_msd_json(path: Path) -> bool:
    """MSD's dataset.json names its channels under ``modality``; nnU-Net v2's under ``channel_names``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "modality" in data and "channel_names" not in data


def match_channels(
    spec: TaskSpec, names: Mapping[int, str], source: Path, channels: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Spec modality -> channel id: the explicit ``channels``, else by name, never by position.

    A name matches when it is the modality's name or means the same modality (``T1Gd`` is ``t1ce``,
    ``SUV`` is ``pet``); every modality must match exactly one channel and no channel two modalities.

    Raises:
        ChannelMappingError: the names do not decide it (e.g. nnU-Net's autoPET conversion names both
            channels "CT"); the message lists both sides.
        DatasetLayoutError: ``channels`` names unknown modalities or channels.
    """
    if channels is not None:
        return _explicit_channels(spec, names, source, channels)
    if len(names) != len(spec.modalities):
        raise DatasetLayoutError(
            source,
            f"'{_CHANNEL_KEY[_is_msd_json(source)]}' lists {len(names)} channels ({_format_names(names)}) "
            f"but task '{spec.name}' has {len(spec.modalities)} modalities ({', '.join(spec.modalities)})",
        )
    mapping = {}
    for modality in spec.modalities:
        found = [c for c, n in names.items() if _normalized(n) == _normalized(modality)]
        if not found and modality_concept(modality) is not None:
            found = [c for c, n in names.items() if modality_concept(n) == modality_concept(modality)]
        if len(found) == 1:
            mapping[modality] = found[0]
    if len(mapping) == len(spec.modalities) and len(set(mapping.values())) == len(mapping):
        return mapping
    raise ChannelMappingError(
        source,
        f"cannot tell by name which channel is which modality of task '{spec.name}': the dataset's channels "
        f"are {_format_names(names)}, the task's modalities {', '.join(spec.modalities)}",
        list(spec.modalities),
        names,
    )


_CHANNEL_KEY = {False: "channel_names", True: "modality"}


def _explicit_channels(
    spec: TaskSpec, names: Mapping[int, str], source: Path, channels: Mapping[str, int]
) -> dict[str, int]:
    unknown = sorted(set(channels) - set(spec.modalities))
    missing = [m for m in spec.modalities if m not in channels]
    bad = sorted({int(c) for c in channels.values()} - set(names))
    repeated = sorted({c for c in channels.values() if list(channels.values()).count(c) > 1})
    problems = []
    if unknown:
        problems.append(
            f"unknown modalities {', '.join(unknown)} (task '{spec.name}': {', '.join(spec.modalities)})"
        )
    if missing:
        problems.append(f"no channel for {', '.join(missing)}")
    if bad:
        problems.append(f"no channel {', '.join(map(str, bad))} (the dataset has {_format_names(names)})")
    if repeated:
        problems.append(f"channel {', '.join(map(str, repeated))} given to two modalities")
    if problems:
        raise DatasetLayoutError(source, "channels: " + "; ".join(problems))
    return {m: int(channels[m]) for m in spec.modalities}


def _json_label_names(labels: Mapping[str, Any]) -> dict[int, str]:
    """Label value -> name for the single-value entries of nnU-Net's ``labels`` (name -> value)."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool) and value != 0:
            out[value] = str(name)
    return out


def _json_regions(labels: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Region name -> label values for every non-background entry of nnU-Net's ``labels``."""
    regions = {}
    for name, value in labels.items():
        values = tuple(sorted(value)) if isinstance(value, list) else (value,)
        if values != (0,):
            regions[str(name)] = values
    return regions


def _check_nnunet_labels(json_path: Path, info: Mapping[str, Any], spec: TaskSpec) -> None:
    """Refuse a spec whose labels mean other tissues, or whose regions the dataset does not define."""
    labels = info["labels"]
    _refuse_label_conflicts(json_path, "its 'labels'", _json_label_names(labels), spec)
    json_regions = _json_regions(labels)
    if any(len(v) > 1 for v in json_regions.values()):
        defined = set(json_regions.values())
        foreign = [r for r, v in spec.regions.items() if v not in defined]
        if foreign:
            shown = "; ".join(f"{n} {list(v)}" for n, v in json_regions.items())
            raise DatasetLayoutError(
                json_path,
                f"task '{spec.name}' regions {'; '.join(f'{r} {list(spec.regions[r])}' for r in foreign)} "
                f"are not regions of this dataset ({shown}); its label values may mean other tissues. Leave "
                "the task out to use the dataset's own regions",
            )


def read_nnunet(path: Path, spec: TaskSpec, channels: Mapping[str, int] | None = None) -> list[Case]:
    """nnU-Net v2 raw: ``imagesTr/CASE_XXXX<ending>``, ``labelsTr/CASE<ending>``, ``dataset.json``.

    Channels map to the spec's modalities by name (:func:`match_channels`) or by ``channels``. A
    dataset.json with a ``dataset`` key (nnU-Net's BraTS 2024 conversion) lists the files itself.
    """
    images_dir, labels_dir = _images_and_labels_folders(path)
    json_path = _find_dataset_json(path, images_dir)
    if json_path is None or images_dir is None:
        raise DatasetLayoutError(path, "no dataset.json here or next to the images folder (nnU-Net layout)")
    info = load_dataset_json(json_path)
    ending = info["file_ending"]
    channel_of = match_channels(spec, info["channel_names"], json_path, channels)
    _check_nnunet_labels(json_path, info, spec)
    if "dataset" in info and not _image_files(images_dir):
        return _nnunet_listed_cases(json_path, info, channel_of)
    found = _nnunet_files(images_dir, ending, len(info["channel_names"]), json_path)
    cases = []
    for cid in sorted(found):
        images = {
            m: found[cid].get(ch, images_dir / f"{cid}_{ch:04d}{ending}") for m, ch in channel_of.items()
        }
        label = labels_dir / f"{cid}{ending}" if labels_dir is not None else None
        cases.append(Case(case_id=cid, images=images, label=label, extra=_nnunet_extra(channel_of)))
    expected = info.get("numTraining")
    if images_dir.name == "imagesTr" and isinstance(expected, int) and expected != len(cases):
        raise DatasetLayoutError(
            json_path, f"'numTraining' is {expected} but {images_dir} holds {len(cases)} cases"
        )
    return cases


def _nnunet_extra(channel_of: Mapping[str, int]) -> dict[str, str]:
    return {"layout": "nnunet", "channels": ",".join(f"{m}={ch:04d}" for m, ch in channel_of.items())}


def _nnunet_listed_cases(
    json_path: Path, info: Mapping[str, Any], channel_of: Mapping[str, int]
) -> list[Case]:
    """Cases from dataset.json's ``dataset``: case -> {"images": [one file per channel], "label": file}."""
    listed = info["dataset"]
    if not isinstance(listed, Mapping):
        raise DatasetLayoutError(json_path, "'dataset': expected case id -> {images: [...], label: ...}")
    cases = []
    for cid, entry in listed.items():
        images = entry.get("images") if isinstance(entry, Mapping) else None
        if not isinstance(images, list) or len(images) != len(info["channel_names"]):
            raise DatasetLayoutError(
                json_path, f"'dataset.{cid}.images': expected a list of {len(info['channel_names'])} files"
            )
        files = {m: _resolve(json_path, str(images[ch])) for m, ch in channel_of.items()}
        label = entry.get("label")
        cases.append(
            Case(
                case_id=str(cid),
                images=files,
                label=_resolve(json_path, str(label)) if label else None,
                extra=_nnunet_extra(channel_of),
            )
        )
    return cases


def _nnunet_files(
    images_dir: Path, ending: str, n_channels: int, json_path: Path
) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for file in sorted(images_dir.iterdir()):
        if not file.name.endswith(ending) or is_hidden(file):
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


def load_msd_json(path: str | Path) -> dict[str, Any]:
    """Read an MSD ``dataset.json``: ``modality`` and ``labels`` keyed by int, in channel/label order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetLayoutError(path, f"cannot read as JSON: {exc}") from None
    for key in ("modality", "labels"):
        raw = data.get(key) if isinstance(data, dict) else None
        if not isinstance(raw, Mapping) or not raw:
            raise DatasetLayoutError(path, f"'{key}': missing or empty (MSD dataset.json maps ids to names)")
        try:
            data[key] = dict(sorted((int(k), str(v)) for k, v in raw.items()))
        except ValueError:
            raise DatasetLayoutError(path, f"'{key}': keys must be integers '0', '1', ...") from None
    if list(data["modality"]) != list(range(len(data["modality"]))):
        raise DatasetLayoutError(path, f"'modality': ids must be 0..{len(data['modality']) - 1}")
    return data


def read_msd(path: Path, spec: TaskSpec, channels: Mapping[str, int] | None = None) -> list[Case]:
    """Medical Segmentation Decathlon: ``imagesTr/BRATS_001.nii.gz`` holds every modality as a volume.

    The volumes are matched to the spec's modalities by the names in dataset.json's ``modality`` (or by
    ``channels``), and the spec's label names must agree with dataset.json's ``labels``: MSD's brain
    tumour labels (1 edema, 2 non-enhancing, 3 enhancing) are not BraTS's.
    """
    images_dir, labels_dir = _images_and_labels_folders(path)
    json_path = _find_dataset_json(path, images_dir)
    if json_path is None or images_dir is None:
        raise DatasetLayoutError(path, "no dataset.json here or next to the images folder (MSD layout)")
    info = load_msd_json(json_path)
    volumes = match_channels(spec, info["modality"], json_path, channels)
    labels = {v: n for v, n in info["labels"].items() if v != 0}
    if not spec.label_names:
        raise DatasetLayoutError(
            json_path,
            f"task '{spec.name}' does not say what its label values mean, and MSD's are not BraTS's "
            f"({_format_names(labels)}): add `labels:` to the spec, or use msd_braintumour for Task01",
        )
    _refuse_label_conflicts(json_path, "its 'labels'", labels, spec)
    cases = []
    for file in _image_files(images_dir):
        cid = strip_image_suffix(file)
        label = _label_path(labels_dir, cid, (image_suffix(file),) + NIFTI_SUFFIXES, image_suffix(file))
        extra = {"layout": "msd", "volumes": ",".join(f"{m}={v}" for m, v in volumes.items())}
        cases.append(
            Case(case_id=cid, images=dict.fromkeys(volumes, file), label=label, volumes=volumes, extra=extra)
        )
    return cases


# ---------------------------------------------------------------------- a task spec from dataset.json

#: ``task`` value that means "build the spec from the dataset's own dataset.json" (as leaving it out).
FROM_DATASET = "dataset.json"


def spec_from_dataset_json(path: str | Path) -> TaskSpec:
    """A task spec from an nnU-Net v2 ``dataset.json``: its channels, labels and regions.

    Modalities are the ``channel_names`` (lower-cased; type ct for "CT", pet for PET/PT/SUV, else mri);
    regions are the ``labels`` entries (region lists as nnU-Net's region-based training), painted in
    ``regions_class_order``. No expert decomposition is known, so every modality's segmentor owns every
    region; write a spec to decompose the task.

    Raises:
        DatasetLayoutError: two channels share a name, or regions without ``regions_class_order``.
    """
    path = Path(path)
    info = load_dataset_json(path)
    modalities: dict[str, str] = {}
    for channel, name in info["channel_names"].items():
        key = re.sub(r"\W+", "_", name.strip().lower()).strip("_") or f"channel{channel}"
        if key in modalities:
            raise DatasetLayoutError(
                path,
                f"'channel_names': channels {_format_names(info['channel_names'])} share the name '{name}', "
                "so they cannot be told apart; write a task spec naming them and map the channels with "
                "channels= (CLI: --channels MODALITY=ID,...)",
            )
        concept = modality_concept(name)
        modalities[key] = concept if concept in ("ct", "pet") else "mri"
    labels = info["labels"]
    if not isinstance(labels, Mapping):
        raise DatasetLayoutError(path, "'labels': expected a mapping of label name -> value or [values]")
    regions = {name: list(values) for name, values in _json_regions(labels).items()}
    order = info.get("regions_class_order")
    if any(len(v) > 1 for v in regions.values()) and order is None:
        raise DatasetLayoutError(
            path, "'labels' defines regions (lists) but 'regions_class_order' is missing"
        )
    if order is not None and (not isinstance(order, list) or len(order) != len(regions)):
        raise DatasetLayoutError(
            path, f"'regions_class_order': expected one label per region ({len(regions)}), got {order!r}"
        )
    paint = order if order is not None else [values[0] for values in regions.values()]
    data = {
        "name": str(info.get("name") or path.parent.name),
        "modalities": modalities,
        "regions": regions,
        "decomposition": {m: list(regions) for m in modalities},
        "assembly": [[region, int(label)] for region, label in zip(regions, paint, strict=True)],
        "labels": _json_label_names(labels),
    }
    try:
        return TaskSpec.from_dict(data, source=str(path))
    except TaskSpecError as exc:
        raise DatasetLayoutError(path, f"cannot build a task spec from it: {exc}") from None


def resolve_task(
    task: TaskSpec | str | Path | Mapping[str, Any] | None, data: str | Path, layout: str = "auto"
) -> TaskSpec:
    """The task spec to use for ``data``: ``task`` itself, or the dataset's own dataset.json.

    ``task`` None or :data:`FROM_DATASET` builds the spec from the nnU-Net ``dataset.json`` of ``data``
    (:func:`spec_from_dataset_json`); a path to a ``.json`` file builds it from that file.

    Raises:
        DatasetLayoutError: no task given and ``data`` is no nnU-Net dataset.
    """
    if task is not None and str(task) != FROM_DATASET:
        if isinstance(task, str | Path) and str(task).endswith(".json") and Path(task).is_file():
            return spec_from_dataset_json(task)
        return load_task(task)
    path = Path(data)
    name = detect_layout(path) if layout == "auto" else layout
    images, _ = _images_and_labels_folders(path)
    json_path = _find_dataset_json(path, images) if name == "nnunet" else None
    if json_path is None:
        raise DatasetLayoutError(
            path,
            f"no task spec given, and only nnU-Net datasets carry one (dataset.json); this is a {name} "
            f"dataset: name a preset ({', '.join(preset_names())}) or a spec YAML",
        )
    return spec_from_dataset_json(json_path)


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
    "csv": read_csv_list,
}
_CHANNEL_READERS: dict[str, Callable[[Path, TaskSpec, Mapping[str, int] | None], list[Case]]] = {
    "nnunet": read_nnunet,
    "msd": read_msd,
}

_LAYOUT_HINTS = {
    "brats": "CASE/CASE_{flair,t1,t1ce,t2,seg}.nii.gz or CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii.gz",
    "autopet": "PATIENT/STUDY/{SUV,CTres,SEG}.nii.gz",
    "hecktor": "imagesTr/CASE__{CT,PT}.nii.gz and labelsTr/CASE.nii.gz",
    "nnunet": "dataset.json, imagesTr/CASE_0000.nii.gz and labelsTr/CASE.nii.gz",
    "msd": "dataset.json with 'modality', 4D imagesTr/CASE.nii.gz and labelsTr/CASE.nii.gz",
    "csv": "a .csv with case_id, one column per modality and an optional label",
}
