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
  paths, ...), ``ranks`` are rank names or ``""`` for unranked nodes. Ranks
  that are not listed in ``rank_order`` count as unranked in rank maths.
* *Label nodes* are the nodes a sample can be labelled with and a flat model
  predicts over. They may be internal nodes (a photo known only to genus).

All tree maths is vectorised over arrays of node ids: gathers through
``parent`` and a binary-lifting table (Bender & Farach-Colton, "The LCA problem
revisited", LATIN 2000), and reductions per depth level (the children of one
level are sorted by parent, so ``ufunc.reduceat`` aggregates each sibling run);
nothing loops over nodes or pairs in Python. The only loops run over depth
levels (at most the tree height), over bits of the depth (binary lifting) or
over row blocks of a dense output.
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


# --------------------------------------------------------------- input helpers
def _is_missing(value: object) -> bool:
    """None, float NaN and pandas' NA count as missing text."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _to_str_array(values: Iterable[object] | None, n: int, default: str, what: str = "values") -> np.ndarray:
    """Object array of ``n`` Python strings; None/NaN/NA become ``""``.

    Fast paths for millions of values: the set of element types is collected in C;
    all-``str`` input is used as is, other input without floats/None/NA is passed
    through ``map(str, ...)``; only mixed input is scanned for missing markers.
    """
    out = np.empty(n, dtype=object)
    if values is None:
        out[:] = default
        return out
    if isinstance(values, np.ndarray) and values.dtype == object and values.shape == (n,):
        if set(map(type, values)) <= {str}:      # already clean (e.g. a transform's subset)
            return values.copy()
    vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(vals) != n:
        raise TaxonomyError(f"expected {n} {what} (one per node), got {len(vals)}")
    types = set(map(type, vals))
    if types <= {str}:
        out[:] = vals
        return out
    out[:] = list(map(str, vals))
    if types & {float, type(None)} or any(t.__name__ in ("NAType", "NaTType") for t in types):
        missing = np.fromiter(map(_is_missing, vals), dtype=bool, count=n)
        out[missing] = ""
    return out


def _dense_rank(values: np.ndarray) -> np.ndarray:
    """Dense lexicographic rank (by Unicode code point) of each string; equal strings share a rank.

    Uses Python's C-level timsort on the strings (about 3x faster than
    ``np.argsort`` on an object array and no fixed-width ``<U`` copy, which for
    the 2.6 M NCBI names would take 1.6 GB).
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lst = values.tolist()
    order = np.array(sorted(range(n), key=lst.__getitem__), dtype=np.int64)
    s = values[order]
    new = np.empty(n, dtype=np.int64)
    new[0] = 0
    new[1:] = s[1:] != s[:-1]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.cumsum(new)
    return rank


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(codes, sorted uniques) of a low-cardinality string array, with C-level hashing."""
    lst = values.tolist()
    uniques = sorted(set(lst))
    lookup = {u: i for i, u in enumerate(uniques)}
    codes = np.fromiter(map(lookup.__getitem__, lst), dtype=np.int64, count=len(lst))
    return codes, uniques


def _pointer_jump_depth(parent: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """Depth of every node by pointer jumping (Wyllie 1979; O(n log depth)); detects cycles.

    ``parent`` uses -1 for the single root. Every round doubles the distance a
    node's pointer covers, so ``ceil(log2 n)`` rounds reach the root from any node.
    Nodes that still have not reached it afterwards sit on or under a cycle:
    raises TaxonomyError naming the nodes of one cycle.
    """
    n = len(parent)
    root = int(np.flatnonzero(parent < 0)[0])
    jump = np.where(parent < 0, root, parent)
    dist = (parent >= 0).astype(np.int64)
    for _ in range(int(np.ceil(np.log2(max(n, 2)))) + 1):
        done = jump == root
        if done.all():
            break
        dist = np.where(done, dist, dist + dist[jump])
        jump = np.where(done, jump, jump[jump])
    bad = np.flatnonzero(jump != root)
    if len(bad):
        # follow one offending node until a node repeats: that closes the cycle (error path only)
        seen: dict[int, int] = {}
        v = int(bad[0])
        while v not in seen:
            seen[v] = len(seen)
            v = int(parent[v])
        cycle = list(seen)[seen[v]:]
        shown = " -> ".join(where(i) for i in cycle[:8]) + (" -> ..." if len(cycle) > 8 else "")
        raise TaxonomyError(
            f"the parent links contain a cycle of {len(cycle)} node(s) ({len(bad)} node(s) never reach the root): "
            f"{shown} -> {where(cycle[0])}. Fix the parent of one of these rows so that every node leads to the root."
        )
    return dist


def canonical_order(parent: np.ndarray, names: np.ndarray, keys: np.ndarray,
                    where: Callable[[int], str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (order, depth): ``order[new_id] = input index`` in canonical BFS order.

    ``parent`` holds input indices (-1 for the single root). Nodes are ordered by
    depth, then parent's new id, then name, then key (keys only matter between
    siblings with equal names). One global string sort, then one stable integer
    sort per depth level.
    """
    order, depth, _ = _canonical_order(parent, names, keys, where)
    return order, depth


def _canonical_order(parent: np.ndarray, names: np.ndarray, keys: np.ndarray,
                     where: Callable[[int], str] | None = None, name_rank: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`canonical_order` plus the name rank used; ``name_rank`` (any integer array
    ordered like the names, e.g. a subset of a larger tree's ranks) skips the string sort."""
    parent = np.asarray(parent, dtype=np.int64)
    where = where or (lambda i: f"node #{i} {names[i]!r}")
    n = len(parent)
    invalid = (parent >= n) | (parent < -1)
    if invalid.any():
        i = int(np.flatnonzero(invalid)[0])
        raise TaxonomyError(f"{where(i)} points to a parent (input index {int(parent[i])}) that does not exist"
                            f" ({int(invalid.sum())} such node(s)); every parent must be one of the {n} nodes")
    roots = np.flatnonzero(parent < 0)
    if len(roots) != 1:
        shown = ", ".join(where(int(i)) for i in roots[:5])
        raise TaxonomyError(
            f"a taxonomy needs exactly one root, found {len(roots)}"
            + (f": {shown}. Give all but one of them a parent (or add a common root)." if len(roots)
               else " (every node has a parent, so there is a cycle)")
        )
    depth = _pointer_jump_depth(parent, where)
    if name_rank is None:
        name_rank = _dense_rank(names)
    tie = np.zeros(n, dtype=np.int64)
    repeated = np.bincount(name_rank)[name_rank] > 1
    if repeated.any():
        tie[repeated] = _dense_rank(keys[repeated])
    base = np.lexsort((tie, name_rank))                      # by name, then key
    by_depth = base[np.argsort(depth[base], kind="stable")]  # by depth, then name, then key
    bounds = np.searchsorted(depth[by_depth], np.arange(depth.max() + 2))
    new_id = np.full(n, -1, dtype=np.int64)
    new_id[roots[0]] = 0
    order = by_depth.copy()
    for d in range(1, len(bounds) - 1):
        lo, hi = int(bounds[d]), int(bounds[d + 1])
        members = by_depth[lo:hi]
        members = members[np.argsort(new_id[parent[members]], kind="stable")]
        new_id[members] = np.arange(lo, hi)
        order[lo:hi] = members
    return order, depth[order], name_rank


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
        self.rank_order: tuple[str, ...] = tuple(str(r) for r in rank_order)
        self.depth = depth if depth is not None else _pointer_jump_depth(parent, lambda i: f"node {i}")
        for arr in (self.depth, parent, names, ranks, keys, is_label):
            arr.setflags(write=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_parents(cls, parent: Sequence[int] | np.ndarray, names: Iterable[object],
                     ranks: Iterable[object] | None = None, keys: Iterable[object] | None = None,
                     labels: Iterable[bool] | np.ndarray | Literal["leaves"] = "leaves",
                     rank_order: Sequence[str] | None = None,
                     where: Callable[[int], str] | None = None,
                     check_rank_order: bool = True,
                     return_order: bool = False,
                     _name_rank: np.ndarray | None = None):
        """Build a canonical Taxonomy from nodes in any order.

        parent: input index of each node's parent, -1 for the root.
        names: display names (None/NaN count as empty, which is an error).
        ranks: rank of each node, ``""``/None for unranked.
        keys: unique external ids (default: the names, which must then be unique).
        labels: boolean mask over input nodes, or ``"leaves"``.
        rank_order: known ranks, root first. Defaults to the ranks present,
            ordered by their mean depth. Ranks not in the list count as unranked.
        where: turns an input index into a human description ("file.csv line 7")
            used in error messages.
        check_rank_order: raise if a ranked node lies under a node of the same or a lower rank.
        return_order: also return ``order`` with ``order[new_id] = input index``.
        _name_rank: internal (transforms): integers ordered like ``names``, to skip the string sort.
        """
        parent = np.asarray(parent)
        if parent.ndim != 1 or (parent.size and parent.dtype.kind not in "iu"):
            raise TaxonomyError(f"parent must be a 1-D array of integer input indices, got {parent.dtype} "
                                f"with shape {parent.shape}")
        parent = parent.astype(np.int64, copy=False)
        n = len(parent)
        if n == 0:
            raise TaxonomyError("a taxonomy needs at least one node")
        names_a = _to_str_array(names, n, "", "names")
        ranks_a = _to_str_array(ranks, n, "", "ranks")
        keys_a = _to_str_array(keys, n, "", "keys") if keys is not None else names_a.copy()
        where = where or (lambda i: f"node {keys_a[i]!r} ({names_a[i]!r})")
        empty = np.flatnonzero(names_a == "")
        if len(empty):
            shown = ", ".join(where(int(i)) for i in empty[:5])
            raise TaxonomyError(f"{len(empty)} node(s) have an empty name: {shown}. Give every node a name.")
        if len(set(keys_a.tolist())) != n:
            kr = _dense_rank(keys_a)
            dup_nodes = np.flatnonzero(np.bincount(kr)[kr] > 1)
            dup_nodes = dup_nodes[np.argsort(kr[dup_nodes], kind="stable")]
            groups = np.split(dup_nodes, np.flatnonzero(np.diff(kr[dup_nodes])) + 1)
            shown = "; ".join(f"{keys_a[g[0]]!r} at " + ", ".join(where(int(i)) for i in g[:3]) for g in groups[:5])
            hint = ("" if keys is not None else
                    " No keys were given, so names serve as ids: pass keys= (e.g. taxon ids) when names repeat.")
            raise TaxonomyError(f"{len(groups)} duplicate node id(s): {shown}. Every node needs a unique id.{hint}")
        if _name_rank is not None and np.shape(_name_rank) != (n,):
            raise TaxonomyError(f"_name_rank must have shape ({n},)")
        order, depth, name_rank = _canonical_order(parent, names_a, keys_a, where, _name_rank)
        new_of_old = np.empty(n, dtype=np.int64)
        new_of_old[order] = np.arange(n)
        old_parent = parent[order]
        new_parent = np.where(old_parent < 0, -1, new_of_old[np.maximum(old_parent, 0)])
        if isinstance(labels, str):
            if labels != "leaves":
                raise TaxonomyError(f"labels must be a boolean mask or 'leaves', got {labels!r}")
            is_label = np.ones(n, dtype=bool)
            is_label[new_parent[1:]] = False
        else:
            mask = np.asarray(labels)
            if mask.shape != (n,) or mask.dtype.kind not in "bui":
                raise TaxonomyError(f"labels must be a boolean mask of shape ({n},), got {mask.dtype} {mask.shape}")
            is_label = mask.astype(bool)[order]
        ranks_new = ranks_a[order]
        if rank_order is None:
            codes, uniques = _factorize(ranks_new)
            count = np.bincount(codes, minlength=len(uniques))
            mean_depth = np.bincount(codes, weights=depth, minlength=len(uniques)) / np.maximum(count, 1)
            rank_order = sorted((u for u in uniques if u), key=lambda r: (mean_depth[uniques.index(r)], r))
        rank_order = tuple(str(r) for r in rank_order)
        if len(set(rank_order)) != len(rank_order) or "" in rank_order:
            raise TaxonomyError(f"rank_order must list distinct, non-empty rank names, got {list(rank_order)}")
        tax = cls(new_parent, names_a[order], ranks_new, keys_a[order], is_label,
                  rank_order, depth=depth, _trusted=True)
        tax.__dict__["_name_rank"] = np.asarray(name_rank)[order]
        if check_rank_order and tax.rank_order:
            tax.check_rank_order(where=lambda v: where(int(order[v])))
        return (tax, order) if return_order else tax

    def replace(self, *, names: Iterable[object] | None = None, ranks: Iterable[object] | None = None,
                is_label: np.ndarray | None = None, rank_order: Sequence[str] | None = None) -> Taxonomy:
        """A copy with some per-node attributes replaced (same ids, same structure).

        New ``names`` must keep the canonical order (sibling order is by name); to
        rename freely use :func:`taxonomist.taxonomy.transforms.rename`, which re-orders.
        """
        n = self.n_nodes
        new_names = self.names if names is None else _to_str_array(names, n, "", "names")
        new_ranks = self.ranks if ranks is None else _to_str_array(ranks, n, "", "ranks")
        if is_label is None:
            new_label = self.is_label
        else:
            new_label = np.asarray(is_label)
            if new_label.shape != (n,) or new_label.dtype.kind not in "bui":
                raise TaxonomyError(f"is_label must be a boolean mask of shape ({n},), got "
                                    f"{new_label.dtype} {new_label.shape}")
            new_label = new_label.astype(bool)
        if names is not None:
            if (new_names == "").any():
                raise TaxonomyError("replace(names=...): empty names are not allowed")
            order, _ = canonical_order(self.parent, new_names, self.keys)
            if not np.array_equal(order, np.arange(n)):
                raise TaxonomyError("replace(names=...) would change the sibling order, so node ids would no longer "
                                    "be canonical; use taxonomy.transforms.rename, which returns the id mapping")
        tax = Taxonomy(self.parent, new_names, new_ranks, self.keys, new_label,
                       self.rank_order if rank_order is None else rank_order, depth=self.depth, _trusted=True)
        if names is None and "_name_rank" in self.__dict__:
            tax.__dict__["_name_rank"] = self._name_rank
        if ranks is not None or rank_order is not None:
            if len(set(tax.rank_order)) != len(tax.rank_order) or "" in tax.rank_order:
                raise TaxonomyError(f"rank_order must list distinct, non-empty rank names, got {list(tax.rank_order)}")
            tax.check_rank_order()
        return tax

    def with_labels(self, nodes: Iterable[int] | np.ndarray) -> Taxonomy:
        """The same tree with exactly ``nodes`` (node ids) as label nodes."""
        ids = self._check_ids(nodes, "label nodes")
        mask = np.zeros(self.n_nodes, dtype=bool)
        mask[ids] = True
        return self.replace(is_label=mask)

    def _check_ids(self, nodes: Iterable[int] | np.ndarray | int, what: str = "nodes") -> np.ndarray:
        """``nodes`` as an int64 array (any shape), or a TaxonomyError for non-integer or out-of-range ids.

        Cheap on the hot paths (LCA, distances): one ``min`` and one ``max`` pass; the
        offending values are located only when there is one. ``-1`` is not an id here
        (it would silently index the last node): callers with unknown samples mask them first.
        """
        if isinstance(nodes, np.ndarray) or np.isscalar(nodes) or hasattr(nodes, "__array__"):
            arr = np.asarray(nodes)
        else:
            arr = np.asarray(list(nodes))
        if arr.size == 0:
            return arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            first = arr.ravel()[0]
            first = first.item() if hasattr(first, "item") else first
            raise TaxonomyError(f"{what} must be integer node ids, got dtype {arr.dtype} (e.g. {first!r}); convert "
                                "them with .astype(int) only if they are whole numbers, or look names up with "
                                "find() / find_many()")
        arr = arr.astype(np.int64, copy=False)
        if int(arr.min()) < 0 or int(arr.max()) >= self.n_nodes:
            bad = (arr < 0) | (arr >= self.n_nodes)
            first = np.argwhere(bad)[0].tolist() if arr.ndim else []
            raise TaxonomyError(f"{what}: {int(bad.sum())} id(s) outside 0..{self.n_nodes - 1}, e.g. "
                                f"{int(arr[bad].ravel()[0])}" + (f" at position {first}" if arr.ndim else "")
                                + ("; -1 (an unknown sample) is not a node: mask such entries before the call"
                                   if int(arr.min()) < 0 else ""))
        return arr

    @cached_property
    def _name_rank(self) -> np.ndarray:
        """Integers ordered like the names (set by from_parents; lets transforms skip the string sort)."""
        return _dense_rank(self.names)

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
    def _level_groups(self) -> list[tuple[slice, np.ndarray, np.ndarray]]:
        """Per depth level >= 1: (id slice, offset of each sibling run inside it, the run's parent).

        Children are sorted by parent, so the runs are contiguous and
        ``ufunc.reduceat(values[slice], offsets)`` aggregates each parent's children.
        """
        out = []
        for sl in self._level_slices[1:]:
            p = self.parent[sl]
            starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
            out.append((sl, starts, p[starts]))
        return out

    @cached_property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @cached_property
    def n_children(self) -> np.ndarray:
        return np.bincount(self.parent[1:], minlength=self.n_nodes).astype(np.int64)

    @cached_property
    def child_start(self) -> np.ndarray:
        """First child id of every node; ``n_nodes`` for leaves (children are contiguous in BFS order)."""
        # parent[1:] is non-decreasing in canonical order, so a binary search finds each first child
        start = np.searchsorted(self.parent[1:], np.arange(self.n_nodes), side="left") + 1
        return np.where(self.n_children > 0, start, self.n_nodes).astype(np.int64)

    def children(self, v: int) -> np.ndarray:
        """Child ids of node ``v`` (one contiguous range)."""
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
        return self.names[self.label_ids].tolist()

    # ------------------------------------------------------------- ancestors
    @cached_property
    def _lift(self) -> np.ndarray:
        """Binary-lifting table: ``_lift[k, v]`` = ancestor ``2**k`` steps above v (the root stays root).

        ``K = bit_length(max_depth)`` rows cover any climb of up to ``max_depth`` steps;
        int32 halves the memory (n < 2**31 always holds in practice).
        """
        k = max(1, self.max_depth.bit_length())
        dt = np.int32 if self.n_nodes < 2**31 else np.int64
        table = np.empty((k, self.n_nodes), dtype=dt)
        table[0] = np.maximum(self.parent, 0)
        for i in range(1, k):
            table[i] = table[i - 1][table[i - 1]]
        return table

    def _lift_by(self, nodes: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Ancestor ``steps`` (>= 0, <= depth) edges above each node: one gather per set bit."""
        cur = np.array(nodes, dtype=np.int64)
        for k in range(self._lift.shape[0]):
            bit = (steps >> k) & 1 == 1
            if bit.any():
                cur[bit] = self._lift[k][cur[bit]]
        return cur

    def ancestor_at_depth(self, nodes: np.ndarray | Sequence[int] | int, d: int | np.ndarray) -> np.ndarray:
        """Ancestor-or-self of each node at depth ``d`` (broadcast); -1 where the node is shallower than ``d``
        or ``d < 0``."""
        nodes, d = np.broadcast_arrays(np.asarray(nodes, dtype=np.int64), np.asarray(d, dtype=np.int64))
        steps = self.depth[nodes] - d
        ok = (steps >= 0) & (d >= 0)
        out = self._lift_by(nodes, np.where(ok, steps, 0))
        return np.where(ok, out, -1)

    def ancestor_matrix(self, nodes: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """``A[i, d]`` = ancestor of ``nodes[i]`` at depth d (root at column 0), -1 below the node.

        Memory ``len(nodes) x (max_depth + 1)`` int64: for all 2.6 M NCBI nodes that is 0.8 GB,
        so pass the subset you need.
        """
        nodes = np.arange(self.n_nodes) if nodes is None else self._check_ids(nodes)
        out = np.full((len(nodes), self.max_depth + 1), -1, dtype=np.int64)
        cur = nodes.copy()
        dep = self.depth[nodes]
        rows = np.arange(len(nodes))
        out[rows, dep] = nodes
        alive = dep > 0
        while alive.any():
            rows, cur, dep = rows[alive], self.parent[cur[alive]], dep[alive] - 1
            out[rows, dep] = cur
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

    @cached_property
    def subtree_size(self) -> np.ndarray:
        """Number of nodes in each node's subtree (itself included)."""
        return self.subtree_sum(np.ones(self.n_nodes, dtype=np.int64))

    @cached_property
    def preorder(self) -> np.ndarray:
        """Position of each node in a depth-first pre-order walk (children in id order).

        The subtree of v is exactly the nodes u with
        ``preorder[v] <= preorder[u] < preorder[v] + subtree_size[v]``.
        Built top-down: a child's position is its parent's + 1 + the sizes of its earlier siblings.
        """
        size = self.subtree_size
        pre = np.zeros(self.n_nodes, dtype=np.int64)
        for sl, starts, up in self._level_groups:
            s = size[sl]
            excl = np.cumsum(s) - s                       # exclusive prefix sum over the level
            run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
            pre[sl] = pre[up][run] + 1 + excl - excl[starts][run]
        return pre

    def is_ancestor(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """True where ``a`` is ``b`` or an ancestor of ``b`` (broadcast; O(1) per pair via pre-order).

        A negative id (an unknown node) is nobody's ancestor or descendant: False.
        """
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        ok = (a >= 0) & (b >= 0)
        a0, b0 = np.maximum(a, 0), np.maximum(b, 0)
        pa, pb = self.preorder[a0], self.preorder[b0]
        return ok & (pa <= pb) & (pb < pa + self.subtree_size[a0])

    def descendants_mask(self, v: int, include_self: bool = True) -> np.ndarray:
        """Boolean mask of the subtree of ``v``."""
        p = self.preorder
        lo = int(p[v])
        mask = (p >= lo) & (p < lo + int(self.subtree_size[v]))
        if not include_self:
            mask[v] = False
        return mask

    def lca(self, a: np.ndarray | Sequence[int] | int, b: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Lowest common ancestor, vectorised (broadcast) by binary lifting.

        Lift the deeper node to the other's depth, then for k = K-1..0 jump both
        by ``2**k`` wherever their ancestors differ (Bender & Farach-Colton 2000).
        Ids must be integers in ``0..n_nodes-1`` (a TaxonomyError otherwise: ``-1`` would
        wrap to the last node and floats would truncate).
        """
        return self._lca(self._check_ids(a, "lca: a"), self._check_ids(b, "lca: b"))

    def _lca(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """:meth:`lca` of int64 arrays already checked by :meth:`_check_ids`."""
        a, b = np.broadcast_arrays(a, b)
        shape = a.shape
        a = a.ravel()
        b = b.ravel()
        da, db = self.depth[a], self.depth[b]
        lo = np.where(da >= db, a, b)   # the deeper node of each pair
        hi = np.where(da >= db, b, a)
        lo = self._lift_by(lo, np.abs(da - db))
        todo = np.flatnonzero(lo != hi)
        x, y = lo[todo], hi[todo]
        for k in range(self._lift.shape[0] - 1, -1, -1):
            ux = self._lift[k][x]
            uy = self._lift[k][y]
            m = ux != uy
            x = np.where(m, ux, x)
            y = np.where(m, uy, y)
        lo[todo] = self.parent[x]
        return lo.reshape(shape)

    # ------------------------------------------------------------ subtrees
    @cached_property
    def height(self) -> np.ndarray:
        """Longest number of edges from each node down to a leaf (leaves: 0)."""
        h = np.zeros(self.n_nodes, dtype=np.int64)
        for sl, starts, up in reversed(self._level_groups):
            h[up] = np.maximum.reduceat(h[sl], starts) + 1
        return h

    @cached_property
    def n_leaves_under(self) -> np.ndarray:
        """Number of leaves in each node's subtree (a leaf counts itself)."""
        return self.subtree_sum(self.is_leaf.astype(np.int64))

    def subtree_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of ``values`` (shape ``[..., n_nodes]``) over each node's subtree.

        Bottom-up, one ``np.add.reduceat`` per depth level over the contiguous sibling
        runs. Integer and float inputs keep their dtype; booleans are counted as int64.
        """
        arr = np.asarray(values)
        if arr.shape[-1:] != (self.n_nodes,):
            raise TaxonomyError(f"subtree_sum expects values of shape [..., {self.n_nodes}], got {arr.shape}")
        out = arr.astype(np.int64 if arr.dtype.kind == "b" else arr.dtype, copy=True)
        for sl, starts, up in reversed(self._level_groups):
            out[..., up] += np.add.reduceat(out[..., sl], starts, axis=-1)
        return out

    # ----------------------------------------------------------------- ranks
    @cached_property
    def _rank_codes(self) -> tuple[np.ndarray, list[str]]:
        return _factorize(self.ranks)

    def _rank_columns(self, ranks: Sequence[str]) -> np.ndarray:
        """Column of each node's rank in ``ranks`` (-1: not listed or unranked)."""
        codes, uniques = self._rank_codes
        pos = {r: j for j, r in enumerate(ranks)}
        lookup = np.array([pos.get(u, -1) if u else -1 for u in uniques], dtype=np.int64)
        return lookup[codes]

    @cached_property
    def rank_index(self) -> np.ndarray:
        """Index of each node's rank in ``rank_order``; -1 for unranked nodes (or ranks not in the order)."""
        return self._rank_columns(self.rank_order)

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

    def _resolve_ranks(self, ranks: Sequence[str] | None) -> list[str]:
        ranks = list(self.rank_order if ranks is None else ranks)
        unknown = [r for r in ranks if r not in self.rank_order]
        if unknown:
            raise TaxonomyError(f"unknown rank(s) {unknown}; this taxonomy has ranks {list(self.rank_order)}")
        return ranks

    def rank_view(self, ranks: Sequence[str] | None = None) -> np.ndarray:
        """``V[v, j]``: the ancestor-or-self of v whose rank is ``ranks[j]``; -1 if the lineage skips it
        or stops above it.

        Without ranks (``ranks=None`` and an unranked tree) the levels are the depths
        1..max_depth and ``V[v, j]`` is the ancestor at depth j+1 (-1 below v).
        """
        if ranks is None and not self.has_ranks:
            return self.ancestor_matrix()[:, 1:]
        ranks = self._resolve_ranks(ranks)
        col = self._rank_columns(ranks)
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
        if ranks is None and not self.has_ranks:
            raise TaxonomyError("this taxonomy has no ranks: use the 'path' or 'lca_height' distance,"
                                " or load it with rank information")
        ranks = self._resolve_ranks(ranks)
        count = (self._rank_columns(ranks) >= 0).astype(np.int64)
        count[0] = 0
        for sl in self._level_slices[1:]:
            count[sl] += count[self.parent[sl]]
        return count

    # ------------------------------------------------------------- distances
    @staticmethod
    def _check_metric(metric: str) -> None:
        if metric not in DISTANCE_METRICS:
            raise TaxonomyError(f"unknown distance metric {metric!r}; choose one of {', '.join(DISTANCE_METRICS)}")

    def distance(self, a: np.ndarray | Sequence[int] | int, b: np.ndarray | Sequence[int] | int,
                 metric: DistanceMetric = "path", ranks: Sequence[str] | None = None) -> np.ndarray:
        """Tree distance between node arrays ``a`` and ``b`` (broadcast), vectorised.

        * ``path``: edges from a up to LCA(a, b) plus edges down to b.
        * ``lca_height``: height of LCA(a, b) above its deepest leaf ("ILSVRC distance",
          Bertinetto et al., CVPR 2020); 0 when a == b (so a correct prediction costs
          nothing even at an internal label).
        * ``rank_steps``: path distance counting only nodes whose rank is in ``ranks``
          (FathomNet FGVC 2025 score; default: every rank of the tree): nodes on the
          a side below the LCA plus those on the b side.

        Ids are checked like :meth:`lca`'s (integers in ``0..n_nodes-1``).
        """
        self._check_metric(metric)
        a = self._check_ids(a, "distance: a")
        b = self._check_ids(b, "distance: b")
        lca = self._lca(a, b)
        a, b = np.broadcast_arrays(a, b)
        if metric == "path":
            return self.depth[a] + self.depth[b] - 2 * self.depth[lca]
        if metric == "lca_height":
            return np.where(a == b, 0, self.height[lca])
        rc = self._rank_count_cached(ranks)
        return rc[a] + rc[b] - 2 * rc[lca]

    def _rank_count_cached(self, ranks: Sequence[str] | None) -> np.ndarray:
        cache = self.__dict__.setdefault("_rank_count_cache", {})
        key = tuple(ranks) if ranks is not None else None
        if key not in cache:
            cache[key] = self.rank_count(ranks)
        return cache[key]

    def distance_matrix(self, nodes: np.ndarray | Sequence[int] | None = None, metric: DistanceMetric = "path",
                        ranks: Sequence[str] | None = None, chunk_elems: int = 4_000_000) -> np.ndarray:
        """Dense pairwise distances among ``nodes`` (default: the label nodes), ``[k, k]`` int16/int32.

        The nodes are sorted in depth-first pre-order. For i < j in that order,
        LCA(s_i, s_j) is the shallowest of the adjacent pairs' LCAs
        ``LCA(s_t, s_t+1)``, t in i..j-1 (the LCA / range-minimum reduction of Bender &
        Farach-Colton 2000): it is one of them and an ancestor of all the others. So any
        quantity that is monotone along root paths -- depth, minus height, rank count --
        of LCA(s_i, s_j) is a *range minimum* over the adjacent pairs. One LCA query per
        adjacent pair, then each block of rows is filled with running minima
        (``np.minimum.accumulate`` inside the block, an outer minimum of a suffix- and a
        prefix-minimum outside it): O(k^2) simple int32 operations in blocks of
        ~``chunk_elems`` cells, no ancestor matrix, no per-pair LCA.
        """
        self._check_metric(metric)
        nodes = self.label_ids if nodes is None else self._check_ids(nodes)
        k = len(nodes)
        if metric == "path":
            key, top = self.depth, 2 * self.max_depth          # d = depth_a + depth_b - 2 depth_lca
        elif metric == "lca_height":
            key, top = -self.height, self.max_depth             # d = height_lca (min of -height)
        else:
            key = self._rank_count_cached(ranks)                # d = rc_a + rc_b - 2 rc_lca
            top = 2 * int(key.max())
        out = np.empty((k, k), dtype=np.int16 if top < np.iinfo(np.int16).max else np.int32)
        if k == 0:
            return out
        perm = np.argsort(self.preorder[nodes], kind="stable")
        inv = np.empty(k, dtype=np.int64)
        inv[perm] = np.arange(k)
        s = nodes[perm]
        has_repeats = len(np.unique(s)) < k
        big = np.iinfo(np.int32).max
        own = key[s].astype(np.int32)                                   # the LCA of (s_i, s_i) is s_i
        link = key[self._lca(s[:-1], s[1:])].astype(np.int32)            # adjacent pairs' LCAs
        link_before = np.r_[np.int32(big), link]                        # link_before[j] = link[j - 1]
        rows_per = max(1, min(k, chunk_elems // k))
        cols = np.arange(k)
        tri = cols[None, :] > cols[:, None] if rows_per >= k else None
        for lo in range(0, k, rows_per):
            hi = min(k, lo + rows_per)
            nb = hi - lo
            m = np.empty((nb, k), dtype=np.int32)
            # inside the block: X[i, j] = link[lo + j - 1] for j > i, running minimum along the row
            upper_mask = tri[:nb, :nb] if tri is not None else cols[None, :nb] > cols[:nb, None]
            inner = np.where(upper_mask, link_before[lo:hi][None, :], big)
            upper = np.minimum.accumulate(inner, axis=1)
            blk = np.where(upper_mask, upper, upper.T)
            blk[cols[:nb], cols[:nb]] = own[lo:hi]
            m[:, lo:hi] = blk
            if hi < k:   # right of the block: min(link[i..hi-1]) vs min(link[hi..j-1])
                suffix = np.minimum.accumulate(link[lo:hi][::-1])[::-1]
                prefix = np.r_[np.int32(big), np.minimum.accumulate(link[hi:k - 1])]
                np.minimum(suffix[:, None], prefix[None, :], out=m[:, hi:])
            if lo > 0:   # left of the block: min(link[j..lo-1]) vs min(link[lo..i-1])
                left = np.minimum.accumulate(link[:lo][::-1])[::-1]
                inside = np.r_[np.int32(big), np.minimum.accumulate(link[lo:hi - 1])]
                np.minimum(inside[:, None], left[None, :], out=m[:, :lo])
            if metric == "lca_height":
                d = np.negative(m, out=m)
                d[cols[:nb], cols[lo:hi]] = 0                           # a == b costs nothing
                if has_repeats:
                    d[s[lo:hi, None] == s[None, :]] = 0
            else:        # in place: own_i + own_j - 2 m
                d = np.multiply(m, -2, out=m)
                d += own[None, :]
                d += own[lo:hi, None]
            out[perm[lo:hi]] = d[:, inv]
        return out

    # ------------------------------------------------------- marginalisation
    def marginalization_matrix(self, labels: np.ndarray | Sequence[int] | None = None) -> sp.csr_matrix:
        """Sparse 0/1 matrix M [n_labels x n_nodes]: ``M[i, v] = 1`` if node v is label i or its ancestor.

        ``p_nodes = p_labels @ M`` turns probabilities over labels into the probability
        of every node (its subtree's mass) in one sparse product. Built straight in CSR
        form: row i holds the root path of label i, root first (ids ascend along a path).
        """
        if labels is None:
            return self._label_marginalization.copy()
        return self._build_marginalization(self._check_ids(labels))

    def _build_marginalization(self, labels: np.ndarray) -> sp.csr_matrix:
        length = self.depth[labels] + 1
        indptr = np.zeros(len(labels) + 1, dtype=np.int64)
        np.cumsum(length, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int64)
        cur = labels.copy()
        slot = indptr[:-1] + length - 1          # the label itself sits last in its row
        alive = np.arange(len(labels))
        while len(alive):
            indices[slot[alive]] = cur[alive]
            slot[alive] -= 1
            cur[alive] = self.parent[cur[alive]]
            alive = alive[cur[alive] >= 0]
        data = np.ones(len(indices), dtype=np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(labels), self.n_nodes))

    @cached_property
    def _label_marginalization(self) -> sp.csr_matrix:
        return self._build_marginalization(self.label_ids)

    def node_probabilities(self, label_probs: np.ndarray) -> np.ndarray:
        """``[batch, n_labels]`` (or ``[n_labels]``) label probabilities -> node probabilities
        ``[batch, n_nodes]``: each node gets the summed mass of the labels at or below it.

        Float32 input stays float32, anything else is computed in float64.
        """
        p = np.asarray(label_probs)
        if p.shape[-1:] != (self.n_labels,) or p.ndim > 2:
            raise TaxonomyError(f"label probabilities must have shape [batch, {self.n_labels}], got {p.shape}")
        p = p.astype(np.float32 if p.dtype == np.float32 else np.float64, copy=False)
        m = self._label_marginalization
        out = np.asarray(m.T.astype(p.dtype) @ np.atleast_2d(p).T).T
        return out[0] if p.ndim == 1 else out

    @cached_property
    def sibling_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(group_of_node, group_parent): nodes 1..N-1 grouped by parent for sibling softmaxes.

        ``group_of_node[v]`` is the index of v's sibling group (-1 for the root);
        ``group_parent[g]`` is the parent node of group g (the internal nodes in id order).
        Because children are contiguous, each group is also a contiguous id range starting
        at ``child_start[group_parent[g]]``, and groups appear in id order.
        """
        group_parent = self.internal_nodes
        pos = np.full(self.n_nodes, -1, dtype=np.int64)
        pos[group_parent] = np.arange(len(group_parent))
        gid = np.full(self.n_nodes, -1, dtype=np.int64)
        gid[1:] = pos[self.parent[1:]]
        return gid, group_parent

    # ------------------------------------------------------------- names
    @cached_property
    def _name_first(self) -> dict[str, int]:
        """Name -> the smallest id carrying it (built in C: a dict from reversed pairs)."""
        n = self.n_nodes
        return dict(zip(self.names[::-1].tolist(), range(n - 1, -1, -1)))

    @cached_property
    def _name_repeats(self) -> dict[str, list[int]]:
        """Name -> all ids, only for names that several nodes carry (homonyms)."""
        first = self._name_first
        if len(first) == self.n_nodes:
            return {}
        first_id = np.fromiter(map(first.__getitem__, self.names.tolist()), dtype=np.int64, count=self.n_nodes)
        rep = np.flatnonzero(first_id != np.arange(self.n_nodes))
        groups: dict[str, list[int]] = {}
        for v in rep.tolist():           # only the homonyms, usually a tiny fraction
            name = self.names[v]
            groups.setdefault(name, [first[name]]).append(v)
        return groups

    @cached_property
    def _key_index(self) -> dict[str, int]:
        return dict(zip(self.keys.tolist(), range(self.n_nodes)))

    def find_all(self, name: str) -> list[int]:
        """Every node with this name, in id order (names are not unique in real taxonomies)."""
        name = str(name)
        if name in self._name_repeats:
            return list(self._name_repeats[name])
        v = self._name_first.get(name)
        return [] if v is None else [v]

    def find(self, name: str | int, rank: str | None = None, under: str | int | None = None) -> int:
        """The one node called ``name`` (optionally of ``rank``, or at/below ``under``).

        Accepts a node key too (a key is used when no node carries ``name`` as a name).
        Raises :class:`AmbiguousNameError` listing the candidate lineages when several
        nodes match, :class:`UnknownNameError` when none does.
        """
        name = str(name)
        cands = self.find_all(name)
        if not cands and name in self._key_index:
            cands = [self._key_index[name]]
        if rank is not None:
            cands = [c for c in cands if self.ranks[c] == rank]
        if under is not None:
            u = self.find(under) if isinstance(under, str) else int(under)
            cands = [c for c in cands if bool(self.is_ancestor(u, c))]
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise UnknownNameError(name, self._suggest(name))
        raise AmbiguousNameError(name, [(c, self.lineage(c, include_root=False), str(self.ranks[c]),
                                         str(self.keys[c])) for c in cands])

    def _suggest(self, name: str, n: int = 3) -> list[str]:
        import difflib
        pool = list(self._name_first)
        if len(pool) > 200_000:  # difflib is O(pool); keep suggestions cheap on huge trees
            low = name.lower()[:3]
            pool = [p for p in pool if p.lower().startswith(low)][:200_000]
        return difflib.get_close_matches(name, pool, n=n)

    def find_many(self, names: Iterable[str]) -> np.ndarray:
        """Look-up of many names (each must be unambiguous); distinct names are resolved once."""
        names = [str(x) for x in names]
        distinct = {x: self.find(x) for x in dict.fromkeys(names)}
        return np.fromiter(map(distinct.__getitem__, names), dtype=np.int64, count=len(names))

    # ----------------------------------------------------------- identity
    @cached_property
    def fingerprint(self) -> str:
        """Stable content hash: same tree (structure, names, ranks, labels, rank order) -> same string.

        Keys are not part of it (the same tree loaded from a lineage CSV or a parent
        table gets the same fingerprint).
        """
        h = hashlib.sha256()
        h.update(b"taxonomist-taxonomy-v1\0")
        h.update(self.parent.astype("<i8").tobytes())
        for arr in (self.names, self.ranks):
            h.update("\x1f".join(arr.tolist()).encode("utf-8"))
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
