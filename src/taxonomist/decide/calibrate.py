"""Fit decision parameters on validation data: temperature, back-off thresholds, DARTS lambda.

Everything returns plain floats or dicts of floats, ready for ``bundle.json``.
Correctness is hierarchical (Goren et al. 2024): an answer is right when it is
the true node or one of its ancestors; samples with unknown truth (``-1`` or the
root) are left out. A truth at a non-label node (partial label) is scored by
the same rule, so an answer below it counts as wrong (it cannot be verified).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize

from ..errors import DataError
from ..taxonomy import Taxonomy
from .base import check_label_probs, check_truth, level_names, path_masses, threshold_levels
from .darts import darts_choice


# ------------------------------------------------------------------ temperature
def fit_temperature(tax: Taxonomy, logits: object, truth: object, max_iter: int = 100,
                    chunk_elems: int = 1 << 22) -> float:
    """Temperature ``T`` minimising the validation NLL of ``softmax(logits / T)`` (Guo et al., ICML 2017).

    ``logits`` are label logits ``[N, n_labels]`` or label log-probabilities
    (the same result: a softmax ignores a per-row shift; ``log(0) = -inf`` is
    taken as 10^4 below the row's smallest finite value). The likelihood is
    partial-label aware: a sample whose truth is an internal node ``v`` scores
    ``log sum_{labels l under v} p(l)``, the probability of its subtree.
    Minimised with L-BFGS-B over ``u = log T`` in [-5, 5] with the exact
    gradient ``dNLL/du = -(1/T) * mean(E_p[z] - E_p[z | subtree of truth])``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != tax.n_labels:
        raise DataError(f"logits have shape {z.shape}; expected [n_samples, {tax.n_labels}] (label logits)")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise DataError("logits contain NaN or +infinity; pass finite logits or log-probabilities")
    if np.isneginf(z).any():  # log(0) from log-probabilities: a value far below the row's others
        if not np.isfinite(z).any(axis=1).all():
            raise DataError("a row of logits is entirely -infinity; pass finite logits or log-probabilities")
        low = np.where(np.isfinite(z), z, np.inf).min(axis=1, keepdims=True) - 1e4
        z = np.where(np.isneginf(z), low, z)
    t = check_truth(tax, truth, len(z))
    keep = t > 0
    z, t = z[keep], t[keep]
    if len(t) == 0:
        raise DataError("fit_temperature needs samples with a known truth (node id > 0)")
    under = sp.csc_matrix(tax.marginalization_matrix())[:, t]  # [n_labels, N]: labels under each truth
    n_under = np.asarray(under.sum(axis=0)).ravel()
    if (n_under == 0).any():
        i = int(np.flatnonzero(n_under == 0)[0])
        raise DataError(f"truth node {int(t[i])} ({tax.names[t[i]]!r}) has no label node in its subtree, so no "
                        "probability can be assigned to it; map such samples to a label or to -1")
    mask_t = under.T.tocsr()  # [N, n_labels] 0/1
    rows_per = max(1, chunk_elems // max(tax.n_labels, 1))

    def loss_and_grad(u: np.ndarray) -> tuple[float, np.ndarray]:
        beta = math.exp(-float(u[0]))
        loss = dbeta = 0.0
        for lo in range(0, len(t), rows_per):
            zc = z[lo:lo + rows_per]
            mc = mask_t[lo:lo + rows_per].toarray().astype(bool)
            s = beta * zc
            e = np.exp(s - s.max(axis=1, keepdims=True))
            zs = e.sum(axis=1)
            sm = np.where(mc, s, -np.inf)
            e2 = np.exp(sm - sm.max(axis=1, keepdims=True))
            zs2 = e2.sum(axis=1)
            loss += float(np.sum(np.log(zs) + s.max(axis=1) - np.log(zs2) - sm.max(axis=1)))
            dbeta += float(np.sum((e * zc).sum(axis=1) / zs - (e2 * zc).sum(axis=1) / zs2))
        n = len(t)
        return loss / n, np.array([-beta * dbeta / n])

    res = minimize(loss_and_grad, x0=np.zeros(1), jac=True, method="L-BFGS-B", bounds=[(-5.0, 5.0)],
                   options={"maxiter": max_iter})
    temp = float(math.exp(float(res.x[0])))
    if not math.isfinite(temp) or temp <= 0:
        raise DataError(f"temperature fit diverged (T = {temp}); check that the logits are not constant")
    return temp


# ------------------------------------------------------------------ thresholds
def _climb_tables(tax: Taxonomy, label_probs: object, truth: object):
    probs = check_label_probs(tax, label_probs)
    t = check_truth(tax, truth, len(probs))
    keep = t > 0
    probs, t = probs[keep], t[keep]
    if len(t) == 0:
        raise DataError("fitting thresholds needs samples with a known truth (node id > 0)")
    start = tax.label_ids[probs.argmax(axis=1)]
    anc, mass = path_masses(tax, probs, start)
    correct = (anc >= 0) & (anc == tax.ancestor_matrix(t))
    return anc, mass, correct


def _check_target(target_accuracy: float) -> float:
    target = float(target_accuracy)
    if not 0.0 < target <= 1.0:
        raise DataError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    return target


def _largest_accepted(m: np.ndarray, dstop: np.ndarray, dcor: np.ndarray, target: float) -> float | None:
    """Smallest threshold t whose stopping samples are >= ``target`` correct (None if none qualifies).

    One entry per (sample, node of the level on its lineage), sorted by mass
    ``m`` descending: ``dstop`` is 1 for a sample's shallowest node of the level
    (the sample stops at the level once ``t <= m`` there) and ``dcor`` the change
    in that sample's correctness when its answer moves down to this node (its
    correctness at the shallowest node for that one). Masses never grow down a
    lineage, so at any ``t`` the cumulative sums over the entries with
    ``m >= t`` count the samples stopping at the level and how many of their
    answers (the deepest node of the level with mass >= t) are right.
    """
    if len(m) == 0:
        return None
    ends = np.r_[np.flatnonzero(np.diff(m) != 0), len(m) - 1]  # last index of each tie group
    acc = np.cumsum(dcor)[ends] / np.cumsum(dstop)[ends]
    ok = np.flatnonzero(acc >= target - 1e-12)
    return float(m[ends[ok[-1]]]) if len(ok) else None


def _level_entries(anc: np.ndarray, mass: np.ndarray, correct: np.ndarray, node_lv: np.ndarray, j: int):
    """Entries of level ``j`` for :func:`_largest_accepted`, sorted by mass descending:
    (sample, mass, dstop, dcor), plus each sample's mass at its shallowest node of the level (-inf if none)."""
    at = node_lv == j
    above = np.zeros_like(at)
    above[:, 1:] = at[:, :-1]
    r, c = np.nonzero(at)
    first = ~above[r, c]
    cor = correct[r, c].astype(np.int64)
    prev = np.where(first, 0, correct[r, np.maximum(c - 1, 0)].astype(np.int64))
    m = mass[r, c]
    order = np.argsort(-m, kind="stable")
    top_mass = np.full(len(anc), -np.inf)
    top_mass[r[first]] = m[first]
    return r[order], m[order], first[order].astype(np.int64), (cor - prev)[order], top_mass


def fit_thresholds(tax: Taxonomy, label_probs: object, truth: object, target_accuracy: float = 0.9,
                   per_rank: bool = False) -> float | dict[str, float | None]:
    """Back-off thresholds reaching ``target_accuracy`` on validation data, answering as deep as possible.

    Global (``per_rank=False``): the smallest threshold t whose climbing
    decisions are at least ``target_accuracy`` correct. Accuracy only falls as t
    falls (a deeper answer on the same lineage can only lose correctness), so
    this is exact: every path mass is a candidate, swept with one sort.

    Per rank (``per_rank=True``; per depth level for an unranked tree): for a
    group accuracy ``alpha``, a greedy pass from the deepest rank up sets each
    rank's threshold to the smallest t such that, among the samples that have
    not stopped deeper, those whose node at this rank has mass >= t are at least
    ``alpha`` correct; they stop there and the rest climb on (the root is always
    right). ``alpha`` is then lowered by bisection to the smallest value whose
    overall validation accuracy still reaches ``target_accuracy``, so the
    thresholds answer as deep as the target allows rather than making every
    rank meet it on its own. A rank where no threshold qualifies maps to
    ``None`` (never stop there). An unranked node belongs to the rank of its
    nearest ranked ancestor, as in :func:`~taxonomist.decide.threshold.node_thresholds`
    (:func:`~taxonomist.decide.base.threshold_levels`), so that rank's
    threshold is fitted on its run of nodes on each lineage (FathomNet: Chordata
    and Tunicata for phylum) and every label stays reachable.

    Returns a float, or ``{rank: threshold or None}``; pass it as
    ``decide(..., method="threshold", threshold=...)``.
    """
    target = _check_target(target_accuracy)
    anc, mass, correct = _climb_tables(tax, label_probs, truth)
    n = len(anc)
    if not per_rank:
        valid = anc[:, 1:] >= 0
        theta = mass[:, 1:][valid]
        dcor = (correct[:, 1:].astype(np.int64) - correct[:, :-1])[valid]
        order = np.argsort(-theta, kind="stable")
        theta, dcor = theta[order], dcor[order]
        if len(theta) == 0:
            return 0.0
        ends = np.r_[np.flatnonzero(np.diff(theta) != 0), len(theta) - 1]
        acc = (n + np.cumsum(dcor)[ends]) / n
        ok = np.flatnonzero(acc >= target - 1e-12)
        if len(ok) == 0:
            warnings.warn(f"no threshold reaches accuracy {target} below the root on this data; "
                          "every answer will be the root", stacklevel=2)
            return float(np.nextafter(theta[0], np.inf))
        return float(theta[ends[ok[-1]]])
    names = level_names(tax)
    lv = threshold_levels(tax, names)
    node_lv = np.where(anc >= 0, lv[np.maximum(anc, 0)], -1)
    # per level: the (sample, node) entries of the level's run of nodes on each lineage, sorted once
    tables = [_level_entries(anc, mass, correct, node_lv, j) for j in range(len(names))]

    def greedy(alpha: float) -> tuple[dict[str, float | None], float]:
        remaining = np.ones(n, dtype=bool)
        out: dict[str, float | None] = {}
        n_correct = 0
        for j in range(len(names) - 1, -1, -1):
            r, m, dstop, dcor, top_mass = tables[j]
            sel = remaining[r]
            tau = _largest_accepted(m[sel], dstop[sel], dcor[sel], alpha)
            out[names[j]] = tau
            if tau is not None:
                n_correct += int(dcor[sel & (m >= tau)].sum())
                remaining &= ~(top_mass >= tau)
        return {r: out[r] for r in names}, (n_correct + int(remaining.sum())) / n

    # the group accuracy alpha trades depth for accuracy; alpha = 1 always meets the target
    lo, hi = 0.0, 1.0
    best = greedy(hi)[0]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        thr, acc = greedy(mid)
        if acc >= target - 1e-12:
            hi, best = mid, thr
        else:
            lo = mid
        if hi - lo < 1e-6:
            break
    return best


# ------------------------------------------------------------------ DARTS
def fit_darts_lambda(tax: Taxonomy, label_probs: object, truth: object, target_accuracy: float = 0.9,
                     tol: float = 1e-4, max_iter: int = 60) -> float:
    """Smallest ``lam`` whose DARTS decisions reach ``target_accuracy`` on validation data (bisection).

    Deng et al. (2012) show accuracy grows with ``lam``; returns 0.0 when
    ``lam = 0`` already reaches the target. Raises :class:`DataError` when no
    ``lam`` does (the model puts near-certain probability on wrong classes).
    """
    target = _check_target(target_accuracy)
    probs = check_label_probs(tax, label_probs)
    t = check_truth(tax, truth, len(probs))
    keep = t > 0
    probs, t = probs[keep], t[keep]
    if len(t) == 0:
        raise DataError("fit_darts_lambda needs samples with a known truth (node id > 0)")

    def accuracy(lam: float) -> float:
        node, _, _ = darts_choice(tax, probs, lam)
        return float(tax.is_ancestor(node, t).mean())

    if accuracy(0.0) >= target:
        return 0.0
    hi = 1.0
    while accuracy(hi) < target:
        hi *= 4.0
        if hi > 1e12:
            raise DataError(f"no DARTS lambda reaches accuracy {target} on this data (at lambda={hi:g} it is "
                            f"{accuracy(hi):.4f}); lower the target or recalibrate the model")
    lo = 0.0
    for _ in range(max_iter):
        if hi - lo <= tol * max(1.0, hi):
            break
        mid = 0.5 * (lo + hi)
        if accuracy(mid) >= target:
            hi = mid
        else:
            lo = mid
    return float(hi)

