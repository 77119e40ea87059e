"""Input checks and array helpers shared by the metric modules.

Everything here works on whole arrays: probability matrices are turned into
node probabilities with the taxonomy's sparse marginalisation matrix in row
chunks (so memory stays bounded for 10^4-label trees), and "levels" (ranks, or
depths for unranked trees) are columns of :meth:`Taxonomy.rank_view`.

Conventions used by every metric
--------------------------------
* ``truth`` holds node ids at any depth. ``-1`` means *unknown* and the root
  (``0``) carries no information either: both are left out of every score and
  counted as ``n_unknown``.
* A prediction/truth pair is *hierarchically correct* when the predicted node is
  the true node or one of its ancestors (Goren et al., NeurIPS 2024).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from ..taxonomy import Taxonomy, TaxonomyError

#: rows of probabilities must sum to 1 within this tolerance
SUM_TOLERANCE = 1e-3
#: upper bound on the number of float64 cells held by one chunk of node probabilities
CHUNK_ELEMS = 1 << 20


def check_label_probs(tax: Taxonomy, label_probs: object, name: str = "label_probs") -> np.ndarray:
    """Validate a ``[N, n_labels]`` probability matrix and return it as float64.

    Columns follow ``tax.label_ids``; every row must be a distribution
    (non-negative, finite, summing to 1 within :data:`SUM_TOLERANCE`).
    """
    arr = np.asarray(label_probs)
    if arr.ndim != 2 or arr.shape[1] != tax.n_labels:
        raise DataError(
            f"{name} has shape {arr.shape}; expected [n_samples, {tax.n_labels}]: one column per label "
            "node of the taxonomy, in taxonomy.label_ids order")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if len(arr) == 0:
        return arr
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{name}: {len(rows)} row(s) contain NaN or infinity (first rows: {rows[:5].tolist()})")
    if (arr < 0).any():
        rows = np.flatnonzero((arr < 0).any(axis=1))
        raise DataError(f"{name}: {len(rows)} row(s) have negative probabilities (first rows: {rows[:5].tolist()});"
                        " pass probabilities, not logits (apply a softmax first)")
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataError(f"{name}: {int(off.sum())} row(s) do not sum to 1 (row {i} sums to {sums[i]:.6g}); "
                        "each row must be a distribution over the label nodes (apply a softmax to logits)")
    return arr


def check_nodes(tax: Taxonomy, nodes: object, name: str, n: int | None = None, allow_unknown: bool = True,
                ndim: int = 1) -> np.ndarray:
    """Validate an array of node ids (``-1`` allowed for unknown when ``allow_unknown``)."""
    arr = np.asarray(nodes)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{name} must hold integer node ids (got dtype {arr.dtype}); map names to ids with "
                            "taxonomy.find() / find_many() first")
    arr = arr.astype(np.int64, copy=False)
    if arr.ndim != ndim:
        raise DataError(f"{name} must be a {ndim}-d array of node ids, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise DataError(f"{name} has {len(arr)} entries but there are {n} samples")
    lo = -1 if allow_unknown else 0
    bad = (arr < lo) | (arr >= tax.n_nodes)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise DataError(f"{name}: {int(bad.sum())} value(s) are not node ids of this taxonomy "
                        f"(valid: {lo}..{tax.n_nodes - 1}); first positions {where}")
    return arr


def known_mask(truth: np.ndarray) -> np.ndarray:
    """Samples with an informative truth: a node id other than ``-1`` (unknown) and ``0`` (the root)."""
    return truth > 0


def marginalizer(tax: Taxonomy, columns: np.ndarray | None = None):
    """A function ``X -> X @ M[:, columns]`` for row blocks ``X`` of label probabilities.

    ``M`` is the taxonomy's sparse 0/1 marginalisation matrix (label -> its
    ancestors-or-self), so the result holds subtree probabilities; the product
    costs ``O(rows x nnz(M))`` and never builds a dense ``[labels, nodes]`` array.
    Each output value is a sum over the same labels in the same order whatever
    the block, so results do not depend on how rows are batched.
    """
    m = tax.marginalization_matrix()
    if columns is not None:
        m = m[:, np.asarray(columns, dtype=np.int64)]
    mc = sp.csc_matrix(m.astype(np.float64))
    return lambda x: np.asarray(x @ mc)


def node_prob_chunks(tax: Taxonomy, label_probs: np.ndarray, columns: np.ndarray | None = None,
                     chunk_elems: int = CHUNK_ELEMS) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(lo, hi, P)`` with ``P = label_probs[lo:hi] @ M[:, columns]`` (dense float64).

    ``M`` is the taxonomy's marginalisation matrix, so ``P[i, j]`` is the summed
    probability of the subtree of node ``columns[j]`` (all nodes by default).
    """
    op = marginalizer(tax, columns)
    width = tax.n_nodes if columns is None else max(len(columns), 1)
    n = len(label_probs)
    rows = max(1, chunk_elems // width)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        yield lo, hi, op(label_probs[lo:hi])


@dataclass(frozen=True)
class LevelScan:
    """Per-sample argmax node, its probability and the truth's rank position at one level."""

    pred: np.ndarray
    confidence: np.ndarray
    position: np.ndarray


def ancestor_rows(tax: Taxonomy, nodes: np.ndarray) -> np.ndarray:
    """``tax.ancestor_matrix(nodes)``; when there are more nodes than tree nodes, rows gathered from
    the whole tree's matrix (one small table, then one gather) instead of a walk up per node."""
    if tax.n_nodes <= len(nodes):
        return tax.ancestor_matrix()[np.asarray(nodes, dtype=np.int64)]
    return tax.ancestor_matrix(nodes)


#: cells (nodes x rows) of one chunk of :func:`scan_nodes`: small enough to stay in cache between its passes
SCAN_CHUNK_ELEMS = 1 << 18


def scan_nodes(tax: Taxonomy, label_probs: np.ndarray, level_nodes: Sequence[np.ndarray] = (),
               level_truth_cols: Sequence[np.ndarray] = (), start: np.ndarray | None = None,
               chunk_elems: int = SCAN_CHUNK_ELEMS
               ) -> tuple[list[LevelScan], tuple[np.ndarray, np.ndarray] | None]:
    """One pass over row chunks computing every node probability once, then reading from it:

    * for each level (its node ids, and the column of each sample's truth among
      them, -1 if none): argmax node (ties: the first of ``nodes``), confidence
      and truth position (:func:`stable_position`);
    * if ``start`` is given, :func:`path_masses` of those start nodes.

    Layout: the marginalisation matrix is transposed and its rows ordered level
    by level, so one sparse product per chunk, ``P^T = M^T[order] @ X^T``, puts
    each level's node probabilities in a contiguous ``[n_level, rows]`` block,
    with no gather. The argmax runs down the block's rows with whole-row
    operations (a max, an equality and a max of reversed indices), each a
    vectorised pass over the samples. Every value is the same sum over the same
    labels in the same order as :meth:`Taxonomy.node_probabilities` (bitwise).
    """
    n = len(label_probs)
    level_nodes = [np.asarray(v, dtype=np.int64) for v in level_nodes]
    scans = [LevelScan(np.full(n, -1, dtype=np.int64), np.full(n, np.nan), np.full(n, -1, dtype=np.int64))
             for _ in level_nodes]
    anc = mass = None
    if start is not None:
        anc = ancestor_rows(tax, start)
        mass = np.full(anc.shape, -np.inf)
    if n and (start is not None or any(len(v) for v in level_nodes)):
        in_levels = np.concatenate(level_nodes) if level_nodes else np.zeros(0, dtype=np.int64)
        order = in_levels
        if start is not None:
            rest = np.ones(tax.n_nodes, dtype=bool)
            rest[in_levels] = False
            order = np.r_[in_levels, np.flatnonzero(rest)]
        row_of = np.zeros(tax.n_nodes, dtype=np.int64)
        row_of[order] = np.arange(len(order))
        mt = sp.csr_matrix(tax.marginalization_matrix().T.astype(np.float64))[order]
        bounds = np.r_[0, np.cumsum([len(v) for v in level_nodes])].astype(np.int64)
        # argmax by "max, then the first row equal to it": rows weighted k, k-1, ..., 1, the largest weight wins
        weights = [(len(v) - np.arange(len(v))).astype(_weight_dtype(len(v)))[:, None] for v in level_nodes]
        anc_rows = row_of[np.maximum(anc, 0)] if anc is not None else None
        rows_per = max(1, chunk_elems // max(len(order), 1))
        for lo in range(0, n, rows_per):
            hi = min(n, lo + rows_per)
            pt = mt @ np.ascontiguousarray(label_probs[lo:hi].T)  # [len(order), rows]
            cols = np.arange(hi - lo)
            for j, (nodes, tcol, sc) in enumerate(zip(level_nodes, level_truth_cols, scans)):
                k = len(nodes)
                if k == 0:
                    continue
                block = pt[bounds[j]:bounds[j + 1]]
                best_p = block.max(axis=0)
                if k == 1:
                    best = np.zeros(hi - lo, dtype=np.int64)
                else:
                    best = k - ((block == best_p) * weights[j]).max(axis=0).astype(np.int64)
                sc.pred[lo:hi] = nodes[best]
                sc.confidence[lo:hi] = best_p
                sc.position[lo:hi] = _stable_position_t(block, tcol[lo:hi], cols)
            if start is not None:
                a = anc[lo:hi]
                got = pt[anc_rows[lo:hi], cols[:, None]]
                mass[lo:hi] = np.where(a >= 0, got, -np.inf)
    if start is None:
        return scans, None
    mass = np.maximum.accumulate(mass[:, ::-1], axis=1)[:, ::-1]
    mass[anc < 0] = -np.inf
    return scans, (anc, mass)


def _weight_dtype(k: int) -> type:
    return np.uint8 if k < 1 << 8 else np.uint16 if k < 1 << 16 else np.int64


def _stable_position_t(block: np.ndarray, col: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """:func:`stable_position` on a transposed ``[k, rows]`` block (``col`` indexes its rows)."""
    ok = col >= 0
    c = np.maximum(col, 0)
    s = block[c, cols]
    dt = _weight_dtype(len(block) + 1)
    # counts down the rows: a sum of the 0/1 bytes in the smallest integer type that holds k
    pos = (block > s).view(np.uint8).sum(axis=0, dtype=dt).astype(np.int64)
    eq = block == s
    tied = np.flatnonzero(eq.view(np.uint8).sum(axis=0, dtype=dt) > 1)  # the truth's row ties with itself
    if len(tied):
        pos[tied] += np.count_nonzero(eq[:, tied] & (np.arange(len(block))[:, None] < c[tied]), axis=0)
    return np.where(ok, pos, -1)


def path_masses(tax: Taxonomy, label_probs: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ancestors of ``start`` by depth and their summed probabilities.

    Returns ``(A, mass)``, both ``[N, max_depth + 1]``: ``A[i, d]`` is the
    ancestor of ``start[i]`` at depth ``d`` (``-1`` below it) and ``mass[i, d]`` its
    subtree probability (``-inf`` below it). Masses are made non-increasing with
    depth by a running maximum from the start node upwards, which only changes
    values at the level of float rounding (a parent's sum of more non-negative
    terms can round below its child's), so thresholds act monotonically.
    """
    return scan_nodes(tax, label_probs, start=start)[1]  # type: ignore[return-value]


def stable_position(scores: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Position of column ``col[i]`` in row i when sorted by descending score, ties by column index.

    This is the order of ``np.argsort(-scores, kind="stable")``, so position 0 is
    ``argmax`` and "in the top k" means position < k. ``col = -1`` gives ``-1``.
    """
    n, w = scores.shape
    ok = col >= 0
    c = np.maximum(col, 0)
    s = scores[np.arange(n), c][:, None]
    pos = np.count_nonzero(scores > s, axis=1)
    eq = scores == s
    tied = np.flatnonzero(np.count_nonzero(eq, axis=1) > 1)  # the column itself always ties with itself
    if len(tied):
        pos[tied] += (eq[tied] & (np.arange(w)[None, :] < c[tied, None])).sum(axis=1)
    return np.where(ok, pos, -1)


def topk_columns(scores: np.ndarray, k: int, chunk_elems: int = CHUNK_ELEMS) -> np.ndarray:
    """``[N, k]`` column indices of the k highest scores per row, best first, ties by lower column.

    Same result as ``np.argsort(-scores, kind="stable")[:, :k]`` in ``O(N x width)``.
    Small k: k rounds of ``argmax`` (which returns the first maximum) on a copy,
    knocking each winner out. Larger k: a partition finds the k-th value, the
    columns above it and the first tied columns (by index) fill the k places,
    and only those k are sorted.
    """
    n, w = scores.shape
    k = min(k, w)
    out = np.empty((n, k), dtype=np.int64)
    if n == 0 or k == 0:
        return out
    rows = max(1, chunk_elems // max(w, 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        s = scores[lo:hi]
        if k <= 8:
            s = s.astype(np.float64, copy=True)
            r = np.arange(hi - lo)
            for j in range(k):
                best = s.argmax(axis=1)
                out[lo:hi, j] = best
                s[r, best] = -np.inf
            continue
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
        gt = s > kth[:, None]
        eq = s == kth[:, None]
        need = k - gt.sum(axis=1)
        sel = gt | (eq & (np.cumsum(eq, axis=1) <= need[:, None]))
        cols = np.nonzero(sel)[1].reshape(hi - lo, k)  # ascending column order within each row
        vals = np.take_along_axis(s, cols, axis=1)
        out[lo:hi] = np.take_along_axis(cols, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    return out


@dataclass(frozen=True)
class Levels:
    """The levels metrics are reported for: ranks of a ranked tree, depths of an unranked one.

    ``view[v, j]`` is the ancestor-or-self of node v at level j (-1 if the lineage
    skips that level or stops above it), as :meth:`Taxonomy.rank_view`.
    """

    names: tuple[str, ...]
    view: np.ndarray

    def nodes(self, j: int) -> np.ndarray:
        """Node ids that sit at level j."""
        col = self.view[:, j]
        return np.flatnonzero(col == np.arange(len(col)))


def resolve_levels(tax: Taxonomy, ranks: Sequence[str] | None = None) -> Levels:
    """Levels for ``ranks`` (rank names, or ``level<d>`` names of an unranked tree; default: all)."""
    if isinstance(ranks, str):
        ranks = [ranks]
    if tax.has_ranks:
        names = list(tax.rank_order if ranks is None else ranks)
        try:
            view = tax.rank_view(names)
        except TaxonomyError as exc:
            raise DataError(f"{exc}. Pass ranks from this list (or None for all of them).") from exc
        return Levels(tuple(names), view)
    all_names = tax.level_names()
    view = tax.rank_view()
    if ranks is None:
        return Levels(tuple(all_names), view)
    unknown = [r for r in ranks if r not in all_names]
    if unknown:
        raise DataError(f"unknown level(s) {unknown}: this taxonomy has no ranks, its levels are the depths "
                        f"{all_names}")
    cols = [all_names.index(r) for r in ranks]
    return Levels(tuple(ranks), view[:, cols])


def as_float(x: float | np.floating | None) -> float | None:
    """A plain Python float for JSON, ``None`` for NaN/undefined."""
    if x is None:
        return None
    v = float(x)
    return None if not np.isfinite(v) else v
