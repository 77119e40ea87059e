"""Threshold back-off ("climbing"): answer at the deepest node you are sure enough of.

Rule (Goren et al., NeurIPS 2024, "climbing"; iNaturalist's roll-up): start at
the most probable label and walk up its lineage; stop at the first node whose
summed probability (the mass of its subtree) reaches the node's threshold. The
root is always accepted, so every sample gets an answer.

* ``threshold=0.8`` (one number): every node has threshold 0.8; the answer is
  the deepest ancestor-or-self of the top label with mass >= 0.8.
* ``threshold={"species": 0.55, "genus": 0.60, ...}`` (per rank; for an
  unranked tree per depth level ``level1``, ``level2``, ...): a node uses the
  threshold of its own rank; a node **without a rank** uses that of its nearest
  ranked ancestor (:func:`~taxonomist.decide.base.threshold_levels`: FathomNet's
  Tunicata uses phylum's, Caridea order's, Acanthascinae family's), so every
  label can be answered. A rank missing from the mapping, or mapped to
  ``None``, takes ``default``; without one its nodes are walked past (never
  chosen). The FathomNet scaffold defaults are :data:`FATHOMNET_THRESHOLDS`.

Vectorised: the lineage of every top label is one row of the ancestor matrix
``[N, depth + 1]``; masses are gathered from the node probabilities and the
deepest accepted column is found with one ``argmax`` per row — no loop over
samples, and no dependence on the rest of the batch.

Note: for thresholds above 0.5 the nodes with mass >= t form a single chain
from the root, but the top label need not lie under its deepest node (mass
spread over many children); climbing then stops at a shallower common ancestor.
That is the published rule and what users of back-off expect ("roll up from the
top label").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from ..taxonomy import Taxonomy
from .base import Decision, check_label_probs, how_labels, level_names, path_masses, threshold_levels

#: the per-rank back-off thresholds of the FathomNet 2025 scaffold
FATHOMNET_THRESHOLDS: dict[str, float] = {"species": 0.55, "genus": 0.60, "family": 0.65, "order": 0.70,
                                          "class": 0.75, "phylum": 0.80, "kingdom": 0.85}

Threshold = float | Mapping[str, float | None]


def node_thresholds(tax: Taxonomy, threshold: Threshold, default: float | None = None) -> np.ndarray:
    """Threshold of every node (``inf`` = never stop there; the root gets ``-inf``: always accepted).

    Per rank: a node's level is its rank, or its nearest ranked ancestor's for
    an unranked node (:func:`threshold_levels`); a level missing from the
    mapping or mapped to ``None`` takes ``default`` (``inf`` when ``default`` is None).
    """
    if isinstance(threshold, Mapping):
        names = level_names(tax)
        unknown = [k for k in threshold if k not in names]
        if unknown:
            kind = "ranks" if tax.has_ranks else "levels (unranked tree: depths)"
            raise ConfigError(f"threshold keys {unknown} are not {kind} of this taxonomy; use some of {names}")
        fallback = np.inf if default is None else _check_tau(default, "default")
        per_level = np.array([fallback if threshold.get(r) is None else _check_tau(threshold[r], r)
                              for r in names] + [fallback])
        lv = threshold_levels(tax, names)
        thr = per_level[np.where(lv >= 0, lv, len(names))]
    else:
        thr = np.full(tax.n_nodes, _check_tau(threshold, "threshold"))
    thr = thr.astype(np.float64, copy=True)
    thr[0] = -np.inf
    return thr


def _check_tau(value: object, name: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"threshold {name!r} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0 + 1e-12:
        raise ConfigError(f"threshold {name!r} must be in [0, 1], got {v}")
    return v


def threshold_decision(tax: Taxonomy, label_probs: object, threshold: Threshold = 0.8,
                       default: float | None = None) -> Decision:
    """Climb from the top label to the first node whose mass reaches its threshold (see module doc)."""
    probs = check_label_probs(tax, label_probs)
    thr = node_thresholds(tax, threshold, default)
    n = len(probs)
    start = tax.label_ids[probs.argmax(axis=1)] if n else np.zeros(0, dtype=np.int64)
    anc, mass = path_masses(tax, probs, start)
    ok = (anc >= 0) & (mass >= thr[np.maximum(anc, 0)])
    # deepest accepted column (the root column is always accepted)
    depth = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1) if n else np.zeros(0, dtype=np.int64)
    rows = np.arange(n)
    node = anc[rows, depth]
    prob = mass[rows, depth]
    params = {"threshold": dict(threshold) if isinstance(threshold, Mapping) else float(threshold)}
    if default is not None:
        params["default"] = float(default)
    return Decision(node.astype(np.int64), prob, how_labels(tax, node, start), "threshold", params)
