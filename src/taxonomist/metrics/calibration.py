"""Calibration: expected calibration error and reliability-diagram data.

ECE (Naeini et al., AAAI 2015; Guo et al., ICML 2017): split confidences into
``n_bins`` equal-width bins over [0, 1], bin ``b`` holding ``(b/n, (b+1)/n]``
(a confidence of exactly 0 goes to the first bin, values a rounding error above
1 to the last), then

    ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|.

Default 15 bins (Guo et al.). Per level the confidence is the probability of
the level's argmax node and "correct" means that node is the truth's ancestor
at that level; at the label level, the top label's probability against
"top label == truth".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..taxonomy import Taxonomy

N_BINS = 15


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_diagram(confidence: object, correct: object, n_bins: int = N_BINS) -> dict[str, list]:
    """Per-bin data for a reliability diagram (JSON-ready).

    Returns ``bin_lower``, ``bin_upper``, ``count``, ``confidence`` (mean in
    bin), ``accuracy`` (mean correctness in bin); empty bins have ``None``.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence ({conf.shape}) and correct ({corr.shape}) must have the same length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    b = _bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    sconf = np.bincount(b, weights=conf, minlength=n_bins)
    scorr = np.bincount(b, weights=corr, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mconf = sconf / count
        macc = scorr / count
    return {
        "bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(), "count": count.tolist(),
        "confidence": [None if c == 0 else float(x) for c, x in zip(count, mconf)],
        "accuracy": [None if c == 0 else float(x) for c, x in zip(count, macc)],
    }


def expected_calibration_error(confidence: object, correct: object, n_bins: int = N_BINS) -> float:
    """Equal-width-bin ECE (NaN for no samples)."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence ({conf.shape}) and correct ({corr.shape}) must have the same length")
    if len(conf) == 0:
        return float("nan")
    b = _bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, weights=corr, minlength=n_bins) - np.bincount(b, weights=conf, minlength=n_bins))
    # sum_b n_b/N * |acc_b - conf_b| = sum_b |sum correct - sum conf| / N
    return float(gap.sum() / len(conf)) if count.sum() else float("nan")


def reliability_by_level(tax: Taxonomy, label_probs: object, truth: object, ranks: Sequence[str] | None = None,
                         n_bins: int = N_BINS) -> dict[str, dict]:
    """Reliability-diagram data for the top label (key ``"label"``, label truths only) and for every
    level (the level's argmax node against the truth's ancestor there), JSON-ready."""
    from ._common import check_label_probs, check_nodes, known_mask
    from .flat import level_predictions

    probs = check_label_probs(tax, label_probs)
    t = check_nodes(tax, truth, "truth", n=len(probs))
    top_idx = probs.argmax(axis=1)
    inc = known_mask(t) & tax.is_label[np.maximum(t, 0)]
    out = {"label": reliability_diagram(probs[np.arange(len(probs)), top_idx][inc],
                                        (tax.label_ids[top_idx] == t)[inc], n_bins)}
    for lp in level_predictions(tax, probs, t, ranks):
        keep = lp.included
        out[lp.name] = reliability_diagram(lp.confidence[keep], (lp.pred == lp.truth)[keep], n_bins)
    return out
