"""The checks every source shares, run once the rows are gathered.

Duplicates (same path and box), image files (missing / unreadable, checked in
parallel), crop boxes (size, inside the image): each bad row is counted in the
report with its location, dropped, and the policy (raise or skip) applied.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..labels import Locate
from ..report import LoadReport
from ..table import SampleTable, box_strings
from ..verify import MISSING, UNREADABLE, check_images


def report_rows(report: LoadReport, kind: str, rows: np.ndarray, locate: Locate,
                detail: Callable[[int], str] | str = "") -> None:
    """Count every row in ``rows`` under ``kind``; describe the first few."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    k = report.max_examples
    for i in rows[:k]:
        report.add(kind, locate(np.array([i])), detail(int(i)) if callable(detail) else detail)
    if len(rows) > k:
        report.counts[kind] += len(rows) - k


def _check_duplicates(keys: Sequence[str], bad: np.ndarray, locate: Locate, report: LoadReport) -> None:
    codes, _ = pd.factorize(pd.Series(keys, dtype=object))
    dup = pd.Series(codes).duplicated(keep="first").to_numpy()
    if not dup.any():
        return
    _, first = np.unique(codes, return_index=True)
    report_rows(report, "duplicate", np.flatnonzero(dup), locate,
                lambda i: f"repeats {locate(np.array([first[codes[i]]]))}")
    bad |= dup


def _check_boxes(boxes: np.ndarray, width: np.ndarray, height: np.ndarray, bad: np.ndarray,
                 locate: Locate, report: LoadReport) -> np.ndarray:
    """Flag invalid boxes; clip boxes that stick out of the image (noted). Returns the boxes to use."""
    boxes = boxes.copy()
    nan = np.isnan(boxes)
    whole = nan.all(axis=1)
    x, y, w, h = boxes.T
    invalid = (~whole) & (nan.any(axis=1) | ~np.isfinite(boxes).all(axis=1) | (w <= 0) | (h <= 0))
    known = (~whole) & (~invalid) & (width > 0)
    outside = known & ((x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0))
    report_rows(report, "bad_box", np.flatnonzero(invalid | outside), locate,
                lambda i: f"box {boxes[i].tolist()} on a {width[i]}x{height[i]} image"
                if outside[i] else f"box {boxes[i].tolist()}")
    bad |= invalid | outside
    sticks = known & ~outside & ((x < 0) | (y < 0) | (x + w > width) | (y + h > height))
    if sticks.any():
        x0 = np.clip(x, 0, width)
        y0 = np.clip(y, 0, height)
        x1 = np.clip(x + w, 0, width)
        y1 = np.clip(y + h, 0, height)
        boxes[sticks] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[sticks]
        report.note(f"{int(sticks.sum())} crop box(es) extend past the image border and were clipped to it "
                    f"(first: {locate(np.flatnonzero(sticks)[:1])})")
    return boxes


def assemble(report: LoadReport, *, paths: Sequence[str] | np.ndarray, locate: Locate, verify_images: str,
             on_error: str, labels: Sequence[str] | np.ndarray | None = None, nodes: np.ndarray | None = None,
             bad: np.ndarray | None = None, boxes: np.ndarray | None = None,
             split: Sequence[str] | np.ndarray | None = None,
             meta: Mapping[str, np.ndarray] | None = None,
             attrs: Mapping[str, np.ndarray] | None = None,
             sizes: np.ndarray | None = None) -> tuple[SampleTable, LoadReport]:
    """Run the shared checks on gathered rows, drop the bad ones and apply ``on_error``.

    ``sizes`` ([N, 2] width, height; -1 unknown) are the image sizes the source
    declares (COCO); the sizes read from the files take precedence.
    """
    paths = np.asarray(paths, dtype=object)
    n = len(paths)
    bad = np.zeros(n, dtype=bool) if bad is None else bad.copy()
    boxes = np.full((n, 4), np.nan) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    has_path = paths.astype(str) != ""  # rows without a path are already reported (and bad)
    bad |= ~has_path
    keys = [f"{p}|{b}" if p else f"\0{i}" for i, (p, b) in enumerate(zip(paths, box_strings(boxes)))]
    _check_duplicates(keys, bad, locate, report)

    uniq, inverse = np.unique(paths[has_path].astype(str), return_inverse=True)
    check = check_images(list(uniq), verify_images)
    status = np.full(n, MISSING, dtype=np.int8)
    status[has_path] = check.status[inverse]
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    width[has_path] = check.width[inverse]
    height[has_path] = check.height[inverse]
    errors = np.full(n, "", dtype=object)
    errors[has_path] = np.asarray(check.error, dtype=object)[inverse]
    for code, kind in ((MISSING, "missing_file"), (UNREADABLE, "unreadable_image")):
        rows = np.flatnonzero((status == code) & has_path)
        report_rows(report, kind, rows, locate,
                    lambda i: errors[i] if os.path.basename(paths[i]) in locate(np.array([i]))
                    else f"{paths[i]}: {errors[i]}")
        bad[rows] = True
    if not np.isnan(boxes).all():
        if sizes is not None:
            sizes = np.asarray(sizes, dtype=np.int64).reshape(n, 2)
            width = np.where(width > 0, width, sizes[:, 0])
            height = np.where(height > 0, height, sizes[:, 1])
        boxes = _check_boxes(boxes, width, height, bad, locate, report)

    keep = np.flatnonzero(~bad)
    report.n_read = n
    report.n_kept = len(keep)
    table = SampleTable.build(
        paths[keep], labels=None if labels is None else np.asarray(labels, dtype=object)[keep],
        nodes=None if nodes is None else np.asarray(nodes, dtype=np.int64)[keep], boxes=boxes[keep],
        split=None if split is None else np.asarray(split, dtype=object)[keep],
        meta={k: np.asarray(v)[keep] for k, v in (meta or {}).items()},
        attrs={k: np.asarray(v, dtype=object)[keep] for k, v in (attrs or {}).items()}, report=report)
    report.raise_or_warn(on_error)
    return table, report
