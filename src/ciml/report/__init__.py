"""The run report (``ciml report``): one self-contained HTML page with results, explanations and settings."""

from ciml.report.html import build_report, embed_png, write_report

__all__ = ["build_report", "embed_png", "write_report"]
