"""Directed acyclic graph -> tree: keep one parent per node by a documented rule.

Hierarchies such as WordNet are DAGs: a synset can have several hypernyms
("dog" is both a *canine* and a *domestic animal*). A taxonomy needs one parent
per node, so :func:`dag_to_tree` keeps, for every node, exactly one of its
parents:

``rule="longest"`` (default)
    the parent that lies on the node's **longest** path from a root, i.e. the
    parent ``p`` with the largest longest-path depth ``L(p)``. Then
    ``L(v) = L(p) + 1`` and, by induction, every node's root path in the tree
    is one of its longest paths in the DAG, and its tree depth equals its
    longest-path depth. This is the path the ImageNet hierarchy tools print as
    "the" WordNet path of a class (the deepest, most specific chain).
``rule="shortest"``
    the parent on the node's **shortest** path from a root (breadth-first tree).

Ties (several parents with the same depth) are broken by the smallest parent
key in string order, so the result never depends on the input edge order.

Everything is vectorised: depths come from level-by-level peeling
(Kahn's topological sort, one numpy step per level), the choice from one
``lexsort`` over the edges. A cycle is an error naming its nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import TaxonomyError

DAG_RULES: tuple[str, ...] = ("longest", "shortest")


@dataclass(frozen=True)
class DagTree:
    """Result of :func:`dag_to_tree`.

    parent: chosen parent of every node (-1 for the DAG's roots; several roots
        need a synthetic root on top, which the importers add).
    depth: the rule's depth of every node in the DAG (longest or shortest path
        length from a root), equal to its depth in the returned forest.
    n_multi_parent: nodes that had more than one parent.
    n_dropped_edges: parent links removed.
    """

    parent: np.ndarray
    depth: np.ndarray
    n_multi_parent: int
    n_dropped_edges: int


def _edge_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(starts[i], stops[i])`` for all i without a Python loop."""
    lens = stops - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(total, dtype=np.int64) + offsets


def _longest_depth(n: int, child: np.ndarray, parent: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """Longest path length from a root to every node by Kahn peeling (level = 1 + max parent level)."""
    order = np.argsort(parent, kind="stable")
    kids = child[order]
    indptr = np.searchsorted(parent[order], np.arange(n + 1))
    pending = np.bincount(child, minlength=n)  # parents not yet placed
    depth = np.full(n, -1, dtype=np.int64)
    frontier = np.flatnonzero(pending == 0)
    level = 0
    while len(frontier):
        depth[frontier] = level
        out = kids[_edge_ranges(indptr[frontier], indptr[frontier + 1])]
        np.subtract.at(pending, out, 1)
        cand = np.unique(out)
        frontier = cand[pending[cand] == 0]
        level += 1
    stuck = np.flatnonzero(depth < 0)
    if len(stuck):
        raise TaxonomyError(f"the graph has a cycle ({len(stuck)} node(s) never reach a root): "
                            f"{_describe_cycle(stuck, child, parent, where)}. Remove one of these links.")
    return depth


def _shortest_depth(n: int, child: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Shortest path length from a root (breadth-first search over parent -> child edges)."""
    order = np.argsort(parent, kind="stable")
    kids = child[order]
    indptr = np.searchsorted(parent[order], np.arange(n + 1))
    depth = np.full(n, -1, dtype=np.int64)
    frontier = np.flatnonzero(np.bincount(child, minlength=n) == 0)
    level = 0
    while len(frontier):
        depth[frontier] = level
        out = np.unique(kids[_edge_ranges(indptr[frontier], indptr[frontier + 1])])
        frontier = out[depth[out] < 0]
        level += 1
    return depth


def _describe_cycle(stuck: np.ndarray, child: np.ndarray, parent: np.ndarray, where: Callable[[int], str]) -> str:
    """Error path only: follow parent links among the stuck nodes until one repeats."""
    stuck_set = set(stuck.tolist())
    first_parent: dict[int, int] = {}
    for c, p in zip(child.tolist(), parent.tolist()):
        if c in stuck_set and p in stuck_set and c not in first_parent:
            first_parent[c] = p
    v = int(stuck[0])
    seen: list[int] = []
    while v not in seen and v in first_parent and len(seen) < 50:
        seen.append(v)
        v = first_parent[v]
    cycle = seen[seen.index(v):] if v in seen else seen
    return " -> ".join(where(u) for u in cycle[:8]) + (" -> ..." if len(cycle) > 8 else "")


def dag_to_tree(n_nodes: int, child: Sequence[int] | np.ndarray, parent: Sequence[int] | np.ndarray,
                keys: Sequence[object] | np.ndarray | None = None, rule: str = "longest",
                where: Callable[[int], str] | None = None) -> DagTree:
    """Keep one parent per node of a DAG given as ``child -> parent`` edges (node indices).

    keys: tie-break order (smallest key in string order wins); default the node index.
    rule: ``"longest"`` or ``"shortest"`` (see the module docstring).
    where: describes a node in error messages.
    """
    if rule not in DAG_RULES:
        raise TaxonomyError(f"unknown DAG rule {rule!r}; choose one of {', '.join(DAG_RULES)}")
    where = where or (lambda i: f"node {keys[i] if keys is not None else i!r}")
    child = np.asarray(child, dtype=np.int64)
    parent = np.asarray(parent, dtype=np.int64)
    if child.shape != parent.shape:
        raise TaxonomyError("child and parent edge arrays must have the same length")
    if len(child) and (min(child.min(), parent.min()) < 0 or max(child.max(), parent.max()) >= n_nodes):
        raise TaxonomyError(f"edge endpoints must be node indices in 0..{n_nodes - 1}")
    loops = np.flatnonzero(child == parent)
    if len(loops):
        raise TaxonomyError(f"{where(int(child[loops[0]]))} is its own parent (a cycle of length 1)")
    if len(child):
        pairs = np.unique(np.stack([child, parent], axis=1), axis=0)
        child, parent = pairs[:, 0], pairs[:, 1]
    if rule == "longest":
        depth = _longest_depth(n_nodes, child, parent, where)
        score = -depth[parent]          # deepest parent first
    else:
        _longest_depth(n_nodes, child, parent, where)  # cycle check
        depth = _shortest_depth(n_nodes, child, parent)
        score = depth[parent]           # shallowest parent first
    if keys is None:
        key_rank = np.arange(n_nodes)
    else:
        key_rank = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].ravel()
    order = np.lexsort((key_rank[parent], score, child))
    c_sorted = child[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = c_sorted[1:] != c_sorted[:-1]
    chosen = np.full(n_nodes, -1, dtype=np.int64)
    chosen[c_sorted[first]] = parent[order][first]
    n_parents = np.bincount(child, minlength=n_nodes)
    return DagTree(parent=chosen, depth=depth, n_multi_parent=int((n_parents > 1).sum()),
                   n_dropped_edges=int(len(child) - first.sum()))
