"""Novel taxa (taxonomist.metrics.novel) on the real NDSB plankton tree, with synthetic probabilities.

Leaves are held out of a real tree; a "model" trained without them puts most of
its mass under the held-out leaf's parent. The expected placements are derived
by hand from that construction and checked against a slow pure-Python reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import decide
from taxonomist.errors import DataError
from taxonomist.metrics.novel import (
    PLACEMENTS,
    best_answers,
    hold_out_leaves,
    novel_metrics,
    novel_placement,
    placement,
)
from taxonomist.taxonomy import load


@pytest.fixture(scope="module")
def tax(plankton_dir):
    return load(plankton_dir / "taxonomy.txt")


def _held_leaves(tax, n=6):
    """One leaf from each of the first ``n`` unlabelled parents (by id) whose 3+ children are all leaf labels.

    After holding it out, each such parent keeps 2+ leaf-label children and nothing in between.
    """
    out = []
    for p in tax.internal_nodes:
        kids = tax.children(p)
        if p != 0 and not tax.is_label[p] and len(kids) >= 3 and tax.is_leaf[kids].all() and tax.is_label[kids].all():
            out.append(int(kids[0]))
        if len(out) == n:
            break
    assert len(out) == n
    return np.array(out)


# ------------------------------------------------------------------ slow references
def ref_ancestors(tax, v):
    out = []
    while v >= 0:
        out.append(int(v))
        v = int(tax.parent[v])
    return out  # self first, root last


def ref_best(tax, leaf, train_labels):
    train = set(int(x) for x in train_labels)
    for a in ref_ancestors(tax, leaf)[1:]:
        sub = np.flatnonzero(tax.descendants_mask(a))
        if a == 0 or any(int(u) in train for u in sub):
            return a
    return 0


def ref_code(tax, pred, leaf, best):
    anc_leaf = ref_ancestors(tax, leaf)[1:]
    if pred in anc_leaf:
        return 0 if pred == best else 1
    if best in ref_ancestors(tax, pred):
        return 2
    return 3


# ------------------------------------------------------------------ tests
def test_hold_out_builds_training_tree(tax):
    held = _held_leaves(tax)
    h = hold_out_leaves(tax, held)
    assert h.train.n_nodes == tax.n_nodes - len(held)
    assert h.train.n_labels == tax.n_labels - len(held)
    # the maps are consistent: every training node maps to the full node with the same key
    assert (tax.keys[h.train_to_full] == h.train.keys).all()
    assert (h.full_to_train[held] == -1).all()
    assert set(h.train_labels.tolist()) == set(tax.label_ids.tolist()) - set(held.tolist())
    # names are accepted as well as ids
    h2 = hold_out_leaves(tax, [str(tax.names[v]) for v in held])
    assert h2.train.fingerprint == h.train.fingerprint


def test_hold_out_rejects_internal_nodes(tax):
    internal = int(tax.internal_nodes[1])
    with pytest.raises(DataError, match="only leaves"):
        hold_out_leaves(tax, [internal])


def test_synthetic_model_places_unseen_leaves(tax):
    """Mass 0.9 under the parent of the unseen leaf: argmax picks a known sibling, back-off finds the parent."""
    held = _held_leaves(tax)
    h = hold_out_leaves(tax, held)
    train = h.train
    leaf = np.repeat(held, 3)
    n = len(leaf)
    probs = np.zeros((n, train.n_labels))
    for i, v in enumerate(leaf):
        parent_train = h.full_to_train[tax.parent[v]]
        under = train.descendants_mask(int(parent_train))[train.label_ids]
        probs[i, under] = 0.9 / under.sum()
        probs[i, ~under] = 0.1 / (~under).sum()
    decisions = {
        "argmax": h.to_full(decide(train, probs, "argmax").node),
        "backoff": h.to_full(decide(train, probs, "threshold", threshold=0.85).node),
        "cautious": h.to_full(decide(train, probs, "threshold", threshold=0.95).node),
    }
    m = novel_metrics(tax, decisions, leaf, h.train_labels)
    # argmax always names a known sibling: never a true statement about the image
    assert m["argmax/sibling"] == 1.0 and m["argmax/correct_ancestor"] == 0.0
    # threshold 0.85 < 0.9: exactly the parent, the best possible answer
    assert m["backoff/at_best"] == 1.0 and m["backoff/mean_depth_gap"] == 0.0
    assert m["backoff/mean_relative_depth"] == 1.0
    assert m["backoff/mean_excess_distance"] == 0.0
    assert m["backoff/mean_path_distance"] == 1.0        # parent -> leaf
    # threshold 0.95 > 0.9: climbs above the parent, still correct but shallower
    assert m["cautious/correct_ancestor"] == 1.0 and m["cautious/at_best"] == 0.0
    assert m["cautious/above_best"] == 1.0
    assert m["cautious/mean_depth_gap"] >= 1.0
    for name in decisions:
        assert m[f"{name}/n"] == n
        total = sum(m[f"{name}/{p}"] for p in PLACEMENTS)
        assert total == pytest.approx(1.0)


def test_placement_matches_reference_on_random_predictions(tax):
    rng = np.random.default_rng(7)
    held = _held_leaves(tax)
    train_labels = np.setdiff1d(tax.label_ids, held)
    leaf = rng.choice(held, 300)
    pred = rng.integers(0, tax.n_nodes, 300)
    # make a third of the predictions ancestors of the leaf, so every category occurs
    anc = tax.ancestor_matrix(leaf)
    k = rng.integers(0, tax.depth[leaf])                 # strict ancestors
    pred[:100] = anc[np.arange(100), k[:100]]
    best = best_answers(tax, leaf, train_labels)
    ref_b = [ref_best(tax, int(v), train_labels) for v in leaf]
    assert best.tolist() == ref_b
    codes = placement(tax, pred, leaf, best)
    ref_codes = [ref_code(tax, int(p), int(v), int(b)) for p, v, b in zip(pred, leaf, best)]
    assert codes.tolist() == ref_codes
    assert set(codes.tolist()) == {0, 1, 2, 3}
    m = novel_placement(tax, pred, leaf, train_labels)
    ref_codes = np.array(ref_codes)
    for j, name in enumerate(PLACEMENTS):
        assert m[name] == pytest.approx(np.mean(ref_codes == j))
    ok = ref_codes <= 1
    gaps = [tax.depth[b] - tax.depth[p] for p, b, o in zip(pred, best, ok) if o]
    assert m["mean_depth_gap"] == pytest.approx(np.mean(gaps))
    dist = [len(set(ref_ancestors(tax, p)) ^ set(ref_ancestors(tax, v))) for p, v in zip(pred, leaf)]
    assert m["mean_path_distance"] == pytest.approx(np.mean(dist))
    assert m["at_root"] == pytest.approx(np.mean(pred == 0))


def test_best_answer_skips_parents_without_training_labels(tax):
    """Hold out every child of a parent whose children are all leaves: the best answer is the grandparent."""
    internal = [int(p) for p in tax.internal_nodes if p != 0 and not tax.is_label[p]
                and tax.is_leaf[tax.children(p)].all() and tax.n_children[p] >= 2]
    p = internal[0]
    kids = tax.children(p)
    h = hold_out_leaves(tax, kids)
    best = best_answers(tax, kids, h.train_labels)
    assert (best == tax.parent[p]).all()
    assert best.tolist() == [ref_best(tax, int(v), h.train_labels) for v in kids]
    # predicting the (now empty) parent is still a correct ancestor, deeper than the best answer
    m = novel_placement(tax, np.full(len(kids), p), kids, h.train_labels)
    assert m["correct_ancestor"] == 1.0 and m["mean_depth_gap"] == -1.0


def test_novel_placement_rejects_internal_truths(tax):
    with pytest.raises(DataError, match="not a leaf"):
        novel_placement(tax, [0], [int(tax.internal_nodes[1])])
