"""Losses for the multi-hot formulation: one sigmoid per tree node (head output ``"nodes"``).

The target of a sample with target node ``t`` is the multi-hot of its root path: every
ancestor-or-self of ``t`` is positive, every other node negative. The root (always positive)
is left out. For a **partial label** (``t`` not a label node: "one of the labels under t")
the nodes below ``t`` are unknown, not negative: they are **masked out** of the loss, so a
sample known only to genus never teaches that its species is absent. An internal label node
("this node, not further resolved") keeps its descendants as negatives.

Per-node terms (``z`` the logit, ``p = sigmoid(z)``, ``y`` the multi-hot):

* ``hier_bce``: binary cross-entropy (the plankton thesis design; after arXiv 2502.03591);
* ``focal`` (Lin et al., ICCV 2017): ``-a_t (1 - p_t)^gamma log p_t`` with ``p_t = p`` for
  positives and ``1 - p`` for negatives, ``a_t = a`` / ``1 - a`` (``a = None``: 1);
* ``asymmetric`` (Ridnik et al., ICCV 2021, arXiv 2009.14119, eq. 3-6): positives
  ``(1 - p)^gamma_pos * -log p``; negatives use the shifted probability
  ``p_m = max(p - clip, 0)``: ``p_m^gamma_neg * -log(1 - p_m)``.

A sample's loss is the sum over its unmasked nodes (the usual multi-label form, so each logit's
gradient does not shrink with the size of the tree); the batch loss is the mean over samples.

**Max constraint loss** (``constraint="mcm"``; C-HMCNN, Giunchiglia & Lukasiewicz, NeurIPS 2020,
"Coherent hierarchical multi-label classification networks"). With ``D(v)`` the subtree of ``v``
(``v`` included), the per-node term is taken not on ``p_v`` but on::

    h_v = y_v * max_{u in D(v)} (y_u * p_u) + (1 - y_v) * max_{u in D(v)} p_u

(MCLoss): a negative node is charged for the highest score in its subtree, a positive node is
credited with the best *positive* descendant. The max commutes with the sigmoid, so it is done on
the logits: for the negatives ``DepthLevels.subtree_max`` (one ``scatter_reduce(amax)`` per depth
level), taken as a gather of each node's maximiser (:func:`subtree_argmax`); for the positives,
whose positive descendants are exactly the path nodes below them, a reverse ``cummax`` along the
``[B, depth]`` root path. The gradient goes to the node attaining the max (one of them on a tie),
as in the paper. Partial labels keep their mask: the unknown nodes below ``t`` enter no term
(they are neither negatives nor positive descendants; a negative node never has unknown nodes
below it). ``constraint="none"`` (default) is the plain per-node loss on ``p``. At inference
the ``multilabel`` head's ``node_probs`` already apply the same max (coherent scores).

Hierarchy terms (all three losses; on by default for ``hier_bce`` only), always on the raw
``p = sigmoid(z)``:

* **violations** (``violation_weight``): a child predicted positive while its parent is
  negative. ``violation="soft"`` adds ``sum_v relu(p_v - p_parent(v))`` over every non-root
  parent (vectorised with one parent-index gather); ``violation="count"`` adds the design
  doc's fixed penalty per violating pair (``p_v > threshold > p_parent``): a count, constant
  in the parameters, so it changes the reported loss but not the gradient.
* **distance** (``distance_weight``, off by default): ``D(v*, t) * p(v*)`` where ``v*`` is the
  deepest node predicted positive (``p > threshold``; ties by probability). It is charged only
  when ``v*`` is off the target's path (and, for a partial target, not below it): an ancestor of
  the truth is a correct, only less specific, answer and is left to the BCE term. The
  design doc adds the bare distance (no gradient); multiplying by ``p(v*)`` lets it push the
  offending node down.

How it is computed (same values as the dense ``where(known, y * pos + (1 - y) * neg)``): the
negative term of every node is summed over the row, then the few path nodes swap their negative
term for their positive one (a ``[B, depth]`` gather), and only the rows with a partial target
build the mask of the nodes below it. No dense ``[B, n_nodes]`` multi-hot or mask is built for
label targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.heads.base import Head
from ..models.tree_tensors import DepthLevels
from ..taxonomy import Taxonomy
from .base import Loss, masked_mean, register_loss
from .tree_ops import NodeDistance, RootPaths

CONSTRAINTS = ("none", "mcm")
"""Values of the multi-hot losses' ``constraint`` option."""

_TINY = 1e-30


class _Softplus(torch.autograd.Function):
    """``log(1 + exp(x))`` as ``max(x, -log(max(sigmoid(-x), 1e-30)))``: the same values as
    ``F.softplus`` to ~1e-7 absolute, but built from vectorised CPU kernels (``F.softplus`` and
    ``log1p`` are scalar loops there, 5x slower than sigmoid + log). The max restores ``x`` where the
    sigmoid underflows (x > 69). Backward: ``grad * sigmoid(x)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        out = torch.sigmoid(-x).clamp_(min=_TINY).log_().neg_()
        return torch.maximum(out, x, out=out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.sigmoid(x).mul_(grad)


def softplus(x: Tensor) -> Tensor:
    """``-log(1 - sigmoid(x))`` = ``log(1 + exp(x))``, elementwise (:class:`_Softplus`)."""
    return _Softplus.apply(x)


def subtree_argmax(levels: DepthLevels, z: Tensor) -> Tensor:
    """``[B, n_nodes]`` int64: for each node v a node of v's subtree (v included) whose value is
    ``levels.subtree_max(z)[:, v]`` (v itself on a tie, else the winning child with the largest id).

    No gradient. ``z.gather(1, subtree_argmax(levels, z))`` is the subtree max with its gradient
    on one maximiser: one ``[B, n_nodes]`` scatter in the backward instead of the backward of a
    ``scatter_reduce(amax)`` per depth level (about half the cost on a 10k-node tree). Bottom-up,
    one level at a time: a node keeps its own id when it attains its subtree max, else takes the
    argmax of a child whose subtree max equals its own.
    """
    with torch.no_grad():
        h = levels.subtree_max(z)
        b, n = z.shape
        idx = torch.arange(n, device=z.device).expand(b, n).clone()
        for d in range(len(levels.bounds) - 2, -1, -1):
            lo, hi = levels.bounds[d]
            c_lo, c_hi = levels.bounds[d + 1]
            lp = levels.local_parent[c_lo:c_hi]
            hp = h[:, lo:hi]
            wins = h[:, c_lo:c_hi] == hp.index_select(1, lp)
            cand = torch.where(wins, idx[:, c_lo:c_hi], -1)
            best = torch.full_like(idx[:, lo:hi], -1).scatter_reduce_(1, lp.expand(b, -1), cand, "amax")
            own = (z[:, lo:hi] == hp) | (best < 0)
            idx[:, lo:hi] = torch.where(own, idx[:, lo:hi], best)
    return idx


def _power(x: Tensor, gamma: float) -> Tensor:
    """``x ** gamma`` with products for the small integer exponents (``pow`` is slow on CPU for 3, 4)."""
    if gamma == 1.0:
        return x
    if gamma == 2.0:
        return x * x
    if gamma == 4.0:
        sq = x * x
        return sq * sq
    return x.pow(gamma)


class NodeMultiHotLoss(Loss):
    """Base of the node multi-hot losses: targets, masks, the hierarchy terms. Task ``"nodes"``.

    Subclasses give the per-node term of a negative (:meth:`neg_terms`) and of a positive
    (:meth:`pos_terms`) as elementwise functions of the logits.
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, violation_weight: float, violation: str,
                 distance_weight: float, metric: str, ranks: Sequence[str] | None, threshold: float,
                 constraint: str = "none") -> None:
        super().__init__(taxonomy, head)
        if "nodes" not in head.tasks:
            raise ConfigError(f"loss {self.registry_name!r} needs a head with an output 'nodes' (one logit per "
                              f"tree node, e.g. 'multilabel'); the head "
                              f"{head.registry_name or type(head).__name__!r} has outputs {list(head.tasks)}")
        if violation not in ("soft", "count"):
            raise ConfigError(f"loss.violation={violation!r} must be 'soft' or 'count'")
        if not isinstance(constraint, str) or constraint not in CONSTRAINTS:
            raise ConfigError(f"loss.constraint={constraint!r} must be one of "
                              f"{', '.join(repr(c) for c in CONSTRAINTS)} ('mcm': the C-HMCNN max constraint loss)")
        for key, val in (("violation_weight", violation_weight), ("distance_weight", distance_weight)):
            if not float(val) >= 0.0:
                raise ConfigError(f"loss.{key}={val} must be >= 0")
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"loss.threshold={threshold} must be in (0, 1)")
        self.violation_weight = float(violation_weight)
        self.violation = violation
        self.distance_weight = float(distance_weight)
        self.threshold = float(threshold)
        self.constraint = constraint
        self.paths = RootPaths(taxonomy)
        self.levels = DepthLevels(taxonomy) if constraint == "mcm" else None
        self.register_buffer("parent", torch.from_numpy(taxonomy.parent.astype(np.int64)), persistent=False)
        self.register_buffer("depth", torch.from_numpy(taxonomy.depth.astype(np.int64)), persistent=False)
        self.register_buffer("preorder", torch.from_numpy(taxonomy.preorder.astype(np.int64)), persistent=False)
        self.register_buffer("size", torch.from_numpy(taxonomy.subtree_size.astype(np.int64)), persistent=False)
        self.register_buffer("is_label", torch.from_numpy(taxonomy.is_label.copy()), persistent=False)
        # (child, parent) pairs whose parent is not the root: the violation check. In canonical ids
        # (by depth) the children are one column range, read as a slice rather than a gather.
        kids = np.flatnonzero(taxonomy.parent > 0)
        contiguous = len(kids) > 0 and bool(np.array_equal(kids, np.arange(kids[0], kids[0] + len(kids))))
        self.vio_lo = int(kids[0]) if contiguous else None
        self.register_buffer("vio_child", torch.from_numpy(kids.astype(np.int64)), persistent=False)
        self.register_buffer("vio_parent", torch.from_numpy(taxonomy.parent[kids].astype(np.int64)),
                             persistent=False)
        self.node_distance = NodeDistance(taxonomy, metric, ranks) if self.distance_weight > 0 else None

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("nodes",)

    def multi_hot(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, known)``, both ``[B, n_nodes]``: the root-path multi-hot (float) and the mask of nodes
        that enter the loss (root and, for partial targets, the nodes below the target excluded).

        The dense form, for inspection and tests; :meth:`forward` does not build it."""
        path = self.paths(targets)
        y = torch.zeros(targets.shape[0], self.taxonomy.n_nodes, device=targets.device)
        y.scatter_(1, path.clamp(min=0), 1.0)                     # -1 padding lands on the root
        pre = self.preorder[None, :]
        pt = self.preorder[targets][:, None]
        below = (pre > pt) & (pre < pt + self.size[targets][:, None])
        partial = ~self.is_label[targets]
        known = ~(below & partial[:, None])
        known[:, 0] = False
        return y, known

    def neg_terms(self, z: Tensor) -> Tensor:
        """Per-node loss of a negative (``y = 0``) node with logit ``z``, elementwise."""
        raise NotImplementedError

    def pos_terms(self, z: Tensor) -> Tensor:
        """Per-node loss of a positive (``y = 1``) node with logit ``z``, elementwise."""
        raise NotImplementedError

    def node_terms(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-node loss ``[B, n_nodes]`` for a dense 0/1 target ``y`` (no constraint, no mask)."""
        return y * self.pos_terms(z) + (1 - y) * self.neg_terms(z)

    def violations(self, p: Tensor) -> Tensor:
        """``[B]`` violation penalty."""
        pc = p[:, self.vio_lo:] if self.vio_lo is not None else p.index_select(1, self.vio_child)
        pp = p.index_select(1, self.vio_parent)
        if self.violation == "soft":
            return torch.relu(pc - pp).sum(-1)
        return ((pc > self.threshold) & (pp <= self.threshold)).sum(-1).float()

    def distance_penalty(self, p: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` ``D(v*, t) * p(v*)`` for an off-path deepest positive ``v*`` (module docstring)."""
        with torch.no_grad():
            score = torch.where(p > self.threshold, self.depth[None, :].float() + p, torch.full_like(p, -1.0))
            score[:, 0] = -0.5                                  # nothing positive: the root (never charged)
            best = score.argmax(-1)
            pb, sb = self.preorder[best], self.size[best]
            pt, st = self.preorder[targets], self.size[targets]
            on_path = (pb <= pt) & (pt < pb + sb)                 # best is an ancestor-or-self of t
            below_partial = (pb > pt) & (pb < pt + st) & ~self.is_label[targets]
            d = self.node_distance(best, targets).float()
            charge = torch.where(on_path | below_partial, torch.zeros_like(d), d)
        return charge * p.gather(1, best[:, None])[:, 0]

    def node_loss(self, z: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """``[B]`` sum of the per-node terms over each sample's known nodes (with the constraint).

        ``targets`` are clamped (>= 0); rows that are not ``valid`` are computed but meaningless."""
        path = self.paths(targets)[:, 1:]                          # [B, max_depth], -1 below the target
        on = path >= 0
        pidx = torch.where(on, path, targets[:, None])             # padding -> t: harmless for the max
        h = z.gather(1, subtree_argmax(self.levels, z)) if self.levels is not None else z
        neg = self.neg_terms(h)                                    # every node as a negative
        per = neg[:, 1:].sum(-1)                                   # the root is never trained
        partial = valid & ~self.is_label[targets]
        if bool(partial.any()):
            # only these rows get a dense mask: the nodes strictly below t are unknown
            rows = partial.nonzero()[:, 0]
            tr = targets[rows]
            pre, pt = self.preorder[None, :], self.preorder[tr][:, None]
            below = (pre > pt) & (pre < pt + self.size[tr][:, None])
            kept = torch.where(below, torch.zeros((), dtype=neg.dtype, device=neg.device), neg.index_select(0, rows))
            per = per.index_copy(0, rows, kept[:, 1:].sum(-1))
        zp = z.gather(1, pidx)                                     # [B, max_depth], path logits
        if self.levels is not None:                                # best positive at or below each path node
            zp = zp.flip(1).cummax(1).values.flip(1)
        swap = self.pos_terms(zp) - neg.gather(1, pidx)            # path nodes are positives, not negatives
        return per + torch.where(on, swap, torch.zeros_like(swap)).sum(-1)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        z = outputs["nodes"].float()
        if z.shape[-1] != self.taxonomy.n_nodes:
            raise ConfigError(f"loss {self.registry_name!r}: output 'nodes' has {z.shape[-1]} columns, the "
                              f"taxonomy has {self.taxonomy.n_nodes} nodes")
        valid = targets >= 0
        t = targets.clamp(min=0).long()
        per = self.node_loss(z, t, valid)
        if self.violation_weight > 0 or self.distance_weight > 0:
            p = torch.sigmoid(z)
            if self.violation_weight > 0:
                per = per + self.violation_weight * self.violations(p)
            if self.distance_weight > 0:
                per = per + self.distance_weight * self.distance_penalty(p, t)
        return {"nodes": masked_mean(per, valid)}


@register_loss("hier_bce")
class HierarchicalBCE(NodeMultiHotLoss):
    """BCE over the root-path multi-hot + violation penalty (+ optional distance penalty).

    Options: ``violation_weight`` (default 1.0), ``violation`` (``soft`` / ``count``),
    ``distance_weight`` (default 0), ``metric`` (of the distance term; ``path``), ``ranks``,
    ``threshold`` (what counts as predicted positive, 0.5), ``pos_weight`` (weight of the positive
    terms, 1.0; >1 counters the many negatives of a large tree), ``constraint`` (``none`` /
    ``mcm``: the C-HMCNN max constraint loss, module docstring).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, violation_weight: float = 1.0, violation: str = "soft",
                 distance_weight: float = 0.0, metric: str = "path", ranks: Sequence[str] | None = None,
                 threshold: float = 0.5, pos_weight: float = 1.0, constraint: str = "none") -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold,
                         constraint)
        if not float(pos_weight) > 0.0:
            raise ConfigError(f"loss.pos_weight={pos_weight} must be > 0")
        self.pos_weight = float(pos_weight)

    def neg_terms(self, z: Tensor) -> Tensor:
        return softplus(z)                                                  # -log(1 - p)

    def pos_terms(self, z: Tensor) -> Tensor:
        out = softplus(-z)                                                  # -log p
        return out if self.pos_weight == 1.0 else self.pos_weight * out


@register_loss("focal")
class FocalMultiHot(NodeMultiHotLoss):
    """Sigmoid focal loss (Lin et al. 2017) over the root-path multi-hot.

    Options: ``gamma`` (2.0), ``balance`` (the paper's alpha for positives, None = no balancing;
    0.25 in the paper), ``constraint`` (``none`` / ``mcm``) and the hierarchy terms of
    :class:`HierarchicalBCE` (``violation_weight`` default 0 here).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, gamma: float = 2.0, balance: float | None = None,
                 violation_weight: float = 0.0, violation: str = "soft", distance_weight: float = 0.0,
                 metric: str = "path", ranks: Sequence[str] | None = None, threshold: float = 0.5,
                 constraint: str = "none") -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold,
                         constraint)
        if not float(gamma) >= 0.0:
            raise ConfigError(f"loss.gamma={gamma} must be >= 0")
        if balance is not None and not 0.0 < float(balance) < 1.0:
            raise ConfigError(f"loss.balance={balance} must be in (0, 1) or null")
        self.gamma = float(gamma)
        self.balance = None if balance is None else float(balance)

    def _focal(self, z: Tensor, weight: float | None) -> Tensor:
        """``w * sigmoid(z)^gamma * softplus(z)``: the term of a negative at ``z`` (a positive at ``-z``)."""
        out = softplus(z)                                                   # -log(1 - sigmoid(z))
        if self.gamma > 0:
            out = _power(torch.sigmoid(z), self.gamma) * out
        return out if weight is None else weight * out

    def neg_terms(self, z: Tensor) -> Tensor:
        return self._focal(z, None if self.balance is None else 1 - self.balance)

    def pos_terms(self, z: Tensor) -> Tensor:
        return self._focal(-z, self.balance)


@register_loss("asymmetric")
class AsymmetricMultiHot(NodeMultiHotLoss):
    """Asymmetric loss (Ridnik et al. 2021) over the root-path multi-hot.

    Options: ``gamma_pos`` (0), ``gamma_neg`` (4), ``clip`` (the probability margin m, 0.05; 0
    disables shifting), ``constraint`` (``none`` / ``mcm``) and the hierarchy terms
    (``violation_weight`` default 0 here).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                 clip: float = 0.05, violation_weight: float = 0.0, violation: str = "soft",
                 distance_weight: float = 0.0, metric: str = "path", ranks: Sequence[str] | None = None,
                 threshold: float = 0.5, constraint: str = "none") -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold,
                         constraint)
        for key, val in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg)):
            if not float(val) >= 0.0:
                raise ConfigError(f"loss.{key}={val} must be >= 0")
        if not 0.0 <= float(clip) < 1.0:
            raise ConfigError(f"loss.clip={clip} must be in [0, 1)")
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def neg_terms(self, z: Tensor) -> Tensor:
        if self.clip > 0:
            p_m = (torch.sigmoid(z) - self.clip).clamp(min=0)
            neg = -torch.log(1 - p_m)                                         # 1 - p_m >= clip > 0
        else:
            neg = softplus(z)                                               # -log(1 - p), stable
            if self.gamma_neg > 0:
                p_m = torch.sigmoid(z)
        return _power(p_m, self.gamma_neg) * neg if self.gamma_neg > 0 else neg

    def pos_terms(self, z: Tensor) -> Tensor:
        pos = softplus(-z)                                                  # -log p
        if self.gamma_pos > 0:
            pos = _power(torch.sigmoid(-z), self.gamma_pos) * pos                 # (1 - p)^gamma_pos
        return pos
