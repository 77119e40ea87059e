"""Evaluation reports: a self-contained HTML page with matplotlib figures (Agg backend only).

``write_report(eval_dir)`` turns an evaluation folder (written by `taxonomist evaluate`, see
:mod:`taxonomist.report.evaldir`) into ``report.html``. Modules: ``evaldir`` (the folder format),
``analysis`` (the numbers), ``plots`` (the figures), ``html`` (the page). See docs/report.md.
"""

from .evaldir import EvalRecord, find_eval_dir, load_eval_dir, save_eval_dir
from .html import SECTIONS, build_report, thumbnail_uri, write_report

__all__ = ["EvalRecord", "save_eval_dir", "load_eval_dir", "find_eval_dir", "SECTIONS", "build_report",
           "write_report", "thumbnail_uri"]
