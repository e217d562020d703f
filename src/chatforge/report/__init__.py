"""`chatforge report`: a self-contained HTML page with the training curves of a pipeline or run dir.

Light on purpose (no torch, no matplotlib): it runs at the end of `train` and on any laptop."""

from chatforge.report.page import NoRunsError, build_report

__all__ = ["NoRunsError", "build_report"]
