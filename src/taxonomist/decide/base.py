"""The :class:`Decision` record and the array helpers every decision rule uses.

A decision rule maps each row of ``label_probs`` (``[N, n_labels]``, columns in
``taxonomy.label_ids`` order) to one node of the tree, at any depth. Every rule
here works row by row in the mathematical sense: a sample's decision never
depends on the other rows of its batch (the arrays are only chunked by rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from ..taxonomy import Taxonomy

SUM_TOLERANCE = 1e-3
CHUNK_ELEMS = 1 << 18


@dataclass(frozen=True)
class Decision:
    """One chosen node per sample.

    node: ``[N]`` node ids (any depth).
    prob: ``[N]`` summed probability of the chosen node's subtree.
    how: ``N`` strings saying how each node was chosen: ``"label"`` (the most
        probable label), ``"backoff_to_<rank>"`` / ``"backoff_to_depth_<d>"`` /
        ``"backoff_to_root"`` (threshold rule), ``"crm"``, ``"darts"``.
    method: the rule that produced it; ``params`` its options (JSON-ready).
    score: optional ``[N]`` value the rule optimised (CRM: expected distance;
        DARTS: ``(r + lambda) * p``).
    """

    node: np.ndarray
    prob: np.ndarray
    how: list[str]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.node)

    def names(self, tax: Taxonomy) -> list[str]:
        """Display names of the chosen nodes."""
        return [str(x) for x in tax.names[self.node]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready columns."""
        out: dict[str, Any] = {"method": self.method, "params": self.params, "node": self.node.tolist(),
                               "prob": [float(x) for x in self.prob], "how": list(self.how)}
        if self.score is not None:
            out["score"] = [float(x) for x in self.score]
        return out


def check_label_probs(tax: Taxonomy, label_probs: object, name: str = "label_probs") -> np.ndarray:
    """Validate ``[N, n_labels]`` probabilities (finite, non-negative, rows summing to 1); return float64."""
    arr = np.asarray(label_probs)
    if arr.ndim != 2 or arr.shape[1] != tax.n_labels:
        raise DataError(f"{name} has shape {arr.shape}; expected [n_samples, {tax.n_labels}]: one column per "
                        "label node of the taxonomy, in taxonomy.label_ids order")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if len(arr) == 0:
        return arr
    if not np.isfinite(arr).all():
        rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise DataError(f"{name}: {len(rows)} row(s) contain NaN or infinity (first rows: {rows[:5].tolist()})")
    if (arr < 0).any():
        rows = np.flatnonzero((arr < 0).any(axis=1))
        raise DataError(f"{name}: {len(rows)} row(s) have negative values (first rows: {rows[:5].tolist()}); "
                        "pass probabilities, not logits (apply a softmax first)")
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataError(f"{name}: {int(off.sum())} row(s) do not sum to 1 (row {i} sums to {sums[i]:.6g}); "
                        "each row must be a distribution over the label nodes (apply a softmax to logits)")
    return arr


def check_truth(tax: Taxonomy, truth: object, n: int) -> np.ndarray:
    """Validate truth node ids (``-1`` = unknown) for ``n`` samples."""
    arr = np.asarray(truth)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise DataError(f"truth must hold integer node ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.shape != (n,):
        raise DataError(f"truth has shape {arr.shape}; expected ({n},), one node id per sample")
    bad = (arr < -1) | (arr >= tax.n_nodes)
    if bad.any():
        raise DataError(f"truth: {int(bad.sum())} value(s) are not node ids of this taxonomy "
                        f"(valid: -1..{tax.n_nodes - 1}); first positions {np.flatnonzero(bad)[:5].tolist()}")
    return arr


def node_prob_chunks(tax: Taxonomy, label_probs: np.ndarray, chunk_elems: int = CHUNK_ELEMS,
                     ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(lo, hi, P)``: dense ``[hi - lo, n_nodes]`` subtree probabilities of a row chunk."""
    mc = sp.csc_matrix(tax.marginalization_matrix().astype(np.float64))
    rows = max(1, chunk_elems // max(tax.n_nodes, 1))
    for lo in range(0, len(label_probs), rows):
        hi = min(len(label_probs), lo + rows)
        # O(rows x nnz) sparse product; each value sums the same labels in the same order for any batch
        yield lo, hi, np.asarray(label_probs[lo:hi] @ mc)


def node_prob_chunks_t(tax: Taxonomy, label_probs: np.ndarray, chunk_elems: int = CHUNK_ELEMS,
                       ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Like :func:`node_prob_chunks` but yields ``P.T``: C-ordered ``[n_nodes, hi - lo]``."""
    mt = sp.csr_matrix(tax.marginalization_matrix().T.astype(np.float64))
    rows = max(1, chunk_elems // max(tax.n_nodes, 1))
    for lo in range(0, len(label_probs), rows):
        hi = min(len(label_probs), lo + rows)
        yield lo, hi, mt @ np.ascontiguousarray(label_probs[lo:hi].T)


def path_masses(tax: Taxonomy, label_probs: np.ndarray, start: np.ndarray,
                chunk_elems: int = CHUNK_ELEMS) -> tuple[np.ndarray, np.ndarray]:
    """``(A, mass)``, ``[N, max_depth + 1]``: ancestors of ``start`` by depth (-1 below) and their mass.

    Masses are made non-increasing with depth (running maximum from the start
    node up; a change at the level of float rounding only), so a threshold
    accepts a prefix of each path and walking up or scanning down agree.
    """
    anc = tax.ancestor_matrix(start)
    mass = np.full(anc.shape, -np.inf)
    for lo, hi, p in node_prob_chunks(tax, label_probs, chunk_elems):
        a = anc[lo:hi]
        mass[lo:hi] = np.where(a >= 0, np.take_along_axis(p, np.maximum(a, 0), axis=1), -np.inf)
    mass = np.maximum.accumulate(mass[:, ::-1], axis=1)[:, ::-1]
    mass[anc < 0] = -np.inf
    return anc, mass


def level_names(tax: Taxonomy) -> list[str]:
    """Names thresholds may be keyed by: the tree's ranks, or ``level<d>`` for an unranked tree."""
    return list(tax.rank_order) if tax.has_ranks else tax.level_names()


def node_levels(tax: Taxonomy, names: list[str] | None = None) -> np.ndarray:
    """Index into ``names`` (default :func:`level_names`) of each node's rank/level; -1 for none and the root."""
    names = level_names(tax) if names is None else names
    out = np.full(tax.n_nodes, -1, dtype=np.int64)
    if tax.has_ranks:
        ranks = tax.ranks.astype(str)
        for j, r in enumerate(names):
            out[ranks == r] = j
    else:
        lookup = {f"level{d}": d for d in range(1, tax.max_depth + 1)}
        for j, r in enumerate(names):
            out[tax.depth == lookup[r]] = j
    out[0] = -1
    return out


def threshold_levels(tax: Taxonomy, names: list[str] | None = None) -> np.ndarray:
    """Level (index into ``names``, default :func:`level_names`) whose threshold each node uses; -1 for the root.

    A node with a rank uses its rank. A node without one (FathomNet's Tunicata,
    Caridea, Acanthascinae: subphylum, infraorder, subfamily) uses the rank of
    its nearest ranked ancestor (the root's rank counts), being a subdivision of
    it; one with no ranked ancestor at all (under an unranked root) uses the
    first rank. So every node below the root has a level, each lineage's levels
    never decrease going down, and the nodes of one level form one contiguous
    run on every lineage. Unranked trees: the depth level, as :func:`node_levels`.
    """
    names = level_names(tax) if names is None else names
    if not tax.has_ranks:
        return node_levels(tax, names)
    ranks = tax.ranks.astype(str)
    own = np.full(tax.n_nodes, -1, dtype=np.int64)
    for j, r in enumerate(names):
        own[ranks == r] = j
    lv = own.copy()
    # propagate the nearest ranked ancestor's level down, one depth at a time (a loop over depths only)
    by_depth = np.argsort(tax.depth, kind="stable")
    bounds = np.searchsorted(tax.depth[by_depth], np.arange(tax.max_depth + 2))
    for d in range(1, tax.max_depth + 1):
        ids = by_depth[bounds[d]:bounds[d + 1]]
        lv[ids] = np.where(own[ids] >= 0, own[ids], lv[tax.parent[ids]])
    lv[lv < 0] = 0
    lv[0] = -1
    return lv


def how_labels(tax: Taxonomy, nodes: np.ndarray, start: np.ndarray) -> list[str]:
    """``"label"`` where the chosen node is the start label, else ``backoff_to_<rank>`` (the node's
    rank), ``backoff_to_root`` (an unranked root) or ``backoff_to_depth_<d>`` (an unranked node)."""
    table = np.empty(tax.n_nodes, dtype=object)
    for v in np.unique(nodes):
        rank = str(tax.ranks[v])
        table[v] = (f"backoff_to_{rank}" if rank else "backoff_to_root" if v == 0
                    else f"backoff_to_depth_{int(tax.depth[v])}")
    return np.where(nodes == start, "label", table[nodes]).tolist()
