"""``compute_metrics``: every metric in one flat, JSON-ready dictionary (``metrics.json``).

Which samples each key uses (all counts are reported):

* ``n_samples``: all rows. ``n_unknown``: truth ``-1`` or the root, left out of
  every score. ``n_label_truth``: truth is a label node. ``n_partial_truth``:
  truth is a known node that is not a label (e.g. a photo known only to genus).
* *Label-level* keys (``top1_error``, ``top5_error``, ``top<k>_error``,
  ``mistake_severity``, ``hdist@1``, ``hdist@5``, ``hdist@<k>``, ``ece``)
  compare the ranked label predictions with the truth, so they use the
  ``n_label_truth`` samples only: a partial truth has no single correct label.
  They are reductions of :func:`~taxonomist.metrics.hierarchical.ranked_distances`,
  the table behind the public ``mistake_severity`` and
  ``hierarchical_distance_at_k``, so those give the same values.
* *Node-level* keys (``mean_path_distance``, ``mean_rank_distance``, ``hp`` ...
  ``hf_macro``, ``haurc``) accept a truth at any depth and use every known
  sample. The prediction is the top label unless stated otherwise.
* *Per-level* keys ``<level>/...`` use the known samples whose truth reaches
  that level (``<level>/n``); the others are ``<level>/n_excluded``.
* ``rank_violation_rate`` needs no truth and uses every sample.

The output contract (issue 5; other tools read these names): ``top1_error``,
``mistake_severity``, ``hdist@1``, ``hdist@5``, ``mean_path_distance``,
``mean_rank_distance`` (ranked trees), ``hp``, ``hr``, ``hf``, ``hp_macro``,
``hr_macro``, ``hf_macro``, ``ece``, ``haurc``, ``n_samples`` and
``<level>/top1`` are always present, whatever ``k`` (also ``top5_error`` and
``<level>/top5``).

Values are Python floats (ints for counts); an undefined value (no sample, no
mistake for ``mistake_severity``) is ``None``. See docs/metrics.md for each
definition and its source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from ..taxonomy import Taxonomy
from ._common import (
    as_float,
    check_label_probs,
    check_nodes,
    known_mask,
    resolve_levels,
    scan_nodes,
    topk_columns,
)
from .calibration import N_BINS, expected_calibration_error
from .flat import class_report, level_results, level_truths
from .hierarchical import path_violation_rate, prf_from_depths, ranked_distances, severity_from
from .selective import area_under_curve, curve_from_masses, node_coverage


#: the top-k that ``top<k>_error`` / ``hdist@<k>`` / ``<level>/top<k>`` always report, whatever ``k``
CONTRACT_K = 5


def _decision_nodes(tax: Taxonomy, decision: object, n: int, name: str) -> np.ndarray:
    nodes = getattr(decision, "node", decision)
    return check_nodes(tax, nodes, f"decisions[{name!r}]", n=n, allow_unknown=False)


def decision_metrics(tax: Taxonomy, pred: np.ndarray, truth: np.ndarray,
                     distance_ranks: Sequence[str] | None, lca: np.ndarray | None = None
                     ) -> dict[str, float | None]:
    """Node-level scores of one prediction per sample (truth at any depth; unknown truths left out).

    ``accuracy`` (hierarchically correct: ``lca(pred, truth) == pred``), ``coverage``,
    ``mean_path_distance``, ``mean_rank_distance`` (ranked trees), hP/hR/hF micro
    and macro; one LCA per sample serves them all (pass it as ``lca`` if known).
    """
    pred = check_nodes(tax, pred, "predictions", allow_unknown=False)
    truth = check_nodes(tax, truth, "truth", n=len(pred))
    keep = known_mask(truth)
    p, t = pred[keep], truth[keep]
    c = tax.lca(p, t) if lca is None else lca[keep]
    out: dict[str, float | None] = {}
    if len(p) == 0:
        out["accuracy"] = out["coverage"] = out["mean_path_distance"] = None
        if tax.has_ranks:
            out["mean_rank_distance"] = None
        out.update(dict.fromkeys(("hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro")))
        return out
    dp, dt, dc = tax.depth[p], tax.depth[t], tax.depth[c]
    out["accuracy"] = as_float(np.mean(c == p))
    out["coverage"] = as_float(node_coverage(tax)[p].mean()) if len(tax.leaves) > 1 else None
    out["mean_path_distance"] = as_float(np.mean(dp + dt - 2 * dc))
    if tax.has_ranks:
        rc = tax.rank_count(list(distance_ranks) if distance_ranks is not None else None)
        out["mean_rank_distance"] = as_float(np.mean(rc[p] + rc[t] - 2 * rc[c]))
    out.update({k: as_float(v) for k, v in prf_from_depths(dc, dp, dt).items()})
    return out


def compute_metrics(tax: Taxonomy, label_probs: object, truth: object, ranks: Sequence[str] | None = None,
                    k: int = 5, distance_ranks: Sequence[str] | None = None,
                    decisions: object | Mapping[str, object] | None = None,
                    n_bins: int = N_BINS) -> dict[str, Any]:
    """All metrics of ``label_probs`` ([N, n_labels]) against ``truth`` (node ids, any depth; -1 unknown).

    ranks: levels for the per-level keys (rank names; for an unranked tree
        ``level1``, ``level2`` ...); default: every rank (or depth level).
    k: an extra top-k reported (``top<k>_error``, ``hdist@<k>``, ``<level>/top<k>``) besides
        top-1 and top-5, which are always reported (contract keys).
    distance_ranks: ranks counted by ``mean_rank_distance`` (FathomNet 2025);
        default ``ranks``, else every rank of the tree. Ranked trees only.
    decisions: extra predictions to score, as ``{name: Decision or node-id array}``
        (a single ``Decision`` is named after its ``method``); each adds
        ``<name>/accuracy``, ``<name>/coverage``, ``<name>/mean_path_distance``,
        ``<name>/mean_rank_distance``, ``<name>/hp`` ... ``<name>/hf_macro``.
    """
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    probs = check_label_probs(tax, label_probs)
    truth = check_nodes(tax, truth, "truth", n=len(probs))
    levels = resolve_levels(tax, ranks)
    if distance_ranks is None and tax.has_ranks:
        distance_ranks = list(ranks) if ranks is not None else list(tax.rank_order)
    n = len(probs)
    known = known_mask(truth)
    is_label_truth = known & tax.is_label[np.maximum(truth, 0)]
    m: dict[str, Any] = {
        "n_samples": int(n), "n_unknown": int((~known).sum()), "n_label_truth": int(is_label_truth.sum()),
        "n_partial_truth": int((known & ~is_label_truth).sum()),
    }

    # label level: ranked labels against label truths. top-1 and top-5 always (contract keys), plus top-k
    ks = sorted({1, CONTRACT_K, int(k)})
    kmax = min(ks[-1], tax.n_labels)
    ranked_idx = topk_columns(probs, kmax) if n else np.zeros((0, kmax), dtype=np.int64)
    top_idx = ranked_idx[:, 0]  # = argmax (the first maximum)
    top = tax.label_ids[top_idx]
    ranked = tax.label_ids[ranked_idx]
    inc = is_label_truth
    hit = ranked[inc] == truth[inc][:, None]  # the truth's place among the best labels (stable order)
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), kmax)
    # d_h of every ranked label to its label truth: the same table mistake_severity and
    # hierarchical_distance_at_k reduce (one implementation, metrics.hierarchical.ranked_distances)
    d_h = ranked_distances(tax, ranked, truth)
    cum = np.cumsum(d_h, axis=1) if d_h.size else d_h
    for kk in ks:
        c = min(kk, kmax)
        m[f"top{kk}_error"] = as_float(np.mean(first_hit >= c)) if inc.any() else None
        m[f"hdist@{kk}"] = as_float(float(cum[:, c - 1].sum()) / (len(cum) * c)) if inc.any() else None
    m["mistake_severity"] = as_float(severity_from(d_h[:, 0])) if inc.any() else None
    conf = probs[np.arange(n), top_idx] if n else np.zeros(0)
    m["ece"] = as_float(expected_calibration_error(conf[inc], (top == truth)[inc], n_bins))
    lca_top = np.where(known, tax.lca(top, np.maximum(truth, 0)), 0)

    # node level: top label against truths at any depth
    node_scores = decision_metrics(tax, top, truth, distance_ranks, lca=lca_top)
    for key in ("mean_path_distance", "mean_rank_distance", "hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro"):
        if key in node_scores:
            m[key] = node_scores[key]

    # per level, and the top labels' lineages for the risk-coverage curve: one pass over node probabilities
    nodes, truths, tcols = level_truths(tax, truth, levels)
    scans, (anc, mass) = scan_nodes(tax, probs, nodes, tcols, start=top)
    if len(tax.leaves) > 1:
        m["haurc"] = as_float(area_under_curve(curve_from_masses(tax, anc[known], mass[known], truth[known],
                                                                    every_threshold=False)))
    else:
        m["haurc"] = None
    lps = level_results(levels, nodes, truths, scans)
    for lp in lps:
        included = lp.included
        name = lp.name
        m[f"{name}/n"] = int(included.sum())
        m[f"{name}/n_excluded"] = int((known & ~included).sum())
        for kk in ks:
            m[f"{name}/top{kk}"] = as_float(lp.topk_accuracy(kk))
        rep = class_report(tax, lp)
        m[f"{name}/balanced_accuracy"] = as_float(rep.balanced_accuracy())
        m[f"{name}/macro_f1"] = as_float(rep.macro_f1())
        m[f"{name}/ece"] = as_float(expected_calibration_error(
            lp.confidence[included], (lp.pred == lp.truth)[included], n_bins))
    usable = [lp.pred for lp in lps if len(lp.nodes)]
    m["rank_violation_rate"] = as_float(path_violation_rate(tax, np.stack(usable, axis=1))) \
        if len(usable) >= 2 and n else None

    # extra decisions
    if decisions is not None:
        named = decisions if isinstance(decisions, Mapping) else {str(getattr(decisions, "method", "decision")):
                                                                  decisions}
        for name, dec in named.items():
            if name in levels.names:
                raise DataError(f"decision name {name!r} clashes with a level name; rename it")
            pred = _decision_nodes(tax, dec, n, name)
            for key, v in decision_metrics(tax, pred, truth, distance_ranks).items():
                m[f"{name}/{key}"] = v
    return m
