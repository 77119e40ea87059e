"""DARTS (Deng, Krause, Berg & Fei-Fei, "Hedging your bets: optimizing accuracy-specificity
trade-offs in large scale visual recognition", CVPR 2012).

Every node ``v`` has a reward ``r(v) = log2(#leaves) - log2(#leaves under v)``
(information gain in bits: 0 at the root, ``log2(#leaves)`` at a leaf). For a
given ``lam >= 0`` the decision is ``argmax_v (r(v) + lam) * p(v)`` over all
nodes, ``p(v)`` the summed probability of v's subtree. ``lam = 0`` maximises the
expected reward; a large ``lam`` favours probable (shallow) nodes and so
accuracy. :func:`taxonomist.decide.fit_darts_lambda` finds the smallest ``lam``
reaching a target accuracy on validation data by bisection (Deng et al., Alg. 1).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..taxonomy import Taxonomy
from .base import CHUNK_ELEMS, Decision, check_label_probs, node_prob_chunks_t


def info_gain(tax: Taxonomy) -> np.ndarray:
    """``r(v) = log2(#leaves) - log2(#leaves under v)`` for every node."""
    return np.log2(len(tax.leaves)) - np.log2(tax.n_leaves_under)


def darts_choice(tax: Taxonomy, probs: np.ndarray, lam: float,
                 chunk_elems: int = CHUNK_ELEMS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node, prob, score) of ``argmax_v (r(v) + lam) p(v)`` per row (ties: lowest node id)."""
    r = info_gain(tax) + lam
    n = len(probs)
    node = np.empty(n, dtype=np.int64)
    prob = np.empty(n)
    score = np.empty(n)
    for lo, hi, pt in node_prob_chunks_t(tax, probs, chunk_elems):
        s = np.ascontiguousarray((pt * r[:, None]).T)  # [rows, n_nodes]: a contiguous scan per row
        j = s.argmax(axis=1)
        rows = np.arange(hi - lo)
        node[lo:hi], prob[lo:hi], score[lo:hi] = j, pt[j, rows], s[rows, j]
    return node, prob, score


def darts_decision(tax: Taxonomy, label_probs: object, lam: float = 0.0,
                   chunk_elems: int = CHUNK_ELEMS) -> Decision:
    """DARTS decision for a fixed ``lam`` (fit it with :func:`fit_darts_lambda`)."""
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"DARTS lam must be a number >= 0, got {lam!r}") from None
    if not np.isfinite(lam) or lam < 0:
        raise ConfigError(f"DARTS lam must be a finite number >= 0, got {lam}")
    probs = check_label_probs(tax, label_probs)
    node, prob, score = darts_choice(tax, probs, lam, chunk_elems)
    return Decision(node, prob, ["darts"] * len(node), "darts", {"lam": lam}, score)
