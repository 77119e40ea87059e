"""Tree transforms: new canonical taxonomies derived from an old one, with an id map.

Every transform returns a :class:`TransformResult`:

* ``taxonomy``: the new tree, always built through :meth:`Taxonomy.from_parents`,
  so its ids are canonical (same tree -> same ids and fingerprint);
* ``old_to_new``: ``int64[old.n_nodes]``, where each old node's *samples* go in the
  new tree. ``-1`` means the node was removed and nothing stands in for it
  (:func:`restrict`, :func:`prune_unlabelled`); a removed node that something stands
  in for maps to that node (see each function: the single child it was collapsed
  into, the merge target, the "other" leaf of an internal label);
* ``new_to_old``: ``int64[new.n_nodes]``, the old node each new node comes from
  (for the "other" leaves of :func:`with_other_leaves`: the internal node they split off);
* ``report``: counts of what changed (plain ints, ready for a log or JSON).

All transforms are vectorised: masks and parent gathers, one pass per depth level at
most, never a Python loop over nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .core import Taxonomy
from .errors import TaxonomyError

__all__ = [
    "TransformResult",
    "collapse_single_child_chains",
    "restrict",
    "with_other_leaves",
    "rename",
    "merge",
    "prune_unlabelled",
]


@dataclass(frozen=True)
class TransformResult:
    """A transformed taxonomy plus the maps between old and new node ids (see module docstring)."""

    taxonomy: Taxonomy
    old_to_new: np.ndarray
    new_to_old: np.ndarray
    report: dict[str, int] = field(default_factory=dict)

    def map_nodes(self, nodes: np.ndarray | Iterable[int]) -> np.ndarray:
        """Old node ids (``-1`` = unknown stays ``-1``) -> new node ids via ``old_to_new``."""
        arr = np.asarray(nodes if isinstance(nodes, np.ndarray) else list(nodes), dtype=np.int64)
        return np.where(arr >= 0, self.old_to_new[np.maximum(arr, 0)], -1)


# ------------------------------------------------------------------ helpers
def _node(tax: Taxonomy, ref: int | str | np.integer) -> int:
    """A node id from an id, a name or a key (names must be unambiguous)."""
    if isinstance(ref, (int, np.integer)):
        v = int(ref)
        if not 0 <= v < tax.n_nodes:
            raise TaxonomyError(f"node id {v} is outside 0..{tax.n_nodes - 1}")
        return v
    return tax.find(str(ref))


def _nodes(tax: Taxonomy, refs: Iterable[int | str] | np.ndarray) -> np.ndarray:
    """Many node ids; integer arrays are checked in bulk, names/keys are looked up once each."""
    arr = np.asarray(refs if isinstance(refs, np.ndarray) else list(refs))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64).ravel()
        bad = (arr < 0) | (arr >= tax.n_nodes)
        if bad.any():
            raise TaxonomyError(f"{int(bad.sum())} node id(s) outside 0..{tax.n_nodes - 1}, e.g. {int(arr[bad][0])}")
        return arr
    return tax.find_many(arr.ravel().tolist())


def _rebuild(tax: Taxonomy, keep: np.ndarray, parent_old: np.ndarray, is_label: np.ndarray,
             names: np.ndarray | None = None) -> tuple[Taxonomy, np.ndarray]:
    """Canonical taxonomy over the old nodes ``keep`` (bool mask), each under the old node
    ``parent_old[v]`` (which must be kept; -1 for the root). Returns (taxonomy, new id of
    every old node, -1 where not kept)."""
    kept = np.flatnonzero(keep)
    pos = np.full(tax.n_nodes, -1, dtype=np.int64)
    pos[kept] = np.arange(len(kept))
    par = parent_old[kept]
    par_in = np.where(par >= 0, pos[np.maximum(par, 0)], -1)
    if ((par >= 0) & (par_in < 0)).any():   # internal invariant of every transform below
        raise AssertionError("a kept node was attached to a removed parent")
    nm = tax.names if names is None else names
    # unchanged names keep their order, so the old tree's name ranks spare the string sort
    name_rank = tax._name_rank[kept] if names is None else None
    # the rank order is not re-checked here: removing nodes keeps every ancestor relation, and an
    # input tree that was loaded despite rank conflicts (NCBI has a few) must stay transformable
    new, order = Taxonomy.from_parents(par_in, nm[kept], tax.ranks[kept], tax.keys[kept], labels=is_label[kept],
                                       rank_order=tax.rank_order, check_rank_order=False, return_order=True,
                                       _name_rank=name_rank)
    old_to_new = np.full(tax.n_nodes, -1, dtype=np.int64)
    old_to_new[kept[order]] = np.arange(len(kept))
    return new, old_to_new


def _rank_order_ok(tax: Taxonomy) -> bool:
    try:
        tax.check_rank_order()
    except TaxonomyError:
        return False
    return True


def _inverse(old_to_new: np.ndarray, n_new: int, only: np.ndarray | None = None) -> np.ndarray:
    """new -> old for the old nodes that map to themselves (``only`` mask), -1 elsewhere."""
    out = np.full(n_new, -1, dtype=np.int64)
    src = np.flatnonzero(old_to_new >= 0 if only is None else only)
    out[old_to_new[src]] = src
    return out


# ---------------------------------------------------------------- transforms
def collapse_single_child_chains(tax: Taxonomy, keep_labels: bool = True, keep_ranked: bool = False
                                 ) -> TransformResult:
    """Remove internal nodes with exactly one child (the "dead nodes" of a WordNet-derived tree).

    Each surviving node is re-attached to its nearest kept ancestor. Never removed:
    the root; label nodes when ``keep_labels``; nodes whose rank is in
    ``tax.rank_order`` when ``keep_ranked`` (so rank columns stay filled).

    ``old_to_new`` of a removed node is its **nearest kept descendant** down its
    single-child chain: both cover exactly the same leaves, so a sample labelled
    "somewhere under the removed node" means the same thing there, and the summed
    probability of the removed node equals that of the descendant. If a removed node
    was a label (only with ``keep_labels=False``) that descendant becomes a label.
    Path distances between surviving nodes can only shrink.

    report: ``removed``, ``labels_moved`` (label flags handed down), ``n_nodes_before``,
    ``n_nodes_after``.
    """
    n = tax.n_nodes
    remove = tax.n_children == 1
    remove[0] = False
    if keep_labels:
        remove &= ~tax.is_label
    if keep_ranked:
        remove &= tax.rank_index < 0
    keep = ~remove
    # nearest kept strict ancestor, top-down by level
    anc = np.full(n, -1, dtype=np.int64)
    for sl in tax._level_slices[1:]:
        p = tax.parent[sl]
        anc[sl] = np.where(keep[p], p, anc[p])
    # nearest kept descendant-or-self along the single-child chain, bottom-up by level
    down = np.arange(n, dtype=np.int64)
    for sl in reversed(tax._level_slices):
        ids = np.arange(sl.start, sl.stop)
        r = remove[sl]
        down[ids[r]] = down[tax.child_start[ids[r]]]
    is_label = tax.is_label.copy()
    moved = remove & tax.is_label
    is_label[down[moved]] = True
    new, o2n = _rebuild(tax, keep, anc, is_label)
    new_to_old = _inverse(o2n, new.n_nodes)
    o2n[remove] = o2n[down[remove]]
    return TransformResult(new, o2n, new_to_old, {
        "n_nodes_before": n, "n_nodes_after": new.n_nodes, "removed": int(remove.sum()),
        "labels_moved": int(moved.sum())})


def restrict(tax: Taxonomy, nodes: Iterable[int | str] | np.ndarray, labels: str = "keep") -> TransformResult:
    """Keep ``nodes`` (ids, names or keys; e.g. the classes seen in a dataset) and all their
    ancestors; drop every other node (``old_to_new`` = -1 there).

    labels: ``"keep"`` keeps the label flags of the surviving nodes; ``"nodes"`` makes
    exactly the given nodes the labels.

    report: ``n_nodes_before``, ``n_nodes_after``, ``dropped``, ``labels_dropped``
    (labels not kept), ``unlabelled_leaves`` (leaves of the new tree that are no label).
    """
    if labels not in ("keep", "nodes"):
        raise TaxonomyError(f"restrict(labels=...) must be 'keep' or 'nodes', got {labels!r}")
    ids = _nodes(tax, nodes)
    keep = np.zeros(tax.n_nodes, dtype=bool)
    keep[ids] = True
    keep[0] = True
    for sl in reversed(tax._level_slices[1:]):      # a kept node keeps its parent
        p = tax.parent[sl]
        keep[p[keep[sl]]] = True
    if labels == "nodes":
        is_label = np.zeros(tax.n_nodes, dtype=bool)
        is_label[ids] = True
    else:
        is_label = tax.is_label
    new, o2n = _rebuild(tax, keep, tax.parent, is_label)
    return TransformResult(new, o2n, _inverse(o2n, new.n_nodes), {
        "n_nodes_before": tax.n_nodes, "n_nodes_after": new.n_nodes, "dropped": int((~keep).sum()),
        "labels_dropped": int((tax.is_label & ~keep).sum()),
        "unlabelled_leaves": int((new.is_leaf & ~new.is_label).sum())})


def with_other_leaves(tax: Taxonomy, suffix: str = " (other)") -> TransformResult:
    """Give every internal label node L a new leaf child "L (other)" that takes over L's label.

    Afterwards every label is a leaf, so a path-product hierarchical softmax (a product of
    sibling softmaxes from the root down to each label leaf) covers all labels: "L (other)"
    is "L but none of its labelled children". The new leaf has key ``key(L) + "#other"``,
    no rank (rank views show L's rank column as L), and L stays in the tree, unlabelled.
    Leaves that were not labels stay unlabelled.

    ``old_to_new`` is the *label* map: a sample labelled L goes to "L (other)"; every
    other node maps to its own copy. ``new_to_old`` maps "L (other)" back to L (and every
    copied node to its original), so predictions on the new tree translate back to the
    original internal label. The new id of L itself (as an internal node) is
    ``taxonomy.parent[old_to_new[L]]``.

    report: ``other_leaves_added``, ``n_nodes_before``, ``n_nodes_after``.
    """
    if not suffix:
        raise TaxonomyError("with_other_leaves needs a non-empty suffix to name the new leaves")
    n = tax.n_nodes
    internal = np.flatnonzero(tax.is_label & ~tax.is_leaf)
    k = len(internal)
    new_keys = tax.keys[internal] + "#other"
    clash = [key for key in new_keys.tolist() if key in tax._key_index]    # one check per internal label
    if clash:
        raise TaxonomyError(f"cannot add other-leaves: key {clash[0]!r} already exists in the taxonomy")
    parent = np.r_[tax.parent, internal]
    names = np.r_[tax.names, tax.names[internal] + suffix]
    ranks = np.r_[tax.ranks, np.full(k, "", dtype=object)]
    keys = np.r_[tax.keys, new_keys]
    is_label = np.r_[tax.is_label & tax.is_leaf, np.ones(k, dtype=bool)]
    new, order = Taxonomy.from_parents(parent, names.astype(object), ranks.astype(object), keys.astype(object),
                                       labels=is_label, rank_order=tax.rank_order, check_rank_order=False,
                                       return_order=True)
    pos = np.empty(n + k, dtype=np.int64)
    pos[order] = np.arange(n + k)
    o2n = pos[:n].copy()
    o2n[internal] = pos[n:]
    src = np.r_[np.arange(n), internal]
    new_to_old = src[order]
    return TransformResult(new, o2n, new_to_old, {
        "other_leaves_added": k, "n_nodes_before": n, "n_nodes_after": new.n_nodes})


def rename(tax: Taxonomy, mapping: Mapping[int | str, str]) -> TransformResult:
    """New display names: ``mapping`` from a node (id, name or key) to its new name.

    An ambiguous old name raises :class:`AmbiguousNameError` (use the key or id); an
    unknown one :class:`UnknownNameError`. Sibling order follows names, so ids may
    change: use ``old_to_new`` (a permutation). report: ``renamed``.
    """
    if not mapping:
        ident = np.arange(tax.n_nodes, dtype=np.int64)
        return TransformResult(tax, ident, ident.copy(), {"renamed": 0})
    targets = np.array([_node(tax, old) for old in mapping], dtype=np.int64)   # one look-up per edit
    new_names = [str(v) for v in mapping.values()]
    empty = [str(old) for old, nm in zip(mapping, new_names) if not nm.strip()]
    if empty:
        raise TaxonomyError(f"rename: empty new name for {', '.join(map(repr, empty[:5]))}")
    dup = np.flatnonzero(np.bincount(targets, minlength=tax.n_nodes) > 1)
    if len(dup):
        raise TaxonomyError(f"rename: node {tax.keys[dup[0]]!r} ({tax.names[dup[0]]!r}) is renamed twice "
                            "(by its name and by its key?)")
    names = tax.names.copy()
    names[targets] = np.array(new_names, dtype=object)
    keep = np.ones(tax.n_nodes, dtype=bool)
    new, o2n = _rebuild(tax, keep, tax.parent, tax.is_label, names=names)
    return TransformResult(new, o2n, _inverse(o2n, new.n_nodes),
                           {"renamed": int((names[targets] != tax.names[targets]).sum())})


def merge(tax: Taxonomy, source: int | str, target: int | str) -> TransformResult:
    """Merge ``source`` into ``target`` (ids, names or keys): the children of source move
    under target, source disappears and its samples map to target (``old_to_new[source]``).

    Raises if target is source or lies inside source's subtree (that would make a cycle).
    If source was a label, target becomes one. The rank order is re-checked when the
    input tree respects it (moving genera under a genus is an error). report: ``children_moved``, ``target_became_label``.
    """
    s = _node(tax, source)
    t = _node(tax, target)
    if s == 0:
        raise TaxonomyError("cannot merge the root into another node")
    if bool(tax.is_ancestor(s, t)):
        what = "itself" if s == t else f"its own descendant {tax.names[t]!r} ({tax.lineage(t)})"
        raise TaxonomyError(f"cannot merge {tax.names[s]!r} ({tax.lineage(s)}) into {what}: "
                            "pick a target outside the source's subtree")
    keep = np.ones(tax.n_nodes, dtype=bool)
    keep[s] = False
    parent = tax.parent.copy()
    kids = tax.children(s)
    parent[kids] = t
    is_label = tax.is_label.copy()
    became = bool(tax.is_label[s] and not tax.is_label[t])
    is_label[t] |= tax.is_label[s]
    new, o2n = _rebuild(tax, keep, parent, is_label)
    if tax.rank_order and _rank_order_ok(tax):     # report only conflicts the merge itself creates
        try:
            new.check_rank_order()
        except TaxonomyError as exc:
            raise TaxonomyError(f"merging {tax.names[s]!r} into {tax.names[t]!r} breaks the rank order: {exc}") from None
    new_to_old = _inverse(o2n, new.n_nodes)
    o2n[s] = o2n[t]
    return TransformResult(new, o2n, new_to_old, {"children_moved": len(kids), "target_became_label": int(became),
                                                  "n_nodes_before": tax.n_nodes, "n_nodes_after": new.n_nodes})


def prune_unlabelled(tax: Taxonomy) -> TransformResult:
    """Drop every subtree that contains no label node (``old_to_new`` = -1 there).

    The root always stays. report: ``dropped``, ``n_nodes_before``, ``n_nodes_after``.
    """
    keep = tax.subtree_sum(tax.is_label) > 0
    keep[0] = True
    new, o2n = _rebuild(tax, keep, tax.parent, tax.is_label)
    return TransformResult(new, o2n, _inverse(o2n, new.n_nodes), {
        "dropped": int((~keep).sum()), "n_nodes_before": tax.n_nodes, "n_nodes_after": new.n_nodes})
