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

Hierarchy terms (all three losses; on by default for ``hier_bce`` only):

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.heads.base import Head
from ..taxonomy import Taxonomy
from .base import Loss, masked_mean, register_loss
from .tree_ops import NodeDistance, RootPaths


class NodeMultiHotLoss(Loss):
    """Base of the node multi-hot losses: targets, masks, the hierarchy terms. Task ``"nodes"``."""

    def __init__(self, taxonomy: Taxonomy, head: Head, violation_weight: float, violation: str,
                 distance_weight: float, metric: str, ranks: Sequence[str] | None, threshold: float) -> None:
        super().__init__(taxonomy, head)
        if "nodes" not in head.tasks:
            raise ConfigError(f"loss {self.registry_name!r} needs a head with an output 'nodes' (one logit per "
                              f"tree node, e.g. 'multilabel'); the head "
                              f"{head.registry_name or type(head).__name__!r} has outputs {list(head.tasks)}")
        if violation not in ("soft", "count"):
            raise ConfigError(f"loss.violation={violation!r} must be 'soft' or 'count'")
        for key, val in (("violation_weight", violation_weight), ("distance_weight", distance_weight)):
            if not float(val) >= 0.0:
                raise ConfigError(f"loss.{key}={val} must be >= 0")
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"loss.threshold={threshold} must be in (0, 1)")
        self.violation_weight = float(violation_weight)
        self.violation = violation
        self.distance_weight = float(distance_weight)
        self.threshold = float(threshold)
        self.paths = RootPaths(taxonomy)
        self.register_buffer("parent", torch.from_numpy(taxonomy.parent.astype(np.int64)), persistent=False)
        self.register_buffer("depth", torch.from_numpy(taxonomy.depth.astype(np.int64)), persistent=False)
        self.register_buffer("preorder", torch.from_numpy(taxonomy.preorder.astype(np.int64)), persistent=False)
        self.register_buffer("size", torch.from_numpy(taxonomy.subtree_size.astype(np.int64)), persistent=False)
        self.register_buffer("is_label", torch.from_numpy(taxonomy.is_label.copy()), persistent=False)
        # (child, parent) pairs whose parent is not the root: the violation check
        kids = np.flatnonzero(taxonomy.parent > 0)
        self.register_buffer("vio_child", torch.from_numpy(kids.astype(np.int64)), persistent=False)
        self.register_buffer("vio_parent", torch.from_numpy(taxonomy.parent[kids].astype(np.int64)),
                             persistent=False)
        self.node_distance = NodeDistance(taxonomy, metric, ranks) if self.distance_weight > 0 else None

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("nodes",)

    def multi_hot(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, known)``, both ``[B, n_nodes]``: the root-path multi-hot (float) and the mask of nodes
        that enter the loss (root and, for partial targets, the nodes below the target excluded)."""
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

    def node_terms(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-node loss ``[B, n_nodes]``."""
        raise NotImplementedError

    def violations(self, p: Tensor) -> Tensor:
        """``[B]`` violation penalty."""
        pc, pp = p.index_select(1, self.vio_child), p.index_select(1, self.vio_parent)
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

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        z = outputs["nodes"].float()
        if z.shape[-1] != self.taxonomy.n_nodes:
            raise ConfigError(f"loss {self.registry_name!r}: output 'nodes' has {z.shape[-1]} columns, the "
                              f"taxonomy has {self.taxonomy.n_nodes} nodes")
        valid = targets >= 0
        t = targets.clamp(min=0)
        y, known = self.multi_hot(t)
        per = torch.where(known, self.node_terms(z, y), torch.zeros_like(z)).sum(-1)
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
    terms, 1.0; >1 counters the many negatives of a large tree).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, violation_weight: float = 1.0, violation: str = "soft",
                 distance_weight: float = 0.0, metric: str = "path", ranks: Sequence[str] | None = None,
                 threshold: float = 0.5, pos_weight: float = 1.0) -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold)
        if not float(pos_weight) > 0.0:
            raise ConfigError(f"loss.pos_weight={pos_weight} must be > 0")
        self.pos_weight = float(pos_weight)

    def node_terms(self, z: Tensor, y: Tensor) -> Tensor:
        pw = None if self.pos_weight == 1.0 else z.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(z, y, reduction="none", pos_weight=pw)


@register_loss("focal")
class FocalMultiHot(NodeMultiHotLoss):
    """Sigmoid focal loss (Lin et al. 2017) over the root-path multi-hot.

    Options: ``gamma`` (2.0), ``balance`` (the paper's alpha for positives, None = no balancing;
    0.25 in the paper), and the hierarchy terms of :class:`HierarchicalBCE` (``violation_weight``
    default 0 here).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, gamma: float = 2.0, balance: float | None = None,
                 violation_weight: float = 0.0, violation: str = "soft", distance_weight: float = 0.0,
                 metric: str = "path", ranks: Sequence[str] | None = None, threshold: float = 0.5) -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold)
        if not float(gamma) >= 0.0:
            raise ConfigError(f"loss.gamma={gamma} must be >= 0")
        if balance is not None and not 0.0 < float(balance) < 1.0:
            raise ConfigError(f"loss.balance={balance} must be in (0, 1) or null")
        self.gamma = float(gamma)
        self.balance = None if balance is None else float(balance)

    def node_terms(self, z: Tensor, y: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(z, y, reduction="none")     # -log p_t
        p = torch.sigmoid(z)
        p_t = y * p + (1 - y) * (1 - p)
        out = (1 - p_t).pow(self.gamma) * nll if self.gamma > 0 else nll
        if self.balance is not None:
            out = (y * self.balance + (1 - y) * (1 - self.balance)) * out
        return out


@register_loss("asymmetric")
class AsymmetricMultiHot(NodeMultiHotLoss):
    """Asymmetric loss (Ridnik et al. 2021) over the root-path multi-hot.

    Options: ``gamma_pos`` (0), ``gamma_neg`` (4), ``clip`` (the probability margin m, 0.05; 0
    disables shifting), and the hierarchy terms (``violation_weight`` default 0 here).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                 clip: float = 0.05, violation_weight: float = 0.0, violation: str = "soft",
                 distance_weight: float = 0.0, metric: str = "path", ranks: Sequence[str] | None = None,
                 threshold: float = 0.5) -> None:
        super().__init__(taxonomy, head, violation_weight, violation, distance_weight, metric, ranks, threshold)
        for key, val in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg)):
            if not float(val) >= 0.0:
                raise ConfigError(f"loss.{key}={val} must be >= 0")
        if not 0.0 <= float(clip) < 1.0:
            raise ConfigError(f"loss.clip={clip} must be in [0, 1)")
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def node_terms(self, z: Tensor, y: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        pos = -F.logsigmoid(z)                                                # -log p
        if self.gamma_pos > 0:
            pos = (1 - p).pow(self.gamma_pos) * pos
        if self.clip > 0:
            p_m = (p - self.clip).clamp(min=0)
            neg = -torch.log1p(-p_m)                                          # 1 - p_m >= clip > 0
        else:
            p_m = p
            neg = -F.logsigmoid(-z)                                           # -log(1 - p), stable
        if self.gamma_neg > 0:
            neg = p_m.pow(self.gamma_neg) * neg
        return y * pos + (1 - y) * neg
