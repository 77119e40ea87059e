"""The taxonomy: one rooted tree, stored as arrays.

Convention used everywhere in taxonomist
----------------------------------------
* Nodes are integers ``0 .. n_nodes-1``. Node ``0`` is the root.
* Ids are in *canonical breadth-first order*: by depth, then by parent id,
  then by name, then by external key. Parents therefore come before their
  children, the children of a node are one contiguous id range, and the same
  tree always gets the same ids (whatever file or row order it came from).
* ``parent[0] == -1``; every other node has ``0 <= parent[v] < v``.
* ``names`` are display names (not unique in real taxonomies), ``keys`` are
  the external identifiers the tree was loaded with (NCBI tax ids, lineage
  paths, ...), ``ranks`` are rank names or ``""`` for unranked nodes.
* *Label nodes* are the nodes a sample can be labelled with and a flat model
  predicts over. They may be internal nodes (a photo known only to genus).

All tree maths is vectorised over arrays of node ids: gathers through
``parent`` and a binary-lifting table, scatters per depth level; nothing loops
over nodes or pairs in Python.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Literal

import numpy as np
import scipy.sparse as sp

from .errors import AmbiguousNameError, TaxonomyError, UnknownNameError

DistanceMetric = Literal["path", "lca_height", "rank_steps"]
DISTANCE_METRICS: tuple[str, ...] = ("path", "lca_height", "rank_steps")

_ROOT_NAME = "root"


def _as_object_array(values: Iterable[object] | None, n: int, default: str) -> np.ndarray:
    out = np.empty(n, dtype=object)
    if values is None:
        out[:] = default
        return out
    vals = list(values)
    if len(vals) != n:
        raise TaxonomyError(f"expected {n} values, got {len(vals)}")
    out[:] = ["" if v is None else str(v) for v in vals]
    return out


def _pointer_jump_depth(parent: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """Depth of every node by pointer jumping (O(n log depth)); detects cycles.

    ``parent`` uses -1 for the root. Raises TaxonomyError naming the nodes of a
    cycle (nodes that never reach the root).
    """
    n = len(parent)
    root = int(np.flatnonzero(parent < 0)[0])
    jump = np.where(parent < 0, root, parent)
    dist = (parent >= 0).astype(np.int64)
    for _ in range(int(np.ceil(np.log2(max(n, 2)))) + 2):
        done = jump == root
        if done.all():
            break
        dist = np.where(done, dist, dist + dist[jump])
        jump = np.where(done, jump, jump[jump])
    bad = np.flatnonzero(jump != root)
    if len(bad):
        # walk one offending node until it repeats, to name the cycle
        start = int(bad[0])
        seen: list[int] = []
        v = start
        while v not in seen and len(seen) < 50:
            seen.append(v)
            v = int(parent[v])
        cycle = seen[seen.index(v):] if v in seen else seen
        shown = " -> ".join(where(i) for i in cycle[:8])
        raise TaxonomyError(
            f"the parent links contain a cycle ({len(bad)} node(s) never reach the root): {shown}"
            " -> ... Fix the parent of one of these rows so that every node leads to the root."
        )
    return dist


def canonical_order(parent: np.ndarray, names: np.ndarray, keys: np.ndarray,
                    where: Callable[[int], str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (order, depth): ``order[new_id] = input index`` in canonical BFS order.

    ``parent`` holds input indices (-1 for the single root).
    """
    where = where or (lambda i: f"node #{i} {names[i]!r}")
    n = len(parent)
    roots = np.flatnonzero(parent < 0)
    if len(roots) != 1:
        shown = ", ".join(where(int(i)) for i in roots[:5])
        raise TaxonomyError(
            f"a taxonomy needs exactly one root, found {len(roots)}"
            + (f": {shown}" if len(roots) else " (every node has a parent, so there is a cycle)")
        )
    if ((parent >= n) | (parent < -1)).any():
        i = int(np.flatnonzero((parent >= n) | (parent < -1))[0])
        raise TaxonomyError(f"{where(i)} points to a parent that does not exist")
    depth = _pointer_jump_depth(parent, where)
    # global sort ranks of names and keys so each level sorts with integer keys
    name_rank = np.unique(names.astype(str), return_inverse=True)[1]
    key_rank = np.unique(keys.astype(str), return_inverse=True)[1]
    new_id = np.full(n, -1, dtype=np.int64)
    by_depth = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[by_depth], np.arange(depth.max() + 2))
    order_parts = []
    next_id = 0
    for d in range(depth.max() + 1):
        members = by_depth[bounds[d]:bounds[d + 1]]
        if d == 0:
            sorted_members = members
        else:
            par_new = new_id[parent[members]]
            sorted_members = members[np.lexsort((key_rank[members], name_rank[members], par_new))]
        new_id[sorted_members] = np.arange(next_id, next_id + len(sorted_members))
        next_id += len(sorted_members)
        order_parts.append(sorted_members)
    order = np.concatenate(order_parts)
    return order, depth[order]


class Taxonomy:
    """An immutable rooted tree in canonical id order (see module docstring).

    Build one with an importer (:func:`taxonomist.taxonomy.load`) or with
    :meth:`from_parents`. All derived structures are computed lazily and cached.
    """

    def __init__(self, parent: np.ndarray, names: np.ndarray, ranks: np.ndarray,
                 keys: np.ndarray, is_label: np.ndarray, rank_order: Sequence[str] = (),
                 depth: np.ndarray | None = None, *, _trusted: bool = False) -> None:
        if not _trusted:
            raise TypeError("use Taxonomy.from_parents(...) or an importer to build a Taxonomy")
        self.parent = parent
        self.names = names
        self.ranks = ranks
        self.keys = keys
        self.is_label = is_label
        self.rank_order: tuple[str, ...] = tuple(rank_order)
        self.depth = depth if depth is not None else _pointer_jump_depth(parent, lambda i: f"node {i}")
        self.depth.setflags(write=False)
        for arr in (parent, names, ranks, keys, is_label):
            arr.setflags(write=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_parents(cls, parent: Sequence[int] | np.ndarray, names: Iterable[object],
                     ranks: Iterable[object] | None = None, keys: Iterable[object] | None = None,
                     labels: Iterable[bool] | np.ndarray | Literal["leaves"] = "leaves",
                     rank_order: Sequence[str] | None = None,
                     where: Callable[[int], str] | None = None,
                     check_rank_order: bool = True,
                     return_order: bool = False):
        """Build a canonical Taxonomy from nodes in any order.

        parent: input index of each node's parent, -1 for the root.
        labels: boolean mask over input nodes, or ``"leaves"``.
        rank_order: known ranks, root first. Defaults to the ranks present,
            ordered by their mean depth.
        where: turns an input index into a human description ("file.csv line 7")
            used in error messages.
        return_order: also return ``order`` with ``order[new_id] = input index``.
        """
        parent = np.asarray(parent, dtype=np.int64)
        n = len(parent)
        if n == 0:
            raise TaxonomyError("a taxonomy needs at least one node")
        names_a = _as_object_array(names, n, "")
        ranks_a = _as_object_array(ranks, n, "")
        keys_a = _as_object_array(keys, n, "") if keys is not None else names_a.copy()
        where = where or (lambda i: f"node {keys_a[i]!r} ({names_a[i]!r})")
        empty = np.flatnonzero(np.char.str_len(names_a.astype(str)) == 0) if n else np.array([])
        if len(empty):
            shown = ", ".join(where(int(i)) for i in empty[:5])
            raise TaxonomyError(f"{len(empty)} node(s) have an empty name: {shown}. Give every node a name.")
        uk, counts = np.unique(keys_a.astype(str), return_counts=True)
        if (counts > 1).any():
            dup = uk[counts > 1][:5]
            shown = "; ".join(
                f"{k!r} at " + ", ".join(where(int(i)) for i in np.flatnonzero(keys_a.astype(str) == k)[:3])
                for k in dup)
            raise TaxonomyError(f"duplicate node ids: {shown}. Every node needs a unique id.")
        order, depth = canonical_order(parent, names_a, keys_a, where)
        new_of_old = np.empty(n, dtype=np.int64)
        new_of_old[order] = np.arange(n)
        new_parent = np.where(parent[order] < 0, -1, new_of_old[np.maximum(parent[order], 0)])
        if isinstance(labels, str):
            if labels != "leaves":
                raise TaxonomyError(f"labels must be a boolean mask or 'leaves', got {labels!r}")
            has_child = np.zeros(n, dtype=bool)
            has_child[new_parent[new_parent >= 0]] = True
            is_label = ~has_child
        else:
            mask = np.asarray(labels, dtype=bool)
            if mask.shape != (n,):
                raise TaxonomyError(f"labels mask has shape {mask.shape}, expected ({n},)")
            is_label = mask[order]
        ranks_new = ranks_a[order]
        if rank_order is None:
            present = [r for r in np.unique(ranks_new.astype(str)) if r]
            mean_depth = {r: float(depth[ranks_new == r].mean()) for r in present}
            rank_order = sorted(present, key=lambda r: (mean_depth[r], r))
        tax = cls(new_parent, names_a[order], ranks_new, keys_a[order], is_label,
                  tuple(rank_order), depth=depth, _trusted=True)
        if check_rank_order and tax.rank_order:
            tax.check_rank_order(where=lambda v: where(int(order[v])))
        return (tax, order) if return_order else tax

    def replace(self, *, names: np.ndarray | None = None, ranks: np.ndarray | None = None,
                is_label: np.ndarray | None = None, rank_order: Sequence[str] | None = None) -> Taxonomy:
        """A copy with some per-node attributes replaced (same ids, same structure)."""
        return Taxonomy(self.parent, np.array(self.names if names is None else names, dtype=object),
                        np.array(self.ranks if ranks is None else ranks, dtype=object), self.keys.copy(),
                        np.array(self.is_label if is_label is None else is_label, dtype=bool),
                        self.rank_order if rank_order is None else rank_order,
                        depth=self.depth, _trusted=True)

    def with_labels(self, nodes: Iterable[int] | np.ndarray) -> Taxonomy:
        """The same tree with exactly ``nodes`` as label nodes."""
        mask = np.zeros(self.n_nodes, dtype=bool)
        mask[np.asarray(list(nodes) if not isinstance(nodes, np.ndarray) else nodes, dtype=np.int64)] = True
        return self.replace(is_label=mask)

    # ----------------------------------------------------------- basic shape
    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    def __len__(self) -> int:
        return self.n_nodes

    def __repr__(self) -> str:
        return (f"Taxonomy(n_nodes={self.n_nodes}, n_leaves={len(self.leaves)}, "
                f"n_labels={self.n_labels}, depth={self.max_depth}, ranks={list(self.rank_order)})")

    @cached_property
    def _level_slices(self) -> list[slice]:
        """Contiguous id range of each depth level (BFS order)."""
        b = np.searchsorted(self.depth, np.arange(self.max_depth + 2))
        return [slice(int(b[d]), int(b[d + 1])) for d in range(self.max_depth + 1)]

    @cached_property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @cached_property
    def n_children(self) -> np.ndarray:
        return np.bincount(self.parent[1:], minlength=self.n_nodes).astype(np.int64)

    @cached_property
    def child_start(self) -> np.ndarray:
        """First child id of every node (children are contiguous in BFS order)."""
        start = np.full(self.n_nodes, self.n_nodes, dtype=np.int64)
        # first occurrence of each parent value in parent[1:] (sorted ascending)
        p = self.parent[1:]
        first = np.searchsorted(p, np.arange(self.n_nodes), side="left") + 1
        has = self.n_children > 0
        start[has] = first[has]
        return start

    def children(self, v: int) -> np.ndarray:
        s = int(self.child_start[v])
        return np.arange(s, s + int(self.n_children[v]), dtype=np.int64)

    @cached_property
    def is_leaf(self) -> np.ndarray:
        return self.n_children == 0

    @cached_property
    def leaves(self) -> np.ndarray:
        return np.flatnonzero(self.is_leaf)

    @cached_property
    def internal_nodes(self) -> np.ndarray:
        return np.flatnonzero(~self.is_leaf)

    # ----------------------------------------------------------------- labels
    @cached_property
    def label_ids(self) -> np.ndarray:
        """Node id of each label, in id order; label index i <-> node label_ids[i]."""
        return np.flatnonzero(self.is_label)

    @property
    def n_labels(self) -> int:
        return len(self.label_ids)

    @cached_property
    def label_index(self) -> np.ndarray:
        """Label index of every node, -1 for nodes that are not labels."""
        idx = np.full(self.n_nodes, -1, dtype=np.int64)
        idx[self.label_ids] = np.arange(self.n_labels)
        return idx

    @cached_property
    def label_is_leaf(self) -> np.ndarray:
        return self.is_leaf[self.label_ids]

    @property
    def label_names(self) -> list[str]:
        return [str(x) for x in self.names[self.label_ids]]

    # ------------------------------------------------------------- ancestors
    @cached_property
    def _lift(self) -> np.ndarray:
        """Binary-lifting table: ``_lift[k, v]`` = ancestor 2**k steps above v (root stays root)."""
        k = max(1, int(np.ceil(np.log2(self.max_depth + 1))))
        table = np.empty((k, self.n_nodes), dtype=np.int32 if self.n_nodes < 2**31 else np.int64)
        table[0] = np.maximum(self.parent, 0)
        for i in range(1, k):
            table[i] = table[i - 1][table[i - 1]]
        return table

    def ancestor_at_depth(self, nodes: np.ndarray | Sequence[int] | int, d: int | np.ndarray) -> np.ndarray:
        """Ancestor-or-self of each node at depth ``d``; -1 where the node is shallower than ``d``."""
        nodes = np.asarray(nodes, dtype=np.int64)
        d = np.broadcast_to(np.asarray(d, dtype=np.int64), nodes.shape)
        steps = self.depth[nodes] - d
        out = self._lift_by(nodes, np.maximum(steps, 0))
        return np.where(steps < 0, -1, out)

    def _lift_by(self, nodes: np.ndarray, steps: np.ndarray) -> np.ndarray:
        cur = nodes.astype(np.int64, copy=True)
        for k in range(self._lift.shape[0]):
            bit = ((steps >> k) & 1).astype(bool)
            if bit.any():
                cur[bit] = self._lift[k][cur[bit]]
        return cur

    def ancestor_matrix(self, nodes: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """``A[i, d]`` = ancestor of ``nodes[i]`` at depth d (root at column 0), -1 below the node."""
        nodes = np.arange(self.n_nodes) if nodes is None else np.asarray(nodes, dtype=np.int64)
        out = np.full((len(nodes), self.max_depth + 1), -1, dtype=np.int64)
        cur = nodes.copy()
        dep = self.depth[nodes]
        rows = np.arange(len(nodes))
        out[rows, dep] = nodes
        alive = dep > 0
        while alive.any():
            cur = np.where(alive, self.parent[cur], cur)
            dep = dep - alive
            out[rows[alive], dep[alive]] = cur[alive]
            alive = dep > 0
        return out

    def ancestors(self, v: int, include_self: bool = True) -> list[int]:
        """Ancestors of one node, root first."""
        path = []
        cur = int(v)
        if not include_self:
            cur = int(self.parent[cur])
        while cur >= 0:
            path.append(cur)
            cur = int(self.parent[cur])
        return path[::-1]

    def lineage(self, v: int, sep: str | None = " > ", include_root: bool = False) -> str | list[str]:
        """Names from the root (excluded unless asked) down to ``v``."""
        ids = self.ancestors(v)
        if not include_root:
            ids = ids[1:]
        names = [str(self.names[i]) for i in ids]
        return names if sep is None else sep.join(names)

    def is_ancestor(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """True where ``a`` is ``b`` or an ancestor of ``b``."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        return self.ancestor_at_depth(b, self.depth[a]) == a

    def lca(self, a: np.ndarray | Sequence[int] | int, b: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Lowest common ancestor, vectorised (binary lifting)."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        a, b = np.broadcast_arrays(a, b)
        shape = a.shape
        a = a.ravel().copy()
        b = b.ravel().copy()
        swap = self.depth[a] < self.depth[b]
        a[swap], b[swap] = b[swap], a[swap].copy()
        a = self._lift_by(a, self.depth[a] - self.depth[b])
        for k in range(self._lift.shape[0] - 1, -1, -1):
            ua = self._lift[k][a]
            ub = self._lift[k][b]
            m = ua != ub
            a = np.where(m, ua, a)
            b = np.where(m, ub, b)
        out = np.where(a == b, a, self.parent[a])
        return out.reshape(shape)

    # ------------------------------------------------------------ subtrees
    @cached_property
    def height(self) -> np.ndarray:
        """Longest number of edges from each node down to a leaf (leaves: 0)."""
        h = np.zeros(self.n_nodes, dtype=np.int64)
        for sl in reversed(self._level_slices[1:]):
            np.maximum.at(h, self.parent[sl], h[sl] + 1)
        return h

    @cached_property
    def n_leaves_under(self) -> np.ndarray:
        """Number of leaves in each node's subtree (a leaf counts itself)."""
        c = self.is_leaf.astype(np.int64)
        for sl in reversed(self._level_slices[1:]):
            np.add.at(c, self.parent[sl], c[sl])
        return c

    def subtree_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of ``values`` (shape [..., n_nodes]) over each node's subtree, bottom-up scatter."""
        out = np.array(values, dtype=np.float64 if np.asarray(values).dtype.kind != "f" else None, copy=True)
        for sl in reversed(self._level_slices[1:]):
            np.add.at(out, (Ellipsis, self.parent[sl]), out[..., sl]) if out.ndim > 1 else \
                np.add.at(out, self.parent[sl], out[sl])
        return out

    # ----------------------------------------------------------------- ranks
    @cached_property
    def rank_index(self) -> np.ndarray:
        """Index of each node's rank in ``rank_order``; -1 for unranked nodes."""
        lookup = {r: i for i, r in enumerate(self.rank_order)}
        return np.array([lookup.get(r, -1) for r in self.ranks], dtype=np.int64)

    @property
    def has_ranks(self) -> bool:
        return bool(self.rank_order)

    def check_rank_order(self, where: Callable[[int], str] | None = None) -> None:
        """Raise if a ranked node sits at or above the rank of a ranked ancestor."""
        where = where or (lambda v: f"node {self.keys[v]!r}")
        ri = self.rank_index
        # nearest ranked strict ancestor's rank index, propagated down by level
        above = np.full(self.n_nodes, -1, dtype=np.int64)
        for sl in self._level_slices[1:]:
            p = self.parent[sl]
            above[sl] = np.where(ri[p] >= 0, ri[p], above[p])
        bad = np.flatnonzero((ri >= 0) & (above >= ri))
        if len(bad):
            lines = []
            for v in bad[:5]:
                lines.append(f"  {where(int(v))}: {self.names[v]!r} has rank {self.ranks[v]!r} but lies under "
                             f"a {self.rank_order[above[v]]!r} ({self.lineage(int(v))})")
            raise TaxonomyError(
                f"{len(bad)} node(s) are out of rank order (ranks root first: {', '.join(self.rank_order)}):\n"
                + "\n".join(lines)
                + "\nFix these rows, or pass the rank order that the file really uses.")

    def rank_view(self, ranks: Sequence[str] | None = None) -> np.ndarray:
        """``V[v, j]``: the ancestor-or-self of v whose rank is ``ranks[j]``; -1 if the lineage skips it.

        Without ranks (``ranks=None`` and an unranked tree) the levels are the depths
        1..max_depth and ``V[v, j]`` is the ancestor at depth j+1 (-1 below v).
        """
        if ranks is None and not self.has_ranks:
            return self.ancestor_matrix()[:, 1:]
        ranks = list(self.rank_order if ranks is None else ranks)
        unknown = [r for r in ranks if r not in self.rank_order]
        if unknown:
            raise TaxonomyError(f"unknown rank(s) {unknown}; this taxonomy has ranks {list(self.rank_order)}")
        col = np.full(self.n_nodes, -1, dtype=np.int64)
        for j, r in enumerate(ranks):
            col[self.ranks == r] = j
        view = np.full((self.n_nodes, len(ranks)), -1, dtype=np.int64)
        for sl in self._level_slices:
            if sl.start > 0:
                view[sl] = view[self.parent[sl]]
            ids = np.arange(sl.start, sl.stop)
            has = col[sl] >= 0
            view[ids[has], col[sl][has]] = ids[has]
        return view

    def level_names(self, ranks: Sequence[str] | None = None) -> list[str]:
        """Names of the levels that :meth:`rank_view` returns."""
        if ranks is None and not self.has_ranks:
            return [f"level{d}" for d in range(1, self.max_depth + 1)]
        return list(self.rank_order if ranks is None else ranks)

    def rank_count(self, ranks: Sequence[str] | None = None) -> np.ndarray:
        """Number of ancestors-or-self whose rank is in ``ranks`` (root excluded)."""
        ranks = list(self.rank_order if ranks is None else ranks)
        if not ranks:
            raise TaxonomyError("this taxonomy has no ranks: use the 'path' or 'lca_height' distance,"
                                " or load it with rank information")
        member = np.isin(self.ranks.astype(str), ranks).astype(np.int64)
        member[0] = 0
        count = member.copy()
        for sl in self._level_slices[1:]:
            count[sl] += count[self.parent[sl]]
        return count

    # ------------------------------------------------------------- distances
    def distance(self, a: np.ndarray | Sequence[int] | int, b: np.ndarray | Sequence[int] | int,
                 metric: DistanceMetric = "path", ranks: Sequence[str] | None = None) -> np.ndarray:
        """Tree distance between node arrays ``a`` and ``b`` (broadcast), vectorised.

        * ``path``: edges from a up to LCA(a, b) plus edges down to b.
        * ``lca_height``: height of LCA(a, b) above its deepest leaf ("ILSVRC distance");
          0 when a == b (so a correct prediction costs nothing even at an internal label).
        * ``rank_steps``: path distance counting only nodes whose rank is in ``ranks``
          (FathomNet 2025 score; default: every rank of the tree).
        """
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        lca = self.lca(a, b)
        return self._distance_from_lca(a, b, lca, metric, ranks)

    def _distance_from_lca(self, a, b, lca, metric, ranks):
        if metric == "path":
            return self.depth[a] + self.depth[b] - 2 * self.depth[lca]
        if metric == "lca_height":
            return np.where(a == b, 0, self.height[lca])
        if metric == "rank_steps":
            rc = self._rank_count_cached(tuple(ranks) if ranks is not None else None)
            return rc[a] + rc[b] - 2 * rc[lca]
        raise TaxonomyError(f"unknown distance metric {metric!r}; choose one of {', '.join(DISTANCE_METRICS)}")

    def _rank_count_cached(self, ranks: tuple[str, ...] | None) -> np.ndarray:
        cache = self.__dict__.setdefault("_rank_count_cache", {})
        if ranks not in cache:
            cache[ranks] = self.rank_count(ranks)
        return cache[ranks]

    def distance_matrix(self, nodes: np.ndarray | Sequence[int] | None = None, metric: DistanceMetric = "path",
                        ranks: Sequence[str] | None = None, chunk_elems: int = 20_000_000) -> np.ndarray:
        """Dense pairwise distances among ``nodes`` (default: the label nodes).

        Built level by level from the ancestor matrix (k x k comparisons per depth),
        in row chunks so memory stays ~chunk_elems; only call it for the subset you need.
        """
        nodes = self.label_ids if nodes is None else np.asarray(nodes, dtype=np.int64)
        k = len(nodes)
        anc = self.ancestor_matrix(nodes)
        valid_cols = anc.shape[1]
        dt = np.int16 if 2 * self.max_depth < 32000 else np.int32
        out = np.empty((k, k), dtype=dt)
        rows_per = max(1, chunk_elems // max(k, 1))
        for lo in range(0, k, rows_per):
            hi = min(k, lo + rows_per)
            blk = anc[lo:hi]
            shared = np.zeros((hi - lo, k), dtype=np.int16)
            for d in range(valid_cols):
                col_all = anc[:, d]
                eq = blk[:, d, None] == col_all[None, :]
                eq &= (col_all >= 0)[None, :]
                shared += eq
            lca_depth = shared.astype(np.int64) - 1
            lca = np.take_along_axis(blk, lca_depth, axis=1)
            a = np.broadcast_to(nodes[lo:hi, None], lca.shape)
            b = np.broadcast_to(nodes[None, :], lca.shape)
            out[lo:hi] = self._distance_from_lca(a, b, lca, metric, ranks)
        return out

    # ------------------------------------------------------- marginalisation
    def marginalization_matrix(self, labels: np.ndarray | Sequence[int] | None = None) -> sp.csr_matrix:
        """Sparse 0/1 matrix M [n_labels x n_nodes]: ``M[i, v] = 1`` if node v is label i or its ancestor.

        ``p_nodes = p_labels @ M`` turns probabilities over labels into the probability
        of every node (its subtree's mass) in one sparse product.
        """
        labels = self.label_ids if labels is None else np.asarray(labels, dtype=np.int64)
        rows, cols = [], []
        cur = labels.copy()
        idx = np.arange(len(labels))
        alive = np.ones(len(labels), dtype=bool)
        while alive.any():
            rows.append(idx[alive])
            cols.append(cur[alive])
            cur = np.where(alive, self.parent[cur], -1)
            alive = cur >= 0
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        return sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(labels), self.n_nodes))

    def node_probabilities(self, label_probs: np.ndarray) -> np.ndarray:
        """[batch, n_labels] label probabilities -> [batch, n_nodes] node probabilities."""
        m = self.marginalization_matrix()
        return np.asarray(sp.csr_matrix(m.T) @ np.asarray(label_probs, dtype=np.float64).T).T

    @cached_property
    def sibling_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(group_of_node, group_parent): nodes 1..N-1 grouped by parent for sibling softmaxes.

        ``group_of_node[v]`` is the index of v's sibling group (-1 for the root);
        ``group_parent[g]`` is the parent node of group g. Because children are
        contiguous, each group is also a contiguous id range starting at
        ``child_start[group_parent[g]]``.
        """
        group_parent = self.internal_nodes
        gid = np.full(self.n_nodes, -1, dtype=np.int64)
        pos = np.full(self.n_nodes, -1, dtype=np.int64)
        pos[group_parent] = np.arange(len(group_parent))
        gid[1:] = pos[self.parent[1:]]
        return gid, group_parent

    # ------------------------------------------------------------- names
    @cached_property
    def _name_index(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            index.setdefault(str(name), []).append(i)
        return index

    @cached_property
    def _key_index(self) -> dict[str, int]:
        return {str(k): i for i, k in enumerate(self.keys)}

    def find_all(self, name: str) -> list[int]:
        """Every node with this name (names are not unique in real taxonomies)."""
        return list(self._name_index.get(str(name), []))

    def find(self, name: str, rank: str | None = None, under: str | int | None = None) -> int:
        """The one node called ``name`` (optionally of ``rank``, or below ``under``).

        Accepts a node key too. Raises :class:`AmbiguousNameError` listing the candidate
        lineages when several nodes match, :class:`UnknownNameError` when none does.
        """
        name = str(name)
        cands = self.find_all(name)
        if rank is not None:
            cands = [c for c in cands if self.ranks[c] == rank]
        if under is not None:
            u = self.find(under) if isinstance(under, str) else int(under)
            cands = [c for c in cands if bool(self.is_ancestor(u, c))]
        if not cands and name in self._key_index and rank is None and under is None:
            return self._key_index[name]
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise UnknownNameError(name, self._suggest(name))
        raise AmbiguousNameError(name, [(c, self.lineage(c, include_root=False), str(self.ranks[c]),
                                         str(self.keys[c])) for c in cands])

    def _suggest(self, name: str, n: int = 3) -> list[str]:
        import difflib
        return difflib.get_close_matches(name, list(self._name_index.keys()), n=n)

    def find_many(self, names: Iterable[str]) -> np.ndarray:
        """Vectorised look-up of many names (each must be unambiguous)."""
        return np.array([self.find(n) for n in names], dtype=np.int64)

    # ----------------------------------------------------------- identity
    @cached_property
    def fingerprint(self) -> str:
        """Stable content hash: same tree (structure, names, ranks, labels) -> same string."""
        h = hashlib.sha256()
        h.update(b"taxonomist-taxonomy-v1\0")
        h.update(self.parent.astype("<i8").tobytes())
        for arr in (self.names, self.ranks):
            h.update("\x1f".join(str(x) for x in arr).encode("utf-8"))
            h.update(b"\0")
        h.update(np.packbits(self.is_label).tobytes())
        h.update("\x1f".join(self.rank_order).encode("utf-8"))
        return "sha256:" + h.hexdigest()[:20]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def summary(self) -> dict[str, object]:
        """Facts for `taxonomist taxonomy info`."""
        labels = self.label_ids
        return {
            "n_nodes": self.n_nodes,
            "n_leaves": int(len(self.leaves)),
            "n_internal": int(len(self.internal_nodes)),
            "n_labels": int(len(labels)),
            "n_internal_labels": int((~self.is_leaf[labels]).sum()),
            "depth_min_leaf": int(self.depth[self.leaves].min()),
            "depth_max": self.max_depth,
            "max_children": int(self.n_children.max()),
            "n_single_child": int((self.n_children == 1).sum()),
            "ranks": list(self.rank_order),
            "fingerprint": self.fingerprint,
        }
