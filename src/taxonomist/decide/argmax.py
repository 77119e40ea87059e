"""The flat rule: the most probable label (ties: the lower label index)."""

from __future__ import annotations

import numpy as np

from ..taxonomy import Taxonomy
from .base import Decision, check_label_probs


def argmax_decision(tax: Taxonomy, label_probs: object) -> Decision:
    """Choose ``argmax_i p(label_i)``; ``prob`` is the label's own probability plus its sub-labels' mass.

    For a leaf label that is just ``p(label)``. For an internal label (a class
    with child classes) the node's summed probability is reported, as for every
    other rule, so ``prob`` always means "probability that the answer lies in
    this subtree".
    """
    probs = check_label_probs(tax, label_probs)
    idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    nodes = tax.label_ids[idx]
    m = tax.marginalization_matrix()  # [n_labels, n_nodes]
    # subtree mass of each chosen label: the labels i with M[i, node] = 1
    sub = m[:, nodes].T.tocsr() if len(nodes) else None
    prob = np.asarray(sub.multiply(probs).sum(axis=1)).ravel() if sub is not None else np.zeros(0)
    return Decision(nodes.astype(np.int64), prob, ["label"] * len(nodes), "argmax", {})
