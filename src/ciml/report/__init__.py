"""The run report (``ciml report``): one self-contained HTML page with results, explanations and settings.

:mod:`ciml.report.sections` computes what each section shows; :mod:`ciml.report.html` renders it.
"""

from ciml.report.html import build_report, render, write_report
from ciml.report.sections import SECTIONS, embed_png, report_page

__all__ = ["SECTIONS", "build_report", "embed_png", "render", "report_page", "write_report"]
