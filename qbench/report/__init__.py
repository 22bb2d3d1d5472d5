"""Reports a person reads (summary.md, a self-contained report.html with charts) from the JSON runs wrote."""

from .render import build, load_run, report

__all__ = ["build", "load_run", "report"]
