"""Rendering the run report: the sections' data (:mod:`ciml.report.sections`) into one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from ciml.files import refuse_existing, write_text_atomic
from ciml.report.sections import report_page
from ciml.report.template import CSS, TEMPLATE
from ciml.runs import RunFolder


def render(page: dict[str, Any]) -> str:
    """The page's HTML (every value escaped; a missing key is an error, not an empty cell)."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(css=CSS, **page)


def build_report(run: RunFolder | str | Path, **options: Any) -> str:
    """The report's HTML text; ``options`` are :func:`write_report`'s (those of :func:`report_page`)."""
    return render(report_page(run, **options))


def write_report(
    run: RunFolder | str | Path, out: str | Path, *, overwrite: bool = False, **options: Any
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

    ``options`` are pred_dir, ref_dir, explanations, robustness, explain_cases, max_cases, layout,
    settings and progress (see :func:`~ciml.report.sections.report_page`).

    Raises:
        CimlError: ``out`` exists (without ``overwrite``), an unreadable run, or unusable inputs.
    """
    out = Path(out)
    refuse_existing([out], overwrite)
    html = build_report(run, **options)
    return write_text_atomic(out, html)
