"""The hyperspherical multi-label head over all nodes (``multilabel``).

Every non-root node v is a binary "the sample is in v's subtree" output, as in the
multi-hot formulation of the plankton thesis: a target node t stands for the multi-hot
vector of its root path (t and its ancestors), which the loss builds (BCE, asymmetric
loss, ...). The logits are scaled cosines between the L2-normalised embedding and node
weights, with an angular margin on the positives inside the sigmoid, after Ke et al.
(ECCV 2022, "Hyperspherical learning in multi-label classification")::

    z_v = s * cos(theta_v + m)   for v on the target's root path (training, targets given)
    z_v = s * cos(theta_v)       otherwise
    (with ArcFace's guard for theta + m > pi, see ``arcface``)

Output key ``"nodes"``: ``[B, n_nodes]`` logits; column 0 (the root, always true) is the
constant ``s``. Partial targets (above the labels) get the margin on their known path
only; ``-1`` targets get none.

**Node probabilities** (``node_probs``) are *coherent sigmoid scores*, not subtree masses:
``p_hat(v) = sigmoid(max_{u in subtree(v)} z_u)``, the max constraint of C-HMCNN
(Giunchiglia & Lukasiewicz, NeurIPS 2020), computed bottom-up one depth level at a time
with ``scatter_reduce(amax)``. A parent never scores below a child, the root is 1, but
children need not sum to their parent. Back-off and thresholds on these scores read them
as "probability that the sample is somewhere under v".

**Label distribution** (``label_log_probs``). Read the independent sigmoids as a
distribution over multi-hot vectors, ``p(y) = prod_v sigmoid(z_v)^y_v (1 - sigmoid(z_v))^(1 - y_v)``,
and condition it on the legal outputs: exactly the root paths of the label nodes (an
internal label is its path with every descendant off). Since
``log sigmoid(z) - log(1 - sigmoid(z)) = z``, the terms of the nodes off the path cancel
in the normalisation and::

    log p(l | x) = sum_{v on root path of l, v != root} z_v  -  logsumexp_{l'} (same for l')

This is the hierarchy-and-exclusion (HEX) graph model of Deng et al. (ECCV 2014, "Large-scale
object classification using label relation graphs"): ``p(y) ∝ prod_v exp(z_v y_v)`` over the
legal assignments y. It sums to 1 over the labels, uses every node's logit, and is computed
from the root-path sums of every node (``path_scores``, one step per depth level).

**Target likelihood** (``target_log_likelihood``, what ``ce`` trains without label smoothing):
with ``P(v)`` the root-path sum of node v and ``log Z = logsumexp_l P(l)`` over the labels,
``log p(t | x) = P(t) - log Z`` for a label target and ``logsumexp_{l under t} P(l) - log Z``
for a partial target (the summed mass of the labels in t's subtree): the same numbers as
``label_log_probs`` without building the batch's ``[B, n_labels]`` log-softmax, its gathers
and the label-set masks of the label rows (only the partial rows mask their labels).

**Cost.** The logits are ``arcface.scaled_cosines``: one product with the weight norms as a
column scale and the margin put in place on the few root-path entries (no normalised weight
copy, mask or full-size scatter per step). The positives are one row gather of a node ancestor
table, not a ``[B, n_nodes]`` ancestor mask. Root-path sums and their backward (subtree sums)
run in place, one step per depth level and one per run of one-node levels (the chain at the top
of a tree cut from NCBI).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ...taxonomy import Taxonomy
from ..tree_tensors import DepthLevels
from .arcface import check_scale_margin, scaled_cosines
from .base import Head, register_head


ANCESTOR_TABLE_MAX = 1 << 24
"""Largest ``n_nodes * max_depth`` for which the head keeps a node ancestor table (int32: 64 MB)."""


def _path_plan(bounds: list[tuple[int, int]], parent: np.ndarray) -> list[tuple[int, ...]]:
    """The steps of :func:`_path_sums_` from DepthLevels' level ranges: ``(lo, hi, p_lo, p_hi)`` adds
    level ``[lo, hi)``'s parents (level ``[p_lo, p_hi)``), ``(a, b, p)`` a chain of one-node levels
    (consecutive ids ``a..b-1``, each the parent of the next; ``p`` the parent of ``a``, -1 for the root)
    summed with one cumsum. The top of a taxonomy cut from a large one (NCBI: cellular organisms ->
    ... -> the family) is such a chain: one step instead of one per level. Level 1 needs no step
    (the root's path sum is 0)."""
    widths = [hi - lo for lo, hi in bounds]
    steps: list[tuple[int, ...]] = []
    d = 1
    while d < len(bounds):
        e = d
        while widths[d] == 1 and e + 1 < len(bounds) and widths[e + 1] == 1:
            e += 1
        if e > d:
            a = bounds[d][0]
            steps.append((a, bounds[e][1], int(parent[a]) if d >= 2 else -1))
        elif d >= 2:
            steps.append((*bounds[d], *bounds[d - 1]))
        d = e + 1
    return steps


def _path_sums_(buf: Tensor, plan: list[tuple[int, ...]], local_parent: Tensor) -> Tensor:
    """In place on ``buf`` [B, n_nodes] (node logits): every node's root-path sum, the root excluded
    (``buf[:, 0]`` set to 0): one gather-and-add per depth level, one cumsum per chain (:func:`_path_plan`)."""
    buf[:, 0] = 0.0
    for step in plan:
        if len(step) == 4:
            lo, hi, p_lo, p_hi = step
            buf[:, lo:hi] += buf[:, p_lo:p_hi].index_select(1, local_parent[lo:hi])
        else:
            a, b, p = step
            run = buf[:, a:b].cumsum(dim=1)
            if p >= 0:
                run += buf[:, p:p + 1]
            buf[:, a:b] = run
    return buf


def _subtree_sums_(buf: Tensor, plan: list[tuple[int, ...]], local_parent: Tensor) -> Tensor:
    """In place: the transpose of :func:`_path_sums_` (the gradient of the root-path sums), its steps
    in reverse: a level added into its parents', a chain's reversed cumsum (then its top into ``p``),
    so that a node holds its subtree's sum; the root's entry set to 0 (the root's logit is in no
    path sum)."""
    for step in reversed(plan):
        if len(step) == 4:
            lo, hi, p_lo, p_hi = step
            buf[:, p_lo:p_hi].index_add_(1, local_parent[lo:hi], buf[:, lo:hi])
        else:
            a, b, p = step
            buf[:, a:b] = buf[:, a:b].flip(1).cumsum(dim=1).flip(1)
            if p >= 0:
                buf[:, p] += buf[:, a]
    buf[:, 0] = 0.0
    return buf


class _BelowRootPathSum(torch.autograd.Function):
    """``out[:, v] = sum of values[:, u]`` over v and its ancestors, the root excluded (``out[:, 0] = 0``):
    :func:`_path_sums_` on one copy, :func:`_subtree_sums_` on one copy of the gradient. Autograd
    through per-level slices would zero-fill a full-size gradient for every level."""

    @staticmethod
    def forward(ctx, values: Tensor, plan: list[tuple[int, ...]], local_parent: Tensor) -> Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(local_parent)
        return _path_sums_(values.clone(memory_format=torch.contiguous_format), plan, local_parent)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (local_parent,) = ctx.saved_tensors
        return _subtree_sums_(grad.clone(memory_format=torch.contiguous_format), ctx.plan, local_parent), None, None


_EXP_CUT = -60.0
"""Exponents below this (relative to the row maximum) count as exp = 0 in :func:`_row_exp_`."""


def _row_exp_(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place on ``x`` [R, C]: ``exp(x - max_row)``, with entries more than 60 below the row's
    maximum set to exactly 0; returns (that, its row sums, the row logsumexp).

    The cut drops at most ``C * e^-60 ~ C * 1e-26`` of a row sum that is >= 1 (below float32 and
    float64 resolution alike) and keeps the exponentials and their products with the gradient out
    of the subnormal range: with scale-30 logits summed along root paths most labels sit hundreds
    below the best one, and CPU arithmetic on subnormals runs 10-30x slower. A row of ``-inf`` gives
    zeros, sum 0 and ``-inf``.
    """
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = F.threshold_(x.sub_(top), _EXP_CUT, float("-inf")).exp_()
    total = e.sum(dim=-1)
    return e, total, total.log() + top.squeeze(-1)


class _TargetLogLikelihood(torch.autograd.Function):
    """``log p(t | x)`` [B] from the node logits ``z`` [B, n_nodes] (module docstring, "Target likelihood").

    Forward, on one ``[B, n_nodes]`` copy: the root-path sums ``P`` in place, ``-inf`` added off the
    labels (``label_bias``); a label target's ``P(t)`` is one gather, a partial target's mass the
    logsumexp of its row masked to t's subtree (pre-order interval test, only those rows); then the
    copy turns into the label softmax's numerators in place (:func:`_row_exp_`), kept for the
    backward, whose one ``[B, n_nodes]`` buffer is ``-g * softmax`` over the labels, ``+g`` at a
    label target, ``+g * softmax within t's subtree`` for a partial one, then the subtree sums
    (:func:`_subtree_sums_`). No label gather, scatter or second exponential.
    """

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, head: MultiLabelHead) -> Tensor:  # type: ignore[override]
        lv = head.levels_op
        p = _path_sums_(z.clone(memory_format=torch.contiguous_format), head.path_plan, lv.local_parent)
        p += head.label_bias.to(p.dtype)
        own = p.gather(1, t.unsqueeze(1)).squeeze(1)
        rows = torch.nonzero(~head.is_label[t]).squeeze(1)
        e_part = s_part = None
        if rows.numel():
            tr = t[rows]
            lo = lv.preorder[tr].unsqueeze(1)
            hi = lv.subtree_end[tr].unsqueeze(1)
            under = (lv.preorder.unsqueeze(0) >= lo) & (lv.preorder.unsqueeze(0) < hi)
            e_part, s_part, part = _row_exp_(p[rows].masked_fill_(~under, float("-inf")))
            own[rows] = part
        e, s, log_z = _row_exp_(p)
        ctx.head = head
        ctx.save_for_backward(t, e, s, rows, e_part, s_part)
        return own - log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        t, e, s, rows, e_part, s_part = ctx.saved_tensors
        lv = ctx.head.levels_op
        grad = e * (-g / s).unsqueeze(1)                     # 0 off the labels
        g_own = g
        if e_part is not None:
            g_own = g.index_fill(0, rows, 0.0)
            w = torch.where(s_part > 0, g[rows] / s_part, torch.zeros_like(s_part))
            grad.index_add_(0, rows, e_part * w.unsqueeze(1))
        grad.scatter_add_(1, t.unsqueeze(1), g_own.unsqueeze(1))
        return _subtree_sums_(grad, ctx.head.path_plan, lv.local_parent), None, None


@register_head("multilabel")
class MultiLabelHead(Head):
    """Hyperspherical multi-label head over all non-root nodes (module docstring).

    Options: ``scale`` s (30), ``margin`` m (radians, 0.2), ``dropout`` on the input (0).
    Extra methods: ``positives(targets)`` (the multi-hot root-path targets, [B, n_nodes] bool,
    root excluded), ``sigmoid_probs(outputs)`` (per-node sigmoids before the max constraint),
    ``coherent_logits(outputs)``, ``path_scores(outputs)`` (every node's root-path logit sum).
    """

    uses_targets = True

    def __init__(self, taxonomy: Taxonomy, in_features: int, scale: float = 30.0, margin: float = 0.2,
                 dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features)
        self.scale, self.margin = check_scale_margin(scale, margin)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight = nn.Parameter(torch.empty(self.n_nodes - 1, self.in_features))
        nn.init.xavier_uniform_(self.weight)
        self.levels_op = DepthLevels(taxonomy)
        self.path_plan = _path_plan(self.levels_op.bounds, taxonomy.parent)
        self.max_depth = int(taxonomy.max_depth)
        self.register_buffer("label_ids", torch.from_numpy(taxonomy.label_ids.astype(np.int64)), persistent=False)
        self.register_buffer("is_label", torch.from_numpy(taxonomy.is_label.copy()), persistent=False)
        self.register_buffer("parent", torch.from_numpy(np.maximum(taxonomy.parent, 0).astype(np.int64)),
                             persistent=False)
        # row v: v and its ancestors below the root (0-padded), for the margin's positives
        table = None
        if taxonomy.n_nodes * max(self.max_depth, 1) <= ANCESTOR_TABLE_MAX:
            anc = np.zeros((taxonomy.n_nodes, max(self.max_depth, 1)), dtype=np.int64)
            cur = np.arange(taxonomy.n_nodes)
            for k in range(anc.shape[1]):
                anc[:, k] = cur
                cur = np.maximum(taxonomy.parent[cur], 0)
            dtype = np.int32 if taxonomy.n_nodes < 2 ** 31 else np.int64
            table = torch.from_numpy(anc.astype(dtype))
        self.register_buffer("ancestor_table", table, persistent=False)
        # 0 at the labels, -inf elsewhere: the label softmax read on node-indexed root-path sums
        self.register_buffer("label_bias", torch.from_numpy(np.where(taxonomy.is_label, 0.0, -np.inf)
                                                            .astype(np.float32)), persistent=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("nodes",)

    def positives(self, targets: Tensor) -> Tensor:
        """[B] target nodes -> [B, n_nodes] bool multi-hot of each target's root path (root column
        False; all False for ``-1``)."""
        mask = torch.zeros(targets.shape[0], self.n_nodes, dtype=torch.bool, device=targets.device)
        rows, cols = self.positive_index(targets)
        mask[rows, cols] = True
        return mask

    def positive_index(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, node ids) of the True entries of :meth:`positives`: each target's root path without
        the root, one row gather of the node ancestor table (or, for trees whose table would exceed
        ``ANCESTOR_TABLE_MAX`` entries, ``max_depth`` parent lookups of ``[B]``): no ``[B, n_nodes]`` work."""
        t = targets.clamp(min=0)            # -1 -> the root: no positives
        if self.ancestor_table is not None:
            anc = self.ancestor_table[t]    # [B, max_depth], 0 (the root) past the top
        else:
            path = [t]
            for _ in range(self.max_depth - 1):
                path.append(self.parent[path[-1]])
            anc = torch.stack(path, dim=1)
        rows, k = torch.nonzero(anc > 0, as_tuple=True)
        return rows, anc[rows, k].long()

    def forward(self, features: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        rows = cols = None
        if self.training and targets is not None and self.margin > 0:
            rows, cols = self.positive_index(targets)
            cols = cols - 1                      # weight rows skip the root
        z = scaled_cosines(self.dropout(features), self.weight, self.scale, self.margin, rows, cols)
        return {"nodes": torch.cat([z.new_full((z.shape[0], 1), self.scale), z], dim=1)}

    def sigmoid_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """Independent per-node sigmoids, [B, n_nodes] (not coherent)."""
        return outputs["nodes"].float().sigmoid()

    def coherent_logits(self, outputs: dict[str, Tensor]) -> Tensor:
        """``max_{u in subtree(v)} z_u`` per node (C-HMCNN's max constraint), [B, n_nodes]."""
        return self.levels_op.subtree_max(outputs["nodes"].float())

    def node_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """Coherent sigmoid scores (module docstring): parent >= child, root 1; *not* subtree masses."""
        p = self.coherent_logits(outputs).sigmoid()
        return torch.cat([torch.ones_like(p[:, :1]), p[:, 1:]], dim=1)

    def path_scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """``sum_{u on root path of v, u != root} z_u`` for every node v, [B, n_nodes] float32 (0 at the root):
        a label's unnormalised log-probability."""
        z = outputs["nodes"]
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()
        return _BelowRootPathSum.apply(z, self.path_plan, self.levels_op.local_parent)

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.path_scores(outputs).index_select(1, self.label_ids).log_softmax(dim=-1)

    def target_log_likelihood(self, outputs: dict[str, Tensor], targets: Tensor) -> Tensor:
        """``log p(t | x)`` per sample (module docstring, "Target likelihood"): ``P(t) - log Z`` for a
        label target, ``logsumexp_{l under t} P(l) - log Z`` for a partial one (only those rows build a
        ``[n_partial, n_labels]`` label set); equals the values read from :meth:`label_log_probs`.
        One fused autograd function (``_TargetLogLikelihood``)."""
        z = outputs["nodes"]
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()
        return _TargetLogLikelihood.apply(z, targets.clamp(min=0).long(), self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"
