"""Scores of *hard* predictions: one node (any depth) or an unknown name per sample.

A competition submission (FathomNet 2025: one taxon name per annotation, at any
rank) has no probabilities, so only the metrics that compare two nodes apply.
``hard_metrics(tax, pred, truth)`` returns them as one flat JSON-ready dict:

* ``accuracy``: hierarchically correct (the prediction is the truth or one of
  its ancestors; Goren et al., NeurIPS 2024); ``exact_accuracy``: prediction ==
  truth; ``coverage`` (Goren et al.'s ``1 - log2(#leaves under p) / log2(#leaves)``)
  and ``mean_depth`` of the predictions: how specific the answers are.
* ``mean_rank_distance`` (ranked trees): the FathomNet 2025 score, rank steps
  between prediction and truth through their LCA over ``distance_ranks``
  (default: every rank); ``mean_path_distance``: edges through the LCA.
* ``top1_error`` (1 - exact accuracy), ``mistake_severity`` (mean LCA height
  over the predictions that are not the truth) and ``hdist@1`` (the same with
  correct answers counting 0), after Bertinetto et al., CVPR 2020. These are
  label-level keys with the one definition of
  :func:`taxonomist.metrics.hierarchical.ranked_distances`: they use the samples
  whose truth is a label node (``n_label_truth``), exactly as ``compute_metrics``
  does, so ``top1_error = 1 - exact_accuracy`` when every truth is a label.
* ``hp``, ``hr``, ``hf`` (micro) and ``hp_macro``, ``hr_macro``, ``hf_macro``:
  hierarchical precision / recall / F1 (Kiritchenko et al. 2006) on root paths
  of node ids, root excluded, as :mod:`taxonomist.metrics.hierarchical`.
* per level (rank, or depth ``level<d>`` of an unranked tree):
  ``<level>/accuracy`` (the prediction's ancestor at that level is the truth's;
  a prediction that stops above the level counts as wrong), ``<level>/answered``
  (fraction of predictions that reach the level), ``<level>/n`` and
  ``<level>/n_excluded`` (truths that stop above the level). ``<level>/top1``
  repeats ``<level>/accuracy`` under the name of the metrics.json contract.
* the contract keys that need probabilities or a ranking (``top5_error``,
  ``hdist@5``, ``ece``, ``haurc``, ``<level>/top5``) are present as ``None``,
  so a reader finds every contract key in any metrics.json.

Unknown predictions (``pred = -1``: a name that is not in the taxonomy) are
scored as the worst answer, following the FathomNet 2025 rule that an unknown
name scores the maximum: rank distance ``2 x max rank count`` (12 on the seven
FathomNet ranks), path distance ``2 x max depth``, LCA height ``height(root)``,
wrong at every level, coverage 0 and, for hP/hR, no node in common with the
truth while claiming as many levels as the truth has (``|A| = depth(truth)``).
Samples whose truth is unknown (``-1``) or the root are left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from ..taxonomy import Taxonomy
from ._common import as_float, check_nodes, known_mask, resolve_levels
from .hierarchical import label_truth_mask, prf_from_depths, ranked_distances, severity_from
from .selective import node_coverage


def worst_distances(tax: Taxonomy, distance_ranks: Sequence[str] | None = None) -> dict[str, int]:
    """The score an unknown prediction gets per distance: the largest value the tree allows.

    ``path``: ``2 x max depth``; ``lca_height``: ``height(root)``; ``rank_steps`` (ranked trees):
    ``2 x`` the largest number of ranked ancestors-or-self of a node (12 for FathomNet 2025).
    """
    out = {"path": 2 * tax.max_depth, "lca_height": int(tax.height[0])}
    if tax.has_ranks:
        out["rank_steps"] = 2 * int(tax.rank_count(list(distance_ranks) if distance_ranks else None).max())
    return out


def hard_metrics(tax: Taxonomy, pred: object, truth: object, ranks: Sequence[str] | None = None,
                 distance_ranks: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of one predicted node per sample (``-1`` = unknown name) against truths at any depth.

    ranks: levels for the per-level keys (default: every rank, or every depth level).
    distance_ranks: ranks counted by ``mean_rank_distance`` (default ``ranks``, else all).
    See the module docstring for every key and for how unknown predictions score.
    """
    truth = check_nodes(tax, truth, "truth")
    pred = check_nodes(tax, pred, "predictions", n=len(truth))
    if distance_ranks is None and tax.has_ranks and ranks is not None:
        distance_ranks = list(ranks)
    levels = resolve_levels(tax, ranks)
    known = known_mask(truth)
    is_label_truth = label_truth_mask(tax, truth)
    m: dict[str, Any] = {"n_samples": int(len(truth)), "n_unknown_truth": int((~known).sum()),
                         "n_scored": int(known.sum()), "n_unknown_predictions": int((known & (pred < 0)).sum()),
                         "n_label_truth": int(is_label_truth.sum()),
                         "n_partial_truth": int((known & ~is_label_truth).sum())}
    p, t = pred[known], truth[known]
    if len(t) == 0:
        raise DataError("no sample has a known truth (node id > 0): nothing to score")
    # label level: an unknown prediction stands in as the root, whose LCA height to any truth is
    # height(root), the worst value (the FathomNet rule)
    d_lab = ranked_distances(tax, np.where(pred >= 0, pred, 0)[:, None], truth)[:, 0]
    has_lab = len(d_lab) > 0
    m["top1_error"] = as_float(np.mean(d_lab > 0)) if has_lab else None
    m["top5_error"] = None
    m["mistake_severity"] = as_float(severity_from(d_lab)) if has_lab else None
    m["hdist@1"] = as_float(d_lab.mean()) if has_lab else None
    m["hdist@5"] = m["ece"] = m["haurc"] = None
    ok = p >= 0
    p0 = np.where(ok, p, 0)
    lca = tax.lca(p0, t)
    worst = worst_distances(tax, distance_ranks)
    dp, dt, dc = tax.depth[p0], tax.depth[t], tax.depth[lca]
    correct = ok & (lca == p0)
    m["accuracy"] = as_float(correct.mean())
    m["exact_accuracy"] = as_float((ok & (p0 == t)).mean())
    if len(tax.leaves) > 1:
        m["coverage"] = as_float(np.where(ok, node_coverage(tax)[p0], 0.0).mean())
    m["mean_depth"] = as_float(np.where(ok, dp, 0).mean())
    if tax.has_ranks:
        rc = tax.rank_count(list(distance_ranks) if distance_ranks is not None else None)
        d_rank = np.where(ok, rc[p0] + rc[t] - 2 * rc[lca], worst["rank_steps"])
        m["mean_rank_distance"] = as_float(d_rank.mean())
    m["mean_path_distance"] = as_float(np.where(ok, dp + dt - 2 * dc, worst["path"]).mean())
    prf = prf_from_depths(np.where(ok, dc, 0), np.where(ok, dp, dt), dt)
    m.update({k: as_float(v) for k, v in prf.items()})
    for j, name in enumerate(levels.names):
        t_at = levels.view[t, j]
        p_at = np.where(ok, levels.view[p0, j], -1)
        inc = t_at >= 0
        m[f"{name}/n"] = int(inc.sum())
        m[f"{name}/n_excluded"] = int((~inc).sum())
        m[f"{name}/accuracy"] = as_float(np.mean(p_at[inc] == t_at[inc])) if inc.any() else None
        m[f"{name}/top1"] = m[f"{name}/accuracy"]
        m[f"{name}/top5"] = None
        m[f"{name}/answered"] = as_float(np.mean(p_at[inc] >= 0)) if inc.any() else None
    return m
