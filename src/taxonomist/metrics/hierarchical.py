"""Hierarchical metrics: how far wrong a prediction is, measured on the tree.

All functions take node ids (predictions and truths at any depth) and are
vectorised through the taxonomy's LCA (binary lifting). Samples whose truth is
unknown (``-1``) or the root are left out.

* **Mistake severity** (Bertinetto et al., "Making Better Mistakes", CVPR 2020):
  mean LCA height ``d_h(pred, truth)`` over the misclassified samples only.
* **Hierarchical distance@k** (same paper): mean over samples and over the top-k
  predictions of ``d_h(pred_j, truth)``; a correct prediction costs 0, so
  ``hdist@1 = top-1 error x mistake severity``.

  Both (and top-k error) are *label-level* scores: they use the samples whose
  truth is a **label** node. A partial truth (a non-label node, "somewhere
  under this genus") has no single correct label, so no ranked label can be
  exactly right for it; it is scored by the node-level metrics below instead.
  :func:`ranked_distances` is the one implementation: ``mistake_severity``,
  ``hierarchical_distance_at_k`` and ``compute_metrics`` all reduce its table.
* **Mean path distance**: mean number of edges between prediction and truth
  through their LCA.
* **Mean rank distance** (FathomNet FGVC 2025 score, "mean hierarchical
  distance"): the path counted only over nodes whose rank is in a fixed list
  (kingdom ... species); 0 best, 12 worst for two species that share only the kingdom.
* **Hierarchical precision / recall / F1** (Kiritchenko et al., 2006; the
  micro/macro conventions of HiClass, Miranda et al. 2023). With
  ``A`` = predicted node and its ancestors and ``B`` = true node and its
  ancestors, *root excluded*, by node id: ``hP = sum|A n B| / sum|A|``,
  ``hR = sum|A n B| / sum|B|``, ``hF = 2 hP hR / (hP + hR)`` (micro: pooled
  counts; macro: per-sample values averaged). Since both sets are root paths,
  ``|A| = depth(pred)``, ``|B| = depth(truth)`` and ``|A n B| = depth(lca)``.
  Comparing node ids (not names) keeps a name that repeats at two levels as two
  nodes. The root is excluded because it is in every ``A`` and every ``B``: it
  would add 1 to every intersection and so reward any answer, even the root
  itself; and HiClass's label paths (one label per level) have no root either,
  so on trees without repeated names the values equal HiClass's (tested).
  Per-sample convention for a prediction at the root (empty ``A``):
  precision 1 (nothing claimed, nothing wrong), recall 0, F1 0.
* **Path violation rate**: the fraction of samples whose independent per-level
  predictions (e.g. the argmax node of every rank) do not form one path of the tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..taxonomy import Taxonomy
from ._common import check_nodes, known_mask


def _pairs(tax: Taxonomy, pred: object, truth: object) -> tuple[np.ndarray, np.ndarray]:
    truth = check_nodes(tax, truth, "truth")
    pred = check_nodes(tax, pred, "predictions", n=len(truth), allow_unknown=False)
    keep = known_mask(truth)
    return pred[keep], truth[keep]


def ranked_distances(tax: Taxonomy, ranked: object, truth: object) -> np.ndarray:
    """``d_h(ranked[i, j], truth[i])`` for the samples whose truth is a label node: ``[n_label_truth, k]``.

    ``ranked`` is ``[N, k]`` node ids (any depth; a ranking such as the top-k
    labels, or one column of predictions). ``d_h(a, b) = 0`` if ``a == b``, else
    the height of ``lca(a, b)``, which is then at least 1 (so ``d_h > 0`` exactly
    marks a mistake). Rows with an unknown truth (-1, the root) or a partial
    (non-label) truth are left out, in their original order otherwise.
    """
    truth = check_nodes(tax, truth, "truth")
    ranked = check_nodes(tax, ranked, "ranked predictions", n=len(truth), allow_unknown=False, ndim=2)
    keep = label_truth_mask(tax, truth)
    r, t = ranked[keep], truth[keep]
    if r.size == 0:
        return np.zeros(r.shape, dtype=np.int64)
    if tax.n_labels ** 2 <= r.size and tax.is_label[r].all():
        # labels against label truths, more pairs than label pairs: read one [labels, labels] table
        # (Taxonomy.distance_matrix, the same integers) instead of one LCA per pair
        li = tax.label_index
        return tax.distance_matrix(tax.label_ids, metric="lca_height")[li[r], li[t][:, None]].astype(np.int64)
    return np.asarray(tax.distance(r, t[:, None], metric="lca_height"), dtype=np.int64)


def label_truth_mask(tax: Taxonomy, truth: np.ndarray) -> np.ndarray:
    """Samples that label-level scores use: a known truth (not -1, not the root) at a label node."""
    return known_mask(truth) & tax.is_label[np.maximum(truth, 0)]


def severity_from(d: np.ndarray) -> float:
    """Mistake severity from a :func:`ranked_distances` column: mean of the positive values (NaN if none)."""
    wrong = d > 0
    return float(d[wrong].mean()) if wrong.any() else float("nan")


def mistake_severity(tax: Taxonomy, pred: object, truth: object) -> float:
    """Mean LCA height of the misclassified samples whose truth is a label (NaN when there is no mistake).

    ``pred`` holds one node id per sample (any depth). Partial and unknown truths are
    left out (see the module docstring); the same value as ``compute_metrics``'s
    ``mistake_severity`` for the top labels.
    """
    pred = check_nodes(tax, pred, "predictions", allow_unknown=False)
    return severity_from(ranked_distances(tax, pred[:, None], truth)[:, 0])


def hierarchical_distance_at_k(tax: Taxonomy, ranked: object, truth: object) -> float:
    """Mean LCA height between the truth and each of the ``k`` ranked predictions (``ranked`` is [N, k]).

    Over the samples whose truth is a label (NaN when there is none); ``ranked[:, :k]``
    of the top labels gives ``compute_metrics``'s ``hdist@k``.
    """
    d = ranked_distances(tax, ranked, truth)
    return float(d.mean()) if d.size else float("nan")


def mean_distance(tax: Taxonomy, pred: object, truth: object, metric: str = "path",
                  ranks: Sequence[str] | None = None) -> float:
    """Mean tree distance between prediction and truth (``path``, ``lca_height`` or ``rank_steps``)."""
    p, t = _pairs(tax, pred, truth)
    if len(p) == 0:
        return float("nan")
    return float(tax.distance(p, t, metric=metric, ranks=ranks).mean())


def mean_path_distance(tax: Taxonomy, pred: object, truth: object) -> float:
    """Mean number of edges between prediction and truth."""
    return mean_distance(tax, pred, truth, "path")


def mean_rank_distance(tax: Taxonomy, pred: object, truth: object, ranks: Sequence[str] | None = None) -> float:
    """FathomNet 2025 mean rank-step distance over ``ranks`` (default: every rank of the tree)."""
    return mean_distance(tax, pred, truth, "rank_steps", ranks)


def hierarchical_prf(tax: Taxonomy, pred: object, truth: object) -> dict[str, float]:
    """Hierarchical precision, recall and F1, micro and macro (Kiritchenko et al. 2006).

    Returns ``{"hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro"}`` (NaN when no sample is known).
    """
    p, t = _pairs(tax, pred, truth)
    return prf_from_depths(tax.depth[tax.lca(p, t)], tax.depth[p], tax.depth[t])


def prf_from_depths(inter: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """hP/hR/hF from ``|A n B| = depth(lca)``, ``|A| = depth(pred)``, ``|B| = depth(truth)`` per sample."""
    nan = float("nan")
    if len(inter) == 0:
        return dict.fromkeys(("hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro"), nan)
    inter = inter.astype(np.float64)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    hp = inter.sum() / a.sum() if a.sum() > 0 else 1.0
    hr = inter.sum() / b.sum()
    hf = 2 * hp * hr / (hp + hr) if hp + hr > 0 else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        ps = np.where(a > 0, inter / np.maximum(a, 1), 1.0)
        rs = inter / b
        fs = np.where(ps + rs > 0, 2 * ps * rs / np.maximum(ps + rs, 1e-300), 0.0)
    return {"hp": float(hp), "hr": float(hr), "hf": float(hf),
            "hp_macro": float(ps.mean()), "hr_macro": float(rs.mean()), "hf_macro": float(fs.mean())}


def path_violations(tax: Taxonomy, level_preds: object) -> np.ndarray:
    """True for samples whose per-level predictions ``[N, R]`` (shallow level first) are not one root path.

    A tuple is a path when each prediction is the previous level's prediction or
    a descendant of it; ``-1`` entries (no prediction at that level) are skipped.
    """
    preds = check_nodes(tax, level_preds, "per-level predictions", ndim=2)
    n, r = preds.shape
    bad = np.zeros(n, dtype=bool)
    prev = np.full(n, -1, dtype=np.int64)
    for j in range(r):
        cur = preds[:, j]
        both = (prev >= 0) & (cur >= 0)
        if both.any():
            ok = tax.is_ancestor(prev[both], cur[both])
            bad[np.flatnonzero(both)[~ok]] = True
        prev = np.where(cur >= 0, cur, prev)
    return bad


def path_violation_rate(tax: Taxonomy, level_preds: object) -> float:
    """Fraction of samples whose per-level predictions are not a path of the tree."""
    bad = path_violations(tax, level_preds)
    return float(bad.mean()) if len(bad) else float("nan")
