"""Explaining cases of a dataset with a run folder (what ``ciml explain`` runs)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.layouts import read_dataset
from ciml.errors import CimlError, ParameterError
from ciml.explain.explainer import Explainer
from ciml.explain.gradcam import (
    GRADCAM,
)
from ciml.explain.writing import SUMMARY_FILE, safe_name, write_explanation
from ciml.files import refuse_existing
from ciml.inference import InferenceSettings
from ciml.runs import RunFolder


def explain_cases(
    run: RunFolder | str | Path,
    case_ids: Iterable[str] | None,
    out: str | Path,
    *,
    data: str | Path | None = None,
    layout: str | None = None,
    settings: InferenceSettings | None = None,
    level: int | None = None,
    cam: str = GRADCAM,
    extent: str = "auto",
    max_voxels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Explain cases of a dataset with a run and write each into ``out/<case_id>/``.

    Args:
        run: the run folder.
        case_ids: cases to explain (None: every case of ``data``).
        out: output folder.
        data: the cases' dataset in any layout (default: the run's training data, from run.json).
        layout: the dataset's layout (default: auto, or the run's for its own data).
        settings: which network and where, as for prediction (the first of its folds; float32 even on CUDA).
        level, cam, extent, max_voxels: see :meth:`Explainer.explain_preprocessed`.
        overwrite: replace existing explanations (default: refuse before any work).
        progress: progress bar and per-case times.

    Returns:
        Each case's ``explanation.json`` content, with ``folder`` added.
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    spec = run.spec()
    if data is None:
        source = run.read_info().get("data") or {}
        if "path" not in source:
            raise ParameterError("data", f"{run.info_path} has no 'data.path'; name the cases' dataset")
        data, layout = source["path"], layout or source.get("layout", "auto")
    cases = {c.case_id: c for c in read_dataset(data, spec, layout or "auto")}
    wanted = list(cases) if case_ids is None else list(dict.fromkeys(case_ids))
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        raise CimlError(f"{data}: no case {', '.join(unknown)} (it has {_listing(cases)})")
    folders = {c: Path(out) / safe_name(c) for c in wanted}
    refuse_existing([f / SUMMARY_FILE for f in folders.values()], overwrite)
    explainer = Explainer.from_run(run, settings)
    summaries = []
    bar = tqdm(wanted, desc="explain", unit="case", disable=not progress)
    for case_id in bar:
        explanation = explainer.explain(
            cases[case_id], level=level, cam=cam, extent=extent, max_voxels=max_voxels
        )
        write_explanation(explanation, folders[case_id], overwrite=overwrite)
        summaries.append({**explanation.summary(), "folder": str(folders[case_id])})
        if progress:
            bar.write(f"{case_id}: {explanation.extent}, {explanation.seconds:.1f} s -> {folders[case_id]}")
    return summaries


def _listing(cases: dict[str, Case], limit: int = 5) -> str:
    names = list(cases)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
