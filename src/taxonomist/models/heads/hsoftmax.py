"""The path-product hierarchical softmax head (``hsoftmax``).

One logit per branch of the tree; a softmax among the siblings of every internal
node gives ``p(v | parent(v))``, and a node's probability is the product of
these conditionals along its root path (Morin & Bengio, AISTATS 2005,
"Hierarchical probabilistic neural network language model"; Goodman 2001;
Redmon & Farhadi's WordTree, YOLO9000, CVPR 2017)::

    log p(v | x) = sum_{u on the path root -> v, u != root} log softmax_{siblings of u}(z)_u

**Internal label nodes.** A label that is an internal node ("copepod_calanoid",
not further resolved) needs probability mass of its own, beside its children's.
Every internal label node ``u`` gets one extra slot in its children's sibling
group, its **stop** (or "other") branch: ``p(u as a label) = p(u) * p(stop | u)``.
This is the hierarchical softmax on ``taxonomy.transforms.with_other_leaves(tax)``
(where the stop branch is the leaf "u (other)"), computed without building that tree.
Label probabilities are then exact path products and sum to 1 over the label nodes.

**Nodes without labels.** A node with no label node in its subtree cannot be any
sample's answer; it gets no branch (probability 0) so no mass leaks out of the labels.
A sibling group with a single branch (a single-child chain, or an internal label whose
only children are unlabelled) has conditional probability 1 and no parameters.

Vectorised: the sibling softmax is a segment log-sum-exp over the branches grouped by
parent (``scatter_reduce`` + ``index_add``: O(batch x branches), no padding to the
widest node), and the path products are one gather per depth level
(:class:`~taxonomist.models.tree_tensors.DepthLevels`). ``node_probs`` are the path
products themselves: the subtree mass of every node (the root is 1, a node is the sum of
its children plus its own stop mass), without the marginalisation matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ...taxonomy import Taxonomy
from ..tree_tensors import ColumnSums, DepthLevels, covered_nodes, segment_log_softmax, segment_logsumexp
from .base import Head, register_head


def branch_structure(taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """The branches of the hierarchical softmax (module docstring), as index arrays.

    Returns ``node`` (node id of each learnable branch; for a stop branch, the internal
    label node it belongs to), ``group`` (the parent node whose children's softmax the
    branch belongs to; for a stop branch the label node itself), ``is_stop``,
    ``stops`` (the internal label nodes, id order), ``free_stop`` (position of each
    internal label's stop among the branches, -1 when its group has only that branch)
    and ``base`` (per node: 0 for nodes with a label in their subtree, -inf otherwise;
    the conditional log-probability of a branch without parameters).
    """
    covered = covered_nodes(taxonomy)
    nodes = np.flatnonzero(covered[1:]) + 1
    stops = taxonomy.label_ids[~taxonomy.is_leaf[taxonomy.label_ids]]
    node = np.r_[nodes, stops].astype(np.int64)
    group = np.r_[taxonomy.parent[nodes], stops].astype(np.int64)
    is_stop = np.r_[np.zeros(len(nodes), dtype=bool), np.ones(len(stops), dtype=bool)]
    size = np.bincount(group, minlength=taxonomy.n_nodes)
    free = size[group] >= 2
    free_stop = np.full(len(stops), -1, dtype=np.int64)
    free_pos = np.cumsum(free) - 1
    free_stop[free[len(nodes):]] = free_pos[len(nodes):][free[len(nodes):]]
    base = np.where(covered, 0.0, -np.inf).astype(np.float32)
    return {"node": node[free], "group": group[free], "is_stop": is_stop[free], "stops": stops,
            "free_stop": free_stop, "base": base}


def _target_branch_table(taxonomy: Taxonomy, node_branch: np.ndarray, s: dict[str, np.ndarray],
                         free_stop: np.ndarray, n_branches: int) -> np.ndarray:
    """``[n_nodes, max_depth + 1]`` branch positions per node: the branches on its root path (depth
    1..d) and, for a label node with a free stop branch, that stop in the last column; ``n_branches``
    elsewhere (the padding branch). A node without a branch of its own on the path adds nothing."""
    n, depth = taxonomy.n_nodes, taxonomy.max_depth
    anc = taxonomy.ancestor_matrix(np.arange(n))                       # [n_nodes, depth + 1], -1 below
    table = np.where(anc >= 0, node_branch[np.maximum(anc, 0)], -1)[:, 1:]
    stop_col = np.full(n, -1, dtype=np.int64)
    stop_col[s["stops"]] = free_stop
    table = np.concatenate([table, stop_col[:, None]], axis=1)
    return np.where(table >= 0, table, n_branches).astype(np.int64)


@register_head("hsoftmax")
class HierarchicalSoftmaxHead(Head):
    """Path-product hierarchical softmax over the tree (module docstring).

    Output key ``"branches"``: ``[B, n_branches]`` logits, one per learnable branch
    (``branch_nodes`` gives the node of each, ``branch_is_stop`` marks the stop branches
    of internal label nodes). Options: ``bias`` (True), ``dropout`` on the input (0).
    Extra methods: ``conditional_log_probs`` (``log p(v | parent)``), ``stop_log_probs``,
    ``path_log_probs`` (``log p(v)``, the subtree mass).
    """

    def __init__(self, taxonomy: Taxonomy, in_features: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features)
        s = branch_structure(taxonomy)
        self.n_branches = len(s["node"])
        self.n_stops = len(s["stops"])
        self.register_buffer("branch_nodes", torch.from_numpy(s["node"]), persistent=False)
        self.register_buffer("branch_groups", torch.from_numpy(s["group"]), persistent=False)
        # the softmax groups numbered 0..n_groups-1 (only parents with branches: most nodes are leaves)
        _, group_code = np.unique(s["group"], return_inverse=True)
        self.n_groups = int(group_code.max()) + 1 if len(group_code) else 0
        self.register_buffer("group_code", torch.from_numpy(group_code.astype(np.int64)), persistent=False)
        self.register_buffer("branch_is_stop", torch.from_numpy(s["is_stop"]), persistent=False)
        self.register_buffer("base", torch.from_numpy(s["base"]), persistent=False)
        free_stop = s["free_stop"]
        self.register_buffer("stop_branch", torch.from_numpy(free_stop[free_stop >= 0]), persistent=False)
        self.register_buffer("stop_slot", torch.from_numpy(np.flatnonzero(free_stop >= 0)), persistent=False)
        is_stop = s["is_stop"]
        self.register_buffer("child_branch", torch.from_numpy(np.flatnonzero(~is_stop)), persistent=False)
        self.register_buffer("child_node", torch.from_numpy(s["node"][~is_stop]), persistent=False)
        label_ids = taxonomy.label_ids
        self.register_buffer("label_ids", torch.from_numpy(label_ids.astype(np.int64)), persistent=False)
        self.levels_op = DepthLevels(taxonomy)
        # log p(label) = the sum of the branch log-probabilities on its root path (+ its stop branch for an
        # internal label): one sparse product from the branch log-probabilities
        node_branch = np.full(taxonomy.n_nodes, -1, dtype=np.int64)
        node_branch[s["node"][~is_stop]] = np.flatnonzero(~is_stop)
        anc = taxonomy.ancestor_matrix(label_ids)
        lab, dep = np.nonzero(anc >= 0)
        keep = dep > 0  # the root has no branch
        out_idx = [lab[keep], taxonomy.label_index[s["stops"]][free_stop >= 0]]
        in_idx = [node_branch[anc[lab[keep], dep[keep]]], free_stop[free_stop >= 0]]
        out_all, in_all = np.concatenate(out_idx), np.concatenate(in_idx)
        has = in_all >= 0  # a node without a branch of its own (see branch_structure) adds log 1 = 0
        self.label_sum = ColumnSums(out_all[has], in_all[has], taxonomy.n_labels, self.n_branches)
        # log p(branch | group) = z_branch - logsumexp_group(z), so log p(label) = (sum of the path's
        # branch logits) - (sum of the path's group logsumexps): two sparse products, the second
        # over the [B, n_groups] logsumexps, with no [B, n_branches] log-softmax in between
        self.group_sum = ColumnSums(out_all[has], group_code[in_all[has]], taxonomy.n_labels, self.n_groups)
        # per target node, the branches whose conditionals multiply to its likelihood: the root path's
        # branches, plus the stop branch for a label node with one (a label target means "this node,
        # not further resolved"; a partial target the whole subtree). Padded with n_branches, which
        # points at a zero logit and an empty group (log 1 = 0)
        table = _target_branch_table(taxonomy, node_branch, s, free_stop, self.n_branches)
        self.register_buffer("target_branches", torch.from_numpy(table), persistent=False)
        self.register_buffer("target_groups", torch.from_numpy(np.r_[group_code, self.n_groups][table]),
                             persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(self.in_features, self.n_branches, bias=bias)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("branches",)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        # computed node-major ([n_branches, B], ``W @ x.T``) and returned as its [B, n_branches] view: the
        # sibling reductions then move contiguous batch rows (tree_tensors.segment_logsumexp, "Layout")
        x = self.dropout(features)
        w, bias = self.linear.weight, self.linear.bias
        zt = w @ x.t() if bias is None else torch.addmm(bias.unsqueeze(1), w, x.t())
        return {"branches": zt.t()}

    def _node_major(self, outputs: dict[str, Tensor]) -> Tensor:
        """The branch logits as float32 ``[n_branches, B]`` (free for this head's own outputs)."""
        return outputs["branches"].float().t().contiguous()

    def _group_lse(self, zt: Tensor) -> Tensor:
        return segment_logsumexp(zt, self.group_code, self.n_groups, dim=0)        # [n_groups, B]

    def _branch_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        zt = self._node_major(outputs)
        return segment_log_softmax(zt, self.group_code, self.n_groups, dim=0).t()

    def conditional_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """``log p(v | parent(v))`` per node, [B, n_nodes] float32; 0 at the root, -inf for nodes
        without labels below them. For an internal label node the children's conditionals
        share their group with its stop branch (:meth:`stop_log_probs`)."""
        cond = self._branch_log_probs(outputs)
        b = cond.shape[0]
        return self.base.unsqueeze(0).expand(b, -1).index_add(1, self.child_node, cond.index_select(1, self.child_branch))

    def stop_log_probs(self, outputs: dict[str, Tensor], cond: Tensor | None = None) -> Tensor:
        """``log p(stop | u)`` for every internal label node u (id order), [B, n_internal_labels]."""
        cond = self._branch_log_probs(outputs) if cond is None else cond
        out = cond.new_zeros(cond.shape[0], self.n_stops)
        return out.index_add(1, self.stop_slot, cond.index_select(1, self.stop_branch))

    def path_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """``log p(v)``: the log subtree mass of every node, [B, n_nodes] float32 (root 0)."""
        return self._paths(outputs)[0]

    def _paths(self, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        cond = self._branch_log_probs(outputs)
        b = cond.shape[0]
        node_cond = self.base.unsqueeze(0).expand(b, -1).index_add(1, self.child_node, cond.index_select(1, self.child_branch))
        return self.levels_op.path_sum(node_cond), self.stop_log_probs(outputs, cond)

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        zt = self._node_major(outputs)
        return self.label_sum(zt.t()) - self.group_sum(self._group_lse(zt).t())

    def target_log_likelihood(self, outputs: dict[str, Tensor], targets: Tensor) -> Tensor:
        """``log P(target | x)`` as a path product over the target's own branches, [B] float32.

        ``sum_b z_b - sum_b logsumexp_{group(b)}(z)`` over the branches of the target's root path
        (and its stop branch for a label target): the same number as :meth:`label_log_probs` gives
        (a partial target: the log of its subtree's label mass), with O(B x depth) gathers after the
        group log-sum-exps instead of the [B, n_labels] distribution.
        """
        zt = self._node_major(outputs)
        pad = zt.new_zeros(1, zt.shape[1])
        own = torch.cat([zt, pad]).gather(0, self.target_branches[targets].t())          # [depth + 1, B]
        norm = torch.cat([self._group_lse(zt), pad]).gather(0, self.target_groups[targets].t())
        return (own - norm).sum(dim=0)

    def node_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """The path products: each node's subtree mass (exactly the marginal of the label distribution)."""
        return self.path_log_probs(outputs).exp()
