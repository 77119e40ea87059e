"""The numbers behind the report: grouped confusion, decision sweeps, worst mistakes, per-class table.

Pure numpy over node ids and the taxonomy (no plotting, no HTML), so each piece
is testable against a slow reference. Sources of the definitions:

* hierarchical correctness (an answer is right when it is the truth or one of
  its ancestors) and the climbing rule: Goren et al., NeurIPS 2024;
* DARTS ``argmax_v (info_gain(v) + lam) p(v)``: Deng et al., CVPR 2012;
* LCA height ("mistake severity"): Bertinetto et al., CVPR 2020;
* per-class precision / recall / F1: the usual one-vs-rest counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decide import decide
from ..decide.base import path_masses
from ..decide.darts import darts_choice, info_gain
from ..metrics import decision_metrics, level_predictions
from ..metrics._common import Levels, known_mask, resolve_levels
from ..taxonomy import Taxonomy

#: at most this many probability cells (rows x nodes) go into a decision sweep; more rows are subsampled
SWEEP_CELLS = 4_000_000


# ------------------------------------------------------------------ grouped confusion
def choose_group_level(tax: Taxonomy, truth: np.ndarray, levels: Levels, max_groups: int = 30,
                       min_reach: float = 0.8) -> int:
    """Index of the level for a readable grouped confusion matrix.

    The deepest level whose truths fall into 2..``max_groups`` groups and that at
    least ``min_reach`` of the known truths reach (a deep level that only a few
    samples reach shows little). Failing that, the deepest level with 2..``max_groups``
    groups; then the shallowest level with two or more groups (the matrix lumps
    the rarest into "other"); 0 when no level has two groups.
    """
    known = known_mask(truth)
    n_known = max(int(known.sum()), 1)
    counts, reach = [], []
    for j in range(len(levels.names)):
        g = levels.view[truth[known], j]
        counts.append(len(np.unique(g[g >= 0])))
        reach.append(int((g >= 0).sum()) / n_known)
    ok = [j for j, c in enumerate(counts) if 2 <= c <= max_groups]
    wide = [j for j in ok if reach[j] >= min_reach]
    if wide:
        return wide[-1]
    if ok:
        return ok[-1]
    several = [j for j, c in enumerate(counts) if c >= 2]
    return several[0] if several else 0


@dataclass(frozen=True)
class GroupedConfusion:
    """Counts ``matrix[i, j]``: samples whose truth is in group i and prediction in group j, at one level.

    ``nodes`` are the groups' node ids (``-1`` for the lumped "other" group), in
    depth-first order so that related groups sit next to each other.
    """

    level: str
    nodes: np.ndarray
    names: list[str]
    matrix: np.ndarray
    n_excluded: int


def grouped_confusion(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray, level: str,
                      ranks: Sequence[str] | None = None, max_groups: int = 30) -> GroupedConfusion:
    """Confusion matrix at ``level``: the truth's ancestor there against the level's most probable node.

    The prediction is the argmax of the level's node probabilities (subtree
    masses), as ``<level>/top1`` in metrics.json. Samples whose truth stops above
    the level are left out (``n_excluded``). With more than ``max_groups`` truth
    groups the most frequent ``max_groups - 1`` are kept and the rest (and any
    prediction outside the kept groups) become "other".
    """
    names = list(resolve_levels(tax, ranks).names)
    if level not in names:
        raise ValueError(f"unknown level {level!r}; levels are {names}")
    lp = level_predictions(tax, label_probs, truth, names)[names.index(level)]
    inc = lp.included
    t, p = lp.truth[inc], lp.pred[inc]
    groups, counts = np.unique(t, return_counts=True)
    lumped = len(groups) > max_groups
    if lumped:
        keep = groups[np.argsort(-counts, kind="stable")[:max_groups - 1]]
        groups = keep
    groups = groups[np.argsort(tax.preorder[groups], kind="stable")]
    pos = np.full(tax.n_nodes, len(groups), dtype=np.int64)
    pos[groups] = np.arange(len(groups))
    k = len(groups) + (1 if lumped or np.any(pos[p] == len(groups)) else 0)
    ti = np.minimum(pos[t], k - 1)
    pi = np.minimum(pos[p], k - 1)
    mat = np.bincount(ti * k + pi, minlength=k * k).reshape(k, k)
    nodes = np.r_[groups, [-1] * (k - len(groups))].astype(np.int64)
    labels = [str(tax.names[v]) for v in groups] + ["other"] * (k - len(groups))
    return GroupedConfusion(level, nodes, labels, mat, int((known_mask(truth) & ~lp.included).sum()))


# ------------------------------------------------------------------ decision sweeps
def _subsample(label_probs: np.ndarray, truth: np.ndarray, n_nodes: int, cells: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
    keep = np.flatnonzero(known_mask(truth))
    limit = max(1, cells // max(n_nodes, 1))
    if len(keep) > limit:
        keep = np.sort(np.random.default_rng(0).choice(keep, limit, replace=False))
    return label_probs[keep], truth[keep], len(keep)


def decision_sweeps(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray,
                    thresholds: Sequence[float] | None = None, lambdas: Sequence[float] | None = None,
                    max_cells: int = SWEEP_CELLS) -> dict[str, dict[str, np.ndarray]]:
    """Accuracy against specificity for the threshold (climbing) rule and for DARTS, over a sweep.

    Returns ``{"threshold": {...}, "darts": {...}}``, each with the swept
    parameter (``threshold`` / ``lam``), hierarchical ``accuracy``, mean
    ``info_gain`` (bits) and mean ``depth`` of the answers, plus ``n`` (samples
    used: known truths, subsampled with a fixed seed beyond ``max_cells`` cells).
    """
    probs, t, n = _subsample(label_probs, truth, tax.n_nodes, max_cells)
    r = info_gain(tax)
    depth = tax.depth
    thr = np.unique(np.r_[np.linspace(0.0, 1.0, 41), 0.95, 0.975, 0.99, 0.995, 0.999]
                    if thresholds is None else np.asarray(thresholds, dtype=float))[::-1]
    rmax = float(r.max()) if r.max() > 0 else 1.0
    lams = (np.r_[0.0, np.logspace(-3, 3, 40) * rmax] if lambdas is None else np.asarray(lambdas, dtype=float))
    out: dict[str, dict[str, np.ndarray]] = {}
    if n == 0:
        empty = np.zeros(0)
        return {"threshold": {"threshold": empty, "accuracy": empty, "info_gain": empty, "depth": empty, "n": 0},
                "darts": {"lam": empty, "accuracy": empty, "info_gain": empty, "depth": empty, "n": 0}}
    start = tax.label_ids[probs.argmax(axis=1)]
    anc, mass = path_masses(tax, probs, start)
    rows = np.arange(n)
    acc, gain, dep = np.zeros(len(thr)), np.zeros(len(thr)), np.zeros(len(thr))
    for i, th in enumerate(thr):
        ok = (anc >= 0) & (mass >= th)
        ok[:, 0] = True
        col = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
        node = anc[rows, col]
        acc[i] = tax.is_ancestor(node, t).mean()
        gain[i], dep[i] = r[node].mean(), depth[node].mean()
    out["threshold"] = {"threshold": thr, "accuracy": acc, "info_gain": gain, "depth": dep, "n": n}
    acc, gain, dep = np.zeros(len(lams)), np.zeros(len(lams)), np.zeros(len(lams))
    for i, lam in enumerate(lams):
        node = darts_choice(tax, probs, float(lam))[0]
        acc[i] = tax.is_ancestor(node, t).mean()
        gain[i], dep[i] = r[node].mean(), depth[node].mean()
    out["darts"] = {"lam": lams, "accuracy": acc, "info_gain": gain, "depth": dep, "n": n}
    return out


# ------------------------------------------------------------------ decisions
def decision_options(tax: Taxonomy, calibration: Mapping[str, Any] | None, default_threshold: float = 0.8
                     ) -> dict[str, dict[str, Any]]:
    """The decision rules the report compares, with the bundle's calibrated settings when present."""
    cal = dict(calibration or {})
    thr = cal.get("thresholds")
    out: dict[str, dict[str, Any]] = {
        "argmax": {"method": "argmax"},
        "threshold": {"method": "threshold", "threshold": thr if thr is not None else default_threshold},
        "crm": {"method": "crm", "metric": "rank_steps" if tax.has_ranks else "path"},
        "darts": {"method": "darts", "lam": float(cal.get("darts_lambda") or 0.0)},
    }
    return out


def decision_summary(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray,
                     options: Mapping[str, Mapping[str, Any]], distance_ranks: Sequence[str] | None = None
                     ) -> list[dict[str, Any]]:
    """One row per decision rule: its settings and hierarchical accuracy, coverage, depth and distances."""
    rows = []
    known = known_mask(truth)
    for name, opt in options.items():
        opt = dict(opt)
        method = opt.pop("method")
        dec = decide(tax, label_probs, method, **opt)
        m = decision_metrics(tax, dec.node, truth, distance_ranks)
        rows.append({"name": name, "method": method, "params": dec.params,
                     "mean_depth": float(tax.depth[dec.node[known]].mean()) if known.any() else None,
                     "at_label": float(np.mean(tax.is_label[dec.node[known]])) if known.any() else None, **m})
    return rows


# ------------------------------------------------------------------ worst mistakes
def worst_mistakes(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray, n: int = 24) -> list[dict[str, Any]]:
    """The ``n`` worst top-label mistakes: highest LCA height, then longest path, then most confident.

    A top label is a mistake when it is not the truth, except under a partial
    truth (a non-label node) whose subtree contains it. Each item: ``index``
    (row), ``truth``, ``pred`` and ``lca`` node ids, ``confidence`` (the top
    label's probability), ``lca_height``, ``path_distance`` and, for ranked
    trees, ``rank_distance``.
    """
    known = known_mask(truth)
    if not known.any() or len(label_probs) == 0:
        return []
    top_idx = label_probs.argmax(axis=1)
    top = tax.label_ids[top_idx]
    conf = label_probs[np.arange(len(top)), top_idx]
    t = np.maximum(truth, 0)
    lca = tax.lca(top, t)
    partial_ok = ~tax.is_label[t] & (lca == t)
    wrong = np.flatnonzero(known & (top != t) & ~partial_ok)
    if len(wrong) == 0:
        return []
    d_h = tax.height[lca[wrong]]
    d_path = tax.depth[top[wrong]] + tax.depth[t[wrong]] - 2 * tax.depth[lca[wrong]]
    order = np.lexsort((wrong, -conf[wrong], -d_path, -d_h))[:n]
    rc = tax.rank_count() if tax.has_ranks else None
    items = []
    for k in order:
        i = int(wrong[k])
        item = {"index": i, "truth": int(t[i]), "pred": int(top[i]), "lca": int(lca[i]),
                "confidence": float(conf[i]), "lca_height": int(d_h[k]), "path_distance": int(d_path[k])}
        if rc is not None:
            item["rank_distance"] = int(rc[top[i]] + rc[t[i]] - 2 * rc[lca[i]])
        items.append(item)
    return items


# ------------------------------------------------------------------ per-class table
def label_table(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    """Per label: support, predicted count, precision, recall, F1 of the top label, its most frequent
    wrong prediction and the mean LCA height of its mistakes; worst first (F1, then larger support).

    Uses the samples whose truth is a label node (as ``top1_error``). Labels that
    are neither in the truth nor predicted are left out.
    """
    t = np.maximum(truth, 0)
    inc = known_mask(truth) & tax.is_label[t]
    L = tax.n_labels
    ti = tax.label_index[t[inc]]
    pi = label_probs[inc].argmax(axis=1) if inc.any() else np.zeros(0, dtype=np.int64)
    support = np.bincount(ti, minlength=L)
    n_pred = np.bincount(pi, minlength=L)
    tp = np.bincount(ti[ti == pi], minlength=L)
    wrong = ti != pi
    # most frequent wrong prediction per true label: distinct (truth, pred) pairs, sorted by count
    codes, cnt = np.unique(ti[wrong] * L + pi[wrong], return_counts=True)
    order = np.lexsort((-cnt, codes // L))
    first = order[np.r_[True, np.diff(codes[order] // L) != 0]] if len(codes) else order
    conf_pred = np.full(L, -1, dtype=np.int64)
    conf_count = np.zeros(L, dtype=np.int64)
    conf_pred[codes[first] // L] = codes[first] % L
    conf_count[codes[first] // L] = cnt[first]
    d_h = tax.height[tax.lca(tax.label_ids[ti[wrong]], tax.label_ids[pi[wrong]])] if wrong.any() else np.zeros(0)
    sev_sum = np.bincount(ti[wrong], weights=d_h, minlength=L)
    n_wrong = np.bincount(ti[wrong], minlength=L)
    rows = []
    for i in np.flatnonzero((support + n_pred) > 0):
        prec = tp[i] / n_pred[i] if n_pred[i] else None
        rec = tp[i] / support[i] if support[i] else None
        f1 = 2 * tp[i] / (support[i] + n_pred[i])
        row: dict[str, Any] = {"label": int(tax.label_ids[i]), "name": str(tax.names[tax.label_ids[i]]),
                               "support": int(support[i]), "n_pred": int(n_pred[i]), "tp": int(tp[i]),
                               "precision": prec, "recall": rec, "f1": float(f1),
                               "confused_with": None, "confused_count": 0,
                               "mistake_severity": float(sev_sum[i] / n_wrong[i]) if n_wrong[i] else None}
        if conf_pred[i] >= 0:
            row["confused_with"] = str(tax.names[tax.label_ids[conf_pred[i]]])
            row["confused_count"] = int(conf_count[i])
        rows.append(row)
    rows.sort(key=lambda r: (r["f1"], -r["support"], r["name"]))
    return rows
