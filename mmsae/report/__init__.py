"""The run's report: one self-contained static HTML page (see :mod:`mmsae.report.page`)."""

from mmsae.report.page import build_report

__all__ = ["build_report"]
