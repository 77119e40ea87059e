"""Hierarchical selective classification: risk-coverage curves, hAURC, DARTS curves.

Definitions (Goren, Galil & El-Yaniv, "Hierarchical Selective Classification",
NeurIPS 2024; Deng et al., "Hedging your bets", CVPR 2012):

* a prediction ``v`` is *correct* when ``v`` is the true node or an ancestor of
  it. A prediction deeper than a partial truth (species predicted, truth known
  only to genus) cannot be verified and counts as an error;
* ``coverage(v) = 1 - log2(#leaves under v) / log2(#leaves)``: 1 at a leaf, 0 at
  the root. ``info_gain(v) = log2(#leaves) - log2(#leaves under v)`` is the same
  quantity in bits (Deng's reward ``r``), so coverage = info gain / its maximum;
* the *climbing* rule with threshold ``theta`` starts at the top label and walks
  up to the first node whose summed probability is ``>= theta`` (the root
  always qualifies);
* the hierarchical risk-coverage curve traces, over thresholds, the mean
  coverage of the chosen nodes against the risk (fraction of errors) over all
  samples; hAURC is the area under it (trapezoids over coverage).

The curve here is exact: every threshold at which some prediction changes is a
point (one event per node on each sample's path, swept with a sort and a
cumulative sum), from "every sample at the root" (coverage 0, risk 0, any
threshold above 1) down to "every sample at its top label" (threshold 0). The
reference code of Goren et al. evaluates a grid of thresholds in [0, 1] and so
may stop short of the coverage-0 point; the difference is one trapezoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..taxonomy import Taxonomy
from ._common import (
    CHUNK_ELEMS,
    ancestor_rows,
    check_label_probs,
    check_nodes,
    known_mask,
    node_prob_chunks,
    path_masses,
)


def info_gain(tax: Taxonomy) -> np.ndarray:
    """Deng et al.'s reward per node: ``log2(#leaves) - log2(#leaves under v)`` bits."""
    return np.log2(len(tax.leaves)) - np.log2(tax.n_leaves_under)


def node_coverage(tax: Taxonomy) -> np.ndarray:
    """Goren et al.'s coverage per node: ``1 - log2(#leaves under v) / log2(#leaves)``."""
    n = len(tax.leaves)
    if n < 2:
        raise ValueError("coverage needs a tree with at least two leaves")
    return 1.0 - np.log2(tax.n_leaves_under) / np.log2(n)


def hierarchically_correct(tax: Taxonomy, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """True where ``pred`` is ``truth`` or one of its ancestors."""
    return tax.is_ancestor(pred, truth)


def risk_coverage_curve(tax: Taxonomy, label_probs: object, truth: object) -> dict[str, np.ndarray]:
    """Exact hierarchical risk-coverage curve of the climbing rule over all thresholds.

    Returns arrays ``threshold`` (descending; the first is ``inf``: all samples
    at the root), ``coverage`` (ascending) and ``risk``. Samples with unknown
    truth are left out.
    """
    label_probs = check_label_probs(tax, label_probs)
    truth = check_nodes(tax, truth, "truth", n=len(label_probs))
    keep = known_mask(truth)
    lp, t = label_probs[keep], truth[keep]
    top = tax.label_ids[lp.argmax(axis=1)] if len(t) else np.zeros(0, dtype=np.int64)
    anc, mass = path_masses(tax, lp, top)
    return curve_from_masses(tax, anc, mass, t)


def curve_from_masses(tax: Taxonomy, anc: np.ndarray, mass: np.ndarray, truth: np.ndarray,
                      every_threshold: bool = True) -> dict[str, np.ndarray]:
    """The exact curve from the top labels' lineages ``anc`` and path masses (known truths only).

    Moving from depth ``d - 1`` to depth ``d`` happens once ``theta <= mass[:, d]``;
    each such event changes the sample's coverage and correctness, and cumulative
    sums over the events sorted by threshold give the curve at every threshold.
    ``every_threshold=False`` leaves out the events that change neither coverage
    nor correctness (a step into a single-child node, right or wrong as before):
    they only repeat the previous point, so the area is the same (adding 0.0
    changes no partial sum), with fewer events to sort (``compute_metrics``' hAURC).
    """
    n = len(truth)
    if n == 0:
        return {"threshold": np.array([np.inf]), "coverage": np.array([0.0]), "risk": np.array([0.0])}
    cov = node_coverage(tax)
    tanc = ancestor_rows(tax, truth)
    valid = anc >= 0
    node_cov = np.where(valid, cov[np.maximum(anc, 0)], 0.0)
    correct = valid & (anc == tanc)
    ev = valid[:, 1:]
    theta = mass[:, 1:][ev]
    dcov = (node_cov[:, 1:] - node_cov[:, :-1])[ev]
    dcor = (correct[:, 1:].astype(np.int64) - correct[:, :-1])[ev]
    if not every_threshold:
        moves = (dcov != 0) | (dcor != 0)
        theta, dcov, dcor = theta[moves], dcov[moves], dcor[moves]
    order = np.argsort(-theta)  # events with equal thresholds are summed together: any order
    theta, dcov, dcor = theta[order], dcov[order], dcor[order]
    uniq_end = np.r_[np.flatnonzero(np.diff(theta) != 0), len(theta) - 1] if len(theta) else np.array([], int)
    ccov = np.cumsum(dcov)[uniq_end]
    ccor = np.cumsum(dcor)[uniq_end]
    return {
        "threshold": np.r_[np.inf, theta[uniq_end]],
        "coverage": np.r_[0.0, ccov / n],
        "risk": np.r_[0.0, -ccor / n],
    }


def area_under_curve(curve: dict[str, np.ndarray]) -> float:
    """Trapezoidal area of risk over coverage (NaN for a single point)."""
    x, y = curve["coverage"], curve["risk"]
    if len(x) < 2:
        return float("nan")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def haurc(tax: Taxonomy, label_probs: object, truth: object) -> float:
    """Area under the hierarchical risk-coverage curve of the climbing rule (lower is better)."""
    return area_under_curve(risk_coverage_curve(tax, label_probs, truth))


def darts_curve(tax: Taxonomy, label_probs: object, truth: object, lambdas: Sequence[float] | None = None,
                chunk_elems: int = CHUNK_ELEMS) -> dict[str, np.ndarray]:
    """Accuracy against mean information gain of DARTS decisions over a sweep of lambda.

    For each ``lam`` every sample takes ``argmax_v (info_gain(v) + lam) * p(v)``
    over all nodes (Deng et al. 2012). Default lambdas: 0 and 48 values
    log-spaced from 1e-3 to 1e3 times ``log2(#leaves)``. Returns ``lam``,
    ``accuracy``, ``info_gain`` (mean bits) and ``coverage`` (info gain / max).
    """
    label_probs = check_label_probs(tax, label_probs)
    truth = check_nodes(tax, truth, "truth", n=len(label_probs))
    keep = known_mask(truth)
    lp, t = label_probs[keep], truth[keep]
    r = info_gain(tax)
    rmax = float(r.max()) if r.max() > 0 else 1.0
    lams = np.asarray(lambdas if lambdas is not None else np.r_[0.0, np.logspace(-3, 3, 48) * rmax], dtype=float)
    acc = np.zeros(len(lams))
    gain = np.zeros(len(lams))
    for lo, hi, p in node_prob_chunks(tax, lp, None, chunk_elems):
        tt = t[lo:hi]
        for i, lam in enumerate(lams):
            choice = np.argmax((r + lam)[None, :] * p, axis=1)
            acc[i] += tax.is_ancestor(choice, tt).sum()
            gain[i] += r[choice].sum()
    n = max(len(t), 1)
    return {"lam": lams, "accuracy": acc / n, "info_gain": gain / n, "coverage": gain / n / rmax}
