"""Preprocessed cases on disk as ``.npy`` files, keyed by the plan, so each case is read once per plan."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.preprocessing.plan import PreprocessingError, PreprocessingPlan
from ciml.data.preprocessing.transform import PreprocessedCase, preprocess_case
from ciml.files import atomic_path, write_text_atomic
from ciml.tasks.spec import TaskSpec


class PreprocessedCache:
    """Preprocessed cases on disk, so each case is read from NIfTI once per plan.

    Layout: ``folder/plan-<hash>/plan.json`` and, per case, ``<id>_image.npy``, ``<id>_label.npy`` and
    ``<id>.json`` (meta, plan hash, and the size and mtime of the source files). Every file is written
    under a temporary name and renamed; the JSON comes last, so a case exists only once it is complete.
    An entry is recomputed when a source file still exists but has changed; when the sources are gone
    the cache is trusted.

    Example:
        >>> cache = PreprocessedCache("preprocessed", spec, plan)   # doctest: +SKIP
        >>> pre = cache.get(case)                                  # preprocesses, then stores
        >>> pre = cache.get(case)                                  # reads the .npy files only
    """

    def __init__(self, folder: str | Path, spec: TaskSpec, plan: PreprocessingPlan, *, mmap: bool = True):
        if list(plan.modalities) != list(spec.modalities):
            raise PreprocessingError(
                f"{folder}: plan modalities {list(plan.modalities)} differ from task {spec.name}'s"
            )
        self.spec, self.plan, self.mmap = spec, plan, mmap
        self.plan_hash = plan.plan_hash()
        self.root = Path(folder) / f"plan-{self.plan_hash}"

    def get(self, case: Case, *, allow_missing: bool = False) -> PreprocessedCase:
        """The preprocessed case: from disk when cached and current, else computed and stored."""
        cached = self._read(case.case_id, case)
        if cached is not None:
            return cached
        pre = preprocess_case(case, self.spec, self.plan, allow_missing=allow_missing)
        self._write(case, pre)
        return pre

    def load(self, case_id: str) -> PreprocessedCase:
        """A cached case by id, without its source files.

        Raises:
            PreprocessingError: the case is not in the cache.
        """
        cached = self._read(case_id, None)
        if cached is None:
            raise PreprocessingError(
                f"{self._json(case_id)}: case {case_id} is not in the cache (or its entry is incomplete)"
            )
        return cached

    def prepare(
        self, cases: Iterable[Case], *, progress: bool = True, allow_missing: bool = False
    ) -> list[str]:
        """Preprocess every case not cached yet; returns the case ids in order."""
        cases = list(cases)
        for case in tqdm(cases, desc="preprocessing", disable=not progress):
            if self._read(case.case_id, case) is None:
                self._write(case, preprocess_case(case, self.spec, self.plan, allow_missing=allow_missing))
        return [c.case_id for c in cases]

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and self._json(case_id).is_file()

    # -- files

    def _stem(self, case_id: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id).lstrip(".") or "case"
        if safe != case_id:
            safe += "-" + hashlib.sha1(case_id.encode()).hexdigest()[:8]
        return safe

    def _json(self, case_id: str) -> Path:
        return self.root / f"{self._stem(case_id)}.json"

    def _array(self, case_id: str, kind: str) -> Path:
        return self.root / f"{self._stem(case_id)}_{kind}.npy"

    def _read(self, case_id: str, case: Case | None) -> PreprocessedCase | None:
        path = self._json(case_id)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("plan_hash") != self.plan_hash or record.get("case_id") != case_id:
                return None
            if case is not None and not _sources_unchanged(record.get("source_stats", {}), case):
                return None
            mmap = "r" if self.mmap else None
            image = np.load(self._array(case_id, "image"), mmap_mode=mmap)
            label = np.load(self._array(case_id, "label"), mmap_mode=mmap) if record["has_label"] else None
        except (OSError, ValueError, KeyError):
            return None  # incomplete or corrupt entry: recompute it
        return PreprocessedCase(case_id, image, label, record["meta"])

    def _write(self, case: Case, pre: PreprocessedCase) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        plan_file = self.root / "plan.json"
        if not plan_file.exists():
            write_text_atomic(plan_file, json.dumps(self.plan.to_dict(), indent=2))
        _atomic_save_npy(self._array(case.case_id, "image"), pre.image)
        if pre.label is not None:
            _atomic_save_npy(self._array(case.case_id, "label"), pre.label)
        record = {
            "case_id": case.case_id,
            "plan_hash": self.plan_hash,
            "has_label": pre.label is not None,
            "source_stats": _source_stats(case),
            "meta": pre.meta,
        }
        write_text_atomic(self._json(case.case_id), json.dumps(record, indent=1))


def _source_stats(case: Case) -> dict[str, list[int]]:
    paths = dict(case.images) | ({} if case.label is None else {"__label__": case.label})
    out = {}
    for key, p in paths.items():
        st = Path(p).stat()
        out[key] = [st.st_size, st.st_mtime_ns]
    return out


def _sources_unchanged(recorded: Mapping[str, list[int]], case: Case) -> bool:
    """False when a source file that still exists differs from the one the entry was made from."""
    paths = dict(case.images) | ({} if case.label is None else {"__label__": case.label})
    if set(paths) != set(recorded):
        return False
    for key, p in paths.items():
        p = Path(p)
        if p.exists():
            st = p.stat()
            if [st.st_size, st.st_mtime_ns] != list(recorded[key]):
                return False
    return True


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.save(stream, np.ascontiguousarray(array))
