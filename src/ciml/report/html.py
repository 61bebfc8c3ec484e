"""Rendering the run report: the sections' data (:mod:`ciml.report.sections`) into one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from ciml.files import refuse_existing, write_text_atomic
from ciml.inference import InferenceSettings
from ciml.report.sections import report_page
from ciml.report.template import CSS, TEMPLATE
from ciml.runs import RunFolder


def render(page: dict[str, Any]) -> str:
    """The page's HTML (every value escaped; a missing key is an error, not an empty cell)."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(css=CSS, **page)


def build_report(
    run: RunFolder | str | Path,
    *,
    pred_dir: str | Path | None = None,
    ref_dir: str | Path | None = None,
    explanations: str | Path | None = None,
    robustness: str | Path | None = None,
    explain_cases: int = 1,
    max_cases: int = 3,
    layout: str = "auto",
    settings: InferenceSettings | None = None,
    progress: bool = False,
) -> str:
    """The report's HTML text; see :func:`write_report` for the arguments."""
    return render(
        report_page(
            run,
            pred_dir=pred_dir,
            ref_dir=ref_dir,
            explanations=explanations,
            robustness=robustness,
            explain_cases=explain_cases,
            max_cases=max_cases,
            layout=layout,
            settings=settings,
            progress=progress,
        )  # fmt: skip
    )


def write_report(
    run: RunFolder | str | Path,
    out: str | Path,
    *,
    pred_dir: str | Path | None = None,
    ref_dir: str | Path | None = None,
    explanations: str | Path | None = None,
    robustness: str | Path | None = None,
    explain_cases: int = 1,
    max_cases: int = 3,
    layout: str = "auto",
    settings: InferenceSettings | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the run's report to ``out`` (one HTML file, atomically) and return its path.

    Args:
        run: the run folder.
        out: the HTML file; an existing one is kept unless ``overwrite`` (checked before any work).
        pred_dir, ref_dir: predicted label maps and references to evaluate (both or neither); references
            in a dataset layout (e.g. BraTS case folders) also give the overlays their input modalities.
        explanations: a folder written by ``ciml explain`` to embed; without it, the first
            ``explain_cases`` evaluated cases (else of the run's data) are explained on the spot.
        robustness: ``robustness.json`` of ``ciml robustness`` (default: ``RUN/robustness/robustness.json``).
        max_cases: cases shown with overlays and explanations read from a folder.
        layout: layout of ``ref_dir`` (for its images).
        settings: the network explained on the spot (the first of its folds), as for prediction.
        progress: progress bar of the evaluation.

    Raises:
        CimlError: ``out`` exists (without ``overwrite``), an unreadable run, or unusable inputs.
    """
    out = Path(out)
    refuse_existing([out], overwrite)
    html = build_report(
        run, pred_dir=pred_dir, ref_dir=ref_dir, explanations=explanations, robustness=robustness,
        explain_cases=explain_cases, max_cases=max_cases, layout=layout, settings=settings,
        progress=progress,
    )  # fmt: skip
    return write_text_atomic(out, html)
