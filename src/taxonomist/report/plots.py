"""Report figures: matplotlib on the Agg backend, returned as PNG bytes.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg
canvas directly, never through ``pyplot``: no global state, no GUI backend, safe
in threads and on headless machines. Every figure has a title and labelled axes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BLUE, ORANGE, GREEN, RED, GREY = "#2f6db5", "#e08a1e", "#3a9a4a", "#c8423b", "#8a8f98"
#: one colour per decision rule, the same in every figure
DECISION_COLORS = {"argmax": "#7a4bb5", "threshold": GREEN, "crm": RED, "darts": "#3d4350"}
DPI = 100


def _figure(width: float, height: float, **kw: Any) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def per_level_accuracy(levels: Sequence[str], top1: Sequence[float | None], topk: Sequence[float | None] | None,
                       k: int, counts: Sequence[int]) -> Figure:
    """Grouped bars: top-1 (and top-k) accuracy at every rank/level, with the sample count under each."""
    x = np.arange(len(levels))
    fig = _figure(max(6.0, 1.1 * len(levels) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.38 if topk is not None else 0.6
    vals1 = np.array([np.nan if v is None else v for v in top1], dtype=float)
    bars = ax.bar(x - (width / 2 if topk is not None else 0), np.nan_to_num(vals1), width, color=BLUE, label="top-1")
    for b, v in zip(bars, vals1):
        if np.isfinite(v):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.0%}", ha="center", va="bottom", fontsize=9)
    if topk is not None:
        valsk = np.array([np.nan if v is None else v for v in topk], dtype=float)
        ax.bar(x + width / 2, np.nan_to_num(valsk), width, color=ORANGE, alpha=0.85, label=f"top-{k}")
    ax.set_xticks(x, [f"{lv}\n(n={c})" for lv, c in zip(levels, counts)], fontsize=9)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("rank / level (root side first)")
    ax.set_title("Accuracy per rank: most probable node at each level vs the truth's ancestor there")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=2, fontsize=9)
    return fig


def learning_curves(history: Any) -> Figure | None:
    """Training loss and validation metrics per epoch from a run's metrics.csv (None if nothing to plot)."""
    cols = [c for c in ("train/loss",) if c in history.columns]
    vals = [c for c in ("val/top1_error", "val/hdist@1", "val/mean_path_distance", "val/ece")
            if c in history.columns and history[c].notna().any()]
    if not cols and not vals:
        return None
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2)
    ep = history["epoch"].to_numpy()
    ax = axes[0]
    for c in cols:
        ax.plot(ep, history[c].to_numpy(dtype=float), marker="o", ms=3, color=BLUE, label=c)
    ax.set_title("Training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for c, col in zip(vals, (RED, ORANGE, GREEN, GREY)):
        ax.plot(ep, history[c].to_numpy(dtype=float), marker="o", ms=3, color=col, label=c.split("/", 1)[1])
    ax.set_title("Validation metrics (lower is better)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    if vals:
        ax.legend(fontsize=8)
    return fig


def confusion_matrix(matrix: np.ndarray, names: Sequence[str], level: str) -> Figure:
    """Row-normalised confusion matrix (colour: fraction of the true group; text: counts)."""
    k = len(names)
    size = min(12.0, max(5.5, 0.36 * k + 3.5))
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    short = [_short(n, 22) for n in names]
    ax.set_xticks(np.arange(k), short, rotation=60, ha="right", fontsize=8 if k > 15 else 9)
    ax.set_yticks(np.arange(k), [f"{s} ({int(r)})" for s, r in zip(short, rows[:, 0])], fontsize=8 if k > 15 else 9)
    if k <= 30:
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7 if k > 15 else 8,
                    color="white" if frac[i, j] > 0.55 else "#222")
    ax.set_xlabel(f"predicted {level}")
    ax.set_ylabel(f"true {level} (samples)")
    ax.set_title(f"Confusion at {level}: rows = truth, colour = fraction of the row")
    fig.colorbar(im, ax=ax, shrink=0.7, label="fraction of true group")
    return fig


def risk_coverage(curve: Mapping[str, np.ndarray], haurc: float | None,
                  points: Mapping[str, tuple[float, float]] | None = None) -> Figure:
    """Hierarchical risk against coverage for the climbing rule, with the report's decisions marked."""
    fig = _figure(6.8, 4.6)
    ax = fig.add_subplot()
    cov, risk = np.asarray(curve["coverage"]), np.asarray(curve["risk"])
    ax.plot(cov, risk, color=BLUE, lw=2, label="climbing, all thresholds")
    ax.fill_between(cov, risk, color=BLUE, alpha=0.12)
    for name, (c, r) in (points or {}).items():
        ax.plot([c], [r], "o", ms=8, color=DECISION_COLORS.get(name, GREY), label=name, zorder=5)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, max(0.05, float(np.max(risk)) * 1.1 if len(risk) else 1.0))
    ax.set_xlabel("coverage (1 = every answer a leaf, 0 = every answer the root)")
    ax.set_ylabel("risk (fraction of wrong answers)")
    title = "Risk–coverage of back-off"
    if haurc is not None:
        title += f" (hAURC {haurc:.3f}, lower is better)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def accuracy_specificity(sweeps: Mapping[str, Mapping[str, Any]],
                         points: Mapping[str, tuple[float, float, float]] | None = None) -> Figure:
    """Accuracy against mean information gain (left) and mean answer depth (right) for the threshold
    sweep and the DARTS sweep; ``points`` marks decisions as ``name -> (info_gain, depth, accuracy)``."""
    fig = _figure(11, 4.3)
    axes = fig.subplots(1, 2, sharey=True)
    styles = {"threshold": (BLUE, "threshold back-off (θ from 1 to 0)"), "darts": (ORANGE, "DARTS (λ from ∞ to 0)")}
    for ax, key, xlabel in ((axes[0], "info_gain", "mean information gain of the answer (bits)"),
                            (axes[1], "depth", "mean depth of the answer (edges below the root)")):
        for name, sw in sweeps.items():
            if not len(sw.get("accuracy", [])):
                continue
            col, label = styles.get(name, (GREY, name))
            x, y = np.asarray(sw[key]), np.asarray(sw["accuracy"])
            order = np.argsort(x, kind="stable")
            ax.plot(x[order], y[order], marker=".", ms=4, color=col, lw=1.8, label=label)
        for name, (g, d, a) in (points or {}).items():
            ax.plot([g if key == "info_gain" else d], [a], "o", ms=8, color=DECISION_COLORS.get(name, GREY),
                    label=name, zorder=5)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hierarchical accuracy (answer is the truth or its ancestor)")
    axes[0].yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    axes[0].set_title("Accuracy vs specificity (information gain)")
    axes[1].set_title("Accuracy vs depth of the answer")
    axes[1].legend(loc="lower left", fontsize=8)
    return fig


def reliability(diagram: Mapping[str, Sequence[Any]], ece: float | None, title: str) -> Figure:
    """Reliability diagram (accuracy per confidence bin against the diagonal) over a confidence histogram."""
    fig = _figure(6.4, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lo = np.asarray(diagram["bin_lower"], dtype=float)
    hi = np.asarray(diagram["bin_upper"], dtype=float)
    count = np.asarray(diagram["count"], dtype=float)
    acc = np.array([np.nan if v is None else v for v in diagram["accuracy"]], dtype=float)
    conf = np.array([np.nan if v is None else v for v in diagram["confidence"]], dtype=float)
    width = hi - lo
    centers = lo + width / 2
    ok = np.isfinite(acc)
    top.bar(centers[ok], acc[ok], width[ok] * 0.95, color=BLUE, alpha=0.85, label="accuracy in bin")
    top.bar(centers[ok], conf[ok] - acc[ok], width[ok] * 0.95, bottom=acc[ok], facecolor="none",
            hatch="///", edgecolor=RED, linewidth=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color=GREY, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""))
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centers, count, width * 0.95, color=GREY)
    bottom.set_xlabel("confidence (probability of the top label)")
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    return fig
