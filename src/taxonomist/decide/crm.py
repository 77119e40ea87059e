"""CRM, conditional risk minimisation (Karthik et al., "No cost likelihood manipulation at test
time for making better mistakes in deep networks", ICLR 2021).

Choose the node ``c`` that minimises the expected distance to the (unknown) true
label, ``R(c) = sum_i p(label_i) * D(label_i, c)``, over *all* nodes of the
tree by default: any taxon is a legal answer to the FathomNet metric, so the
Bayes decision is the argmin over every node, not only over labels.

No distance matrix is built. With ``P(a)`` the subtree mass of node a,
``Z = sum_i p_i`` and ``a_0 = root, ..., a_k = c`` the lineage of c:

* ``path``: ``D = depth(l) + depth(c) - 2 depth(lca)`` and
  ``sum_i p_i depth(lca(l_i, c)) = sum_{j>=1} P(a_j)``, so
  ``R(c) = E[depth(l)] + Z depth(c) - 2 S(c)`` with ``S(c) = S(parent) + P(c)``.
* ``rank_steps`` (FathomNet 2025): the same, counting only nodes whose rank is
  in ``ranks``: ``S(c) = S(parent) + [rank(c) in ranks] P(c)``.
* ``lca_height`` (0 when c is the label itself): ``sum_i p_i h(lca) = T(c)`` with
  ``T(root) = h(root) P(root)``, ``T(c) = T(parent) + P(c) (h(c) - h(parent))``,
  so ``R(c) = T(c) - p(c) h(c)`` where ``p(c)`` is c's own label probability.

Each is two sparse products per row chunk: node masses ``P = X @ M`` and the
lineage sums ``S = P @ L`` with ``L[v, c] = w(v)`` for the nodes v on c's
lineage (``nnz(L)`` = sum of depths): ``O(N x n_nodes x depth)`` time and
``O(N x n_nodes)`` memory per chunk, whatever the number of labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError
from ..taxonomy import DISTANCE_METRICS, Taxonomy
from .base import CHUNK_ELEMS, Decision, check_label_probs, node_prob_chunks_t

Candidates = Literal["all", "labels"] | Sequence[int] | np.ndarray


def _candidates(tax: Taxonomy, candidates: Candidates) -> np.ndarray:
    if isinstance(candidates, str):
        if candidates == "all":
            return np.arange(tax.n_nodes)
        if candidates == "labels":
            return tax.label_ids.copy()
        raise ConfigError(f"candidates must be 'all', 'labels' or an array of node ids, got {candidates!r}")
    c = np.asarray(candidates, dtype=np.int64)
    if c.ndim != 1 or len(c) == 0 or (c < 0).any() or (c >= tax.n_nodes).any():
        raise ConfigError(f"candidates must be a non-empty 1-d array of node ids in 0..{tax.n_nodes - 1}")
    return c


def _weights(tax: Taxonomy, metric: str, ranks: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-node weight w (summed down each lineage, S = P @ L) and count c (depth or rank count)."""
    if metric == "path":
        w = np.ones(tax.n_nodes)
        w[0] = 0.0
        return w, tax.depth.astype(np.float64)
    if metric == "rank_steps":
        rc = tax.rank_count(ranks).astype(np.float64)
        w = np.isin(tax.ranks.astype(str), list(tax.rank_order if ranks is None else ranks)).astype(np.float64)
        w[0] = 0.0
        return w, rc
    raise ConfigError(f"unknown CRM metric {metric!r}; choose one of {', '.join(DISTANCE_METRICS)}")


def expected_distances(tax: Taxonomy, label_probs: object, metric: str = "path",
                       ranks: Sequence[str] | None = None, candidates: Candidates = "all",
                       chunk_elems: int = CHUNK_ELEMS) -> np.ndarray:
    """``R[n, j] = sum_i p_n(label_i) D(label_i, candidates[j])`` (see module doc), ``[N, n_candidates]``."""
    probs = check_label_probs(tax, label_probs)
    cand = _candidates(tax, candidates)
    out = np.empty((len(probs), len(cand)))
    for lo, hi, k, e, _ in _risk_chunks(tax, probs, metric, ranks, chunk_elems):
        out[lo:hi] = k[:, cand] + e[:, None]
    return out


def _lineage_matrix(tax: Taxonomy, w: np.ndarray) -> sp.csc_matrix:
    """Sparse ``L[v, c] = w[v]`` for every non-root node v on c's lineage (ancestor-or-self).

    ``P @ L`` sums ``w[v] P(v)`` down every lineage at once: ``nnz = sum of depths``.
    """
    anc = tax.ancestor_matrix()[:, 1:]
    cols = np.broadcast_to(np.arange(tax.n_nodes)[:, None], anc.shape)
    keep = anc >= 0
    keep[keep] = w[anc[keep]] != 0
    return sp.csc_matrix((w[anc[keep]], (anc[keep], cols[keep])), shape=(tax.n_nodes, tax.n_nodes))


def _risk_chunks(tax: Taxonomy, probs: np.ndarray, metric: str, ranks: Sequence[str] | None,
                 chunk_elems: int):
    """Yield ``(lo, hi, K, e, PT)`` per row chunk: expected distances ``R = K + e[:, None]`` to every
    node (``K`` C-ordered ``[rows, n_nodes]``; ``e`` is constant per row, so ``argmin R = argmin K``)
    and the node masses transposed, ``PT`` ``[n_nodes, rows]``.

    The sums run on ``[n_nodes, rows]`` arrays (the natural layout of the sparse
    products) and one transposed copy makes each row's argmin a contiguous scan.
    """
    if metric == "lca_height":
        h = tax.height.astype(np.float64)
        w = np.zeros(tax.n_nodes)
        w[1:] = h[1:] - h[tax.parent[1:]]
        lin_t = sp.csr_matrix(_lineage_matrix(tax, w).T)
        lab_h = h[tax.label_ids]
        for lo, hi, pt in node_prob_chunks_t(tax, probs, chunk_elems):
            rt = lin_t @ pt  # sum_{j>=1} P(a_j) (h(a_j) - h(a_{j-1}))
            rt += h[0] * pt[0][None, :]
            rt[tax.label_ids] -= probs[lo:hi].T * lab_h[:, None]
            yield lo, hi, np.ascontiguousarray(rt.T), np.zeros(hi - lo), pt
        return
    w, count = _weights(tax, metric, ranks)
    lin_t = sp.csr_matrix(_lineage_matrix(tax, w).T)
    lab_count = count[tax.label_ids]
    for lo, hi, pt in node_prob_chunks_t(tax, probs, chunk_elems):
        rt = lin_t @ pt  # S(c): weighted mass of c's lineage
        rt *= -2.0
        rt += np.multiply.outer(count, pt[0])
        yield lo, hi, np.ascontiguousarray(rt.T), probs[lo:hi] @ lab_count, pt


def crm_decision(tax: Taxonomy, label_probs: object, metric: str = "path", ranks: Sequence[str] | None = None,
                 candidates: Candidates = "all", chunk_elems: int = CHUNK_ELEMS) -> Decision:
    """Bayes decision for a tree distance: ``argmin_c sum_i p_i D(label_i, c)`` over ``candidates``.

    metric: ``path``, ``lca_height`` or ``rank_steps`` (counted over ``ranks``,
        default every rank of the tree). candidates: ``"all"`` nodes (default),
        ``"labels"`` only (Karthik et al.'s original setting) or an array of
        node ids. Ties go to the lowest node id (the shallowest candidate).
        ``score`` holds the minimal expected distance.
    """
    if metric not in DISTANCE_METRICS:
        raise ConfigError(f"unknown CRM metric {metric!r}; choose one of {', '.join(DISTANCE_METRICS)}")
    if metric == "rank_steps" and not tax.has_ranks:
        raise ConfigError("metric 'rank_steps' needs a taxonomy with ranks; use 'path' or 'lca_height'")
    probs = check_label_probs(tax, label_probs)
    cand = _candidates(tax, candidates)
    n = len(probs)
    node = np.empty(n, dtype=np.int64)
    prob = np.empty(n)
    score = np.empty(n)
    every = isinstance(candidates, str) and candidates == "all"
    for lo, hi, k, e, pt in _risk_chunks(tax, probs, metric, ranks, chunk_elems):
        kc = k if every else k[:, cand]
        j = kc.argmin(axis=1)
        rows = np.arange(hi - lo)
        node[lo:hi] = cand[j]
        score[lo:hi] = kc[rows, j] + e
        prob[lo:hi] = pt[cand[j], rows]
    params = {"metric": metric, "candidates": candidates if isinstance(candidates, str) else "custom"}
    if ranks is not None:
        params["ranks"] = list(ranks)
    return Decision(node, prob, ["crm"] * n, "crm", params, score)
