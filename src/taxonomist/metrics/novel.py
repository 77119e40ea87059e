"""Novel taxa: how a model places images of leaves it never saw.

Hold some leaves out of training; then show the model images of them. No answer
can be the held-out leaf itself, so the best possible answer is its deepest
ancestor that the model can name (usually its parent): the *best answer*
``b``. For each sample with held-out leaf ``h`` and predicted node ``p`` (from
any decision rule: argmax, threshold back-off, CRM, DARTS; see
:mod:`taxonomist.decide`), the placement is one of

* ``correct_ancestor``: ``p`` is a strict ancestor of ``h`` (a true statement
  about the image; ``at_best`` when ``p == b``, ``above_best`` otherwise: a
  shallower answer, or in the rare case of a node without training labels
  below ``b``, a deeper one, which shows as a negative depth gap);
* ``sibling``: ``p`` lies under ``b`` but not on ``h``'s lineage: the model
  forced the image into a known relative (the closed-set mistake);
* ``wrong_branch``: anywhere else (``p`` outside ``b``'s subtree).

This is the "place an unseen sample as deep as it safely can" goal of the
plankton thesis behind taxonomist, scored with the hierarchical correctness of
Goren et al. (NeurIPS 2024): a prediction is right when it is the truth or an
ancestor of it. ``novel_placement`` returns, over the samples:

* ``correct_ancestor``, ``at_best``, ``above_best``, ``sibling``,
  ``wrong_branch``, ``at_root``: fractions (the first four partition the
  samples with ``correct_ancestor = at_best + above_best``);
* ``mean_depth_gap``: mean ``depth(b) - depth(p)`` over the correct ancestors
  (0: as deep as possible; 1: one level too cautious);
* ``mean_relative_depth``: mean ``depth(p) / depth(b)`` over the correct
  ancestors (1 is ideal; 0 at the root);
* ``mean_depth``: mean depth of all answers; ``mean_path_distance``: mean
  edges between ``p`` and ``h``; ``mean_excess_distance``: the same minus the
  best answer's distance ``depth(h) - depth(b)`` (0 is ideal).

All of it is a handful of vectorised gathers (pre-order ancestor tests, LCA by
binary lifting); no loop over samples or nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from ..taxonomy import Taxonomy
from ._common import as_float, check_nodes

#: the placement categories, in the order of the codes returned by :func:`placement`
PLACEMENTS: tuple[str, ...] = ("at_best", "above_best", "sibling", "wrong_branch")


@dataclass(frozen=True)
class HeldOut:
    """A training tree with some leaves held out, and the maps between the two trees.

    ``full``: the complete tree; ``train``: the same tree without the held-out
    leaves (label flags kept); ``held_out``: the held-out leaves' ids in
    ``full``; ``train_to_full`` / ``full_to_train``: node id maps (``-1`` where a
    node does not exist on the other side).
    """

    full: Taxonomy
    train: Taxonomy
    held_out: np.ndarray
    train_to_full: np.ndarray
    full_to_train: np.ndarray

    def to_full(self, train_nodes: object) -> np.ndarray:
        """Predictions made on the training tree -> node ids of the full tree."""
        nodes = check_nodes(self.train, train_nodes, "predictions", allow_unknown=False)
        return self.train_to_full[nodes]

    @property
    def train_labels(self) -> np.ndarray:
        """The training tree's label nodes, as ids of the full tree."""
        return self.train_to_full[self.train.label_ids]


def hold_out_leaves(tax: Taxonomy, leaves: Iterable[int | str] | np.ndarray) -> HeldOut:
    """The training tree for a hold-out experiment: ``tax`` without ``leaves`` (ids, names or keys).

    Raises :class:`DataError` when a node is not a leaf, or when nothing would be left to train on.
    """
    from ..taxonomy.transforms import restrict

    arr = np.asarray(leaves if isinstance(leaves, np.ndarray) else list(leaves))
    ids = arr.astype(np.int64) if arr.dtype.kind in "iu" else tax.find_many([str(x) for x in arr.ravel()])
    ids = np.unique(check_nodes(tax, ids, "held-out leaves", allow_unknown=False))
    not_leaf = ids[~tax.is_leaf[ids]]
    if len(not_leaf):
        shown = ", ".join(repr(str(tax.names[v])) for v in not_leaf[:5])
        raise DataError(f"only leaves can be held out; {len(not_leaf)} node(s) have children: {shown}")
    if (ids == 0).any():
        raise DataError("the root cannot be held out")
    keep = np.ones(tax.n_nodes, dtype=bool)
    keep[ids] = False
    res = restrict(tax, np.flatnonzero(keep), labels="keep")
    if res.taxonomy.n_labels == 0:
        raise DataError("holding out these leaves leaves no label node to train on")
    return HeldOut(tax, res.taxonomy, ids, res.new_to_old, res.old_to_new)


def best_answers(tax: Taxonomy, leaf: object, train_labels: object | None = None) -> np.ndarray:
    """The deepest strict ancestor of each held-out ``leaf`` that has a training label in its subtree.

    ``train_labels``: node ids the model was trained on (default: the label nodes of
    ``tax`` other than the given leaves). The root always qualifies.
    """
    leaf = check_nodes(tax, leaf, "held-out leaves", allow_unknown=False)
    if train_labels is None:
        mask = tax.is_label.copy()
        mask[leaf] = False
    else:
        mask = np.zeros(tax.n_nodes, dtype=bool)
        mask[check_nodes(tax, train_labels, "training labels", allow_unknown=False)] = True
    reachable = tax.subtree_sum(mask) > 0
    reachable[0] = True
    anc = tax.ancestor_matrix(leaf)                      # [N, depth+1], root first
    ok = (anc >= 0) & reachable[np.maximum(anc, 0)]
    ok[np.arange(len(leaf)), tax.depth[leaf]] = False    # strict ancestors only
    deepest = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    return anc[np.arange(len(leaf)), deepest]


def placement(tax: Taxonomy, pred: object, leaf: object, best: object) -> np.ndarray:
    """Code per sample: index into :data:`PLACEMENTS` (0 at_best, 1 above_best, 2 sibling, 3 wrong_branch)."""
    leaf = check_nodes(tax, leaf, "held-out leaves", allow_unknown=False)
    pred = check_nodes(tax, pred, "predictions", n=len(leaf), allow_unknown=False)
    best = check_nodes(tax, best, "best answers", n=len(leaf), allow_unknown=False)
    anc = tax.is_ancestor(pred, leaf) & (pred != leaf)
    under_best = tax.is_ancestor(best, pred)
    code = np.full(len(leaf), 3, dtype=np.int64)
    code[under_best & ~anc] = 2
    code[anc] = 1
    code[anc & (pred == best)] = 0
    return code


def novel_placement(tax: Taxonomy, pred: object, leaf: object, train_labels: object | None = None
                    ) -> dict[str, Any]:
    """Scores of predictions ``pred`` for images of held-out leaves ``leaf`` (node ids of ``tax``).

    ``pred`` must be node ids of the same tree (map predictions made on a training
    tree with :meth:`HeldOut.to_full`, or by key). ``train_labels`` as in
    :func:`best_answers`. Keys: see the module docstring; ``n`` is the number of samples.
    """
    leaf = check_nodes(tax, leaf, "held-out leaves", allow_unknown=False)
    pred = check_nodes(tax, pred, "predictions", n=len(leaf), allow_unknown=False)
    n = len(leaf)
    if n == 0:
        raise DataError("novel_placement needs at least one sample")
    is_leaf = tax.is_leaf[leaf]
    if not is_leaf.all():
        v = int(leaf[~is_leaf][0])
        raise DataError(f"held-out truth {tax.names[v]!r} (node {v}) is not a leaf; novel-taxon evaluation "
                        "scores images of leaves the model never saw")
    best = best_answers(tax, leaf, train_labels)
    code = placement(tax, pred, leaf, best)
    frac = np.bincount(code, minlength=len(PLACEMENTS)) / n
    correct = code <= 1
    depth = tax.depth
    path = depth[pred] + depth[leaf] - 2 * depth[tax.lca(pred, leaf)]
    out: dict[str, Any] = {"n": int(n)}
    out["correct_ancestor"] = as_float(correct.mean())
    out.update({name: as_float(f) for name, f in zip(PLACEMENTS, frac)})
    out["at_root"] = as_float(np.mean(pred == 0))
    if correct.any():
        gap = depth[best[correct]] - depth[pred[correct]]
        rel = depth[pred[correct]] / np.maximum(depth[best[correct]], 1)
        out["mean_depth_gap"] = as_float(gap.mean())
        out["mean_relative_depth"] = as_float(np.where(depth[best[correct]] > 0, rel, 1.0).mean())
    else:
        out["mean_depth_gap"] = out["mean_relative_depth"] = None
    out["mean_depth"] = as_float(depth[pred].mean())
    out["mean_best_depth"] = as_float(depth[best].mean())
    out["mean_path_distance"] = as_float(path.mean())
    out["mean_excess_distance"] = as_float((path - (depth[leaf] - depth[best])).mean())
    return out


def novel_metrics(tax: Taxonomy, decisions: Mapping[str, object], leaf: object,
                  train_labels: object | None = None) -> dict[str, Any]:
    """:func:`novel_placement` for several decision rules: ``{name: Decision or node ids}`` ->
    one flat dict with keys ``<name>/<key>``."""
    out: dict[str, Any] = {}
    for name, dec in decisions.items():
        nodes = getattr(dec, "node", dec)
        for k, v in novel_placement(tax, nodes, leaf, train_labels).items():
            out[f"{name}/{k}"] = v
    return out
