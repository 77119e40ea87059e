"""Taxonomy-derived tensors for heads and losses, computed once and kept as buffers.

Everything here is vectorised over nodes (gathers and scatters on index arrays);
nothing loops over nodes in Python, and no dense ``n_nodes x n_nodes`` matrix is
built. The buffers are non-persistent: they are derived from the taxonomy (saved
with every bundle), so they never enter a state dict and ``.to(device)`` moves them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..taxonomy import Taxonomy

DENSE_MARGINALIZATION_MAX = 1 << 22
"""Above this many ``n_labels * n_nodes`` entries the marginalisation uses index_add instead of a dense matmul."""


def label_ancestor_table(taxonomy: Taxonomy) -> np.ndarray:
    """``A[i, d]`` = ancestor-or-self at depth ``d`` of label ``i`` (label_ids order), -1 below the label.

    ``[n_labels, max_depth + 1]``; it answers "is label i under node t?" as
    ``A[i, depth[t]] == t`` in O(1) per pair.
    """
    return taxonomy.ancestor_matrix(taxonomy.label_ids)


def covered_nodes(taxonomy: Taxonomy) -> np.ndarray:
    """Boolean per node: True where the node is a label or has a label in its subtree.

    Only these nodes are usable training targets for a model over the label nodes.
    """
    return taxonomy.subtree_sum(taxonomy.is_label.astype(np.float64)) > 0


def describe_nodes(taxonomy: Taxonomy, nodes: np.ndarray, limit: int = 5) -> str:
    """Short human description of some nodes for error messages: ``name (id 12, key 'x')``."""
    nodes = np.unique(np.asarray(nodes, dtype=np.int64))
    shown = [f"{taxonomy.names[v]!r} (node {int(v)}, key {taxonomy.keys[v]!r})" for v in nodes[:limit]]
    more = f" and {len(nodes) - limit} more" if len(nodes) > limit else ""
    return ", ".join(shown) + more


class Marginalizer(nn.Module):
    """``p_nodes = p_labels @ M`` with ``M = taxonomy.marginalization_matrix()`` ([n_labels, n_nodes], 0/1).

    A node's probability is the mass of the labels in its subtree (the label itself
    included). Small trees use a dense ``M`` buffer (one matmul); large ones
    scatter-add the (label, ancestor) pairs of ``M``'s non-zeros with ``index_add``,
    O(batch x nnz) where nnz = sum of label depths + n_labels.
    """

    def __init__(self, taxonomy: Taxonomy, dense_max: int = DENSE_MARGINALIZATION_MAX) -> None:
        super().__init__()
        m = taxonomy.marginalization_matrix().tocoo()
        self.n_labels = taxonomy.n_labels
        self.n_nodes = taxonomy.n_nodes
        self.dense = self.n_labels * self.n_nodes <= dense_max
        if self.dense:
            self.register_buffer("matrix", torch.from_numpy(np.asarray(m.todense(), dtype=np.float32)),
                                 persistent=False)
        else:
            self.register_buffer("rows", torch.from_numpy(m.row.astype(np.int64)), persistent=False)
            self.register_buffer("cols", torch.from_numpy(m.col.astype(np.int64)), persistent=False)

    def forward(self, label_probs: Tensor) -> Tensor:
        """[B, n_labels] -> [B, n_nodes] (float32 or wider)."""
        p = label_probs if label_probs.dtype in (torch.float32, torch.float64) else label_probs.float()
        if self.dense:
            return p @ self.matrix.to(p.dtype)
        out = p.new_zeros(p.shape[0], self.n_nodes)
        return out.index_add(1, self.cols, p.index_select(1, self.rows))


class LabelSets(nn.Module):
    """Which labels a target node stands for, batched: the label itself, or every label under it.

    ``mask(targets)`` is ``[B, n_labels]`` boolean: for a label target exactly that
    label (an internal label node means "this node, not further resolved"); for a
    non-label target (a partial label, e.g. known only to genus) every label in its
    subtree. Built from the ``[n_labels, depth+1]`` label ancestor table: O(B x n_labels).
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        super().__init__()
        self.register_buffer("ancestors", torch.from_numpy(label_ancestor_table(taxonomy)), persistent=False)
        self.register_buffer("depth", torch.from_numpy(taxonomy.depth.astype(np.int64)), persistent=False)
        self.register_buffer("label_index", torch.from_numpy(taxonomy.label_index.astype(np.int64)),
                             persistent=False)
        self.register_buffer("covered", torch.from_numpy(covered_nodes(taxonomy)), persistent=False)

    def inside(self, targets: Tensor) -> Tensor:
        """[B] node ids (>= 0) -> [B, n_labels] bool: label ``l`` is the target or lies below it
        (subtree membership: an internal label target keeps its descendants here)."""
        return (self.ancestors[:, self.depth[targets]] == targets[None, :]).T

    def mask(self, targets: Tensor, inside: Tensor | None = None) -> Tensor:
        """[B] node ids (>= 0) -> [B, n_labels] bool: the labels each target stands for
        (``inside``: :meth:`inside` of the same targets, if already computed)."""
        under = self.inside(targets) if inside is None else inside
        li = self.label_index[targets]
        own = torch.zeros_like(under).scatter_(1, li.clamp(min=0)[:, None], True)
        return torch.where((li >= 0)[:, None], own, under)


# ----------------------------------------------------------------- segment and path operations
def segment_logsumexp(values: Tensor, segments: Tensor, n_segments: int, dim: int = 1) -> Tensor:
    """``out[b, s] = log sum_{e: segments[e] == s} exp(values[b, e])``; ``-inf`` for empty segments.

    ``values`` is ``[B, E]`` (``dim=1``) or node-major ``[E, B]`` (``dim=0``, giving ``[n_segments, B]``),
    ``segments`` ``[E]`` (int64 in ``0..n_segments-1``). The usual max-shift for stability (the shift
    is detached: the result does not depend on it), one ``scatter_reduce(amax)`` and one ``index_add``:
    O(B x (E + n_segments)) memory whatever the segment sizes, so a node with 10^4 children costs no
    padding. Entries of ``-inf`` (e.g. a one-hot routing in log space) are allowed: a segment holding
    only ``-inf`` gives ``-inf``, never NaN.

    **Layout.** Both reductions move whole rows in the node-major layout (one contiguous batch row
    per entry) but single elements along ``dim=1``: on a CPU the ``dim=0`` form of the same reduction
    runs 3-30x faster (``bench/bench_heads_losses.py``), so a head whose logits can be produced
    node-major (``W @ x.T``) should pass them that way.
    """
    if dim not in (0, 1):
        raise ValueError(f"segment_logsumexp: dim must be 0 or 1, got {dim}")
    if dim == 0:
        b = values.shape[1]
        idx = segments.unsqueeze(1).expand(-1, b)
        shape = (n_segments, b)
    else:
        b = values.shape[0]
        idx = segments.unsqueeze(0).expand(b, -1)
        shape = (b, n_segments)
    shift = values.new_full(shape, float("-inf")).scatter_reduce(
        dim, idx, values.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    shifted = (values - shift.index_select(dim, segments)).exp()
    return values.new_zeros(shape).index_add(dim, segments, shifted).log() + shift


def segment_log_softmax(values: Tensor, segments: Tensor, n_segments: int, dim: int = 1) -> Tensor:
    """Log-softmax of ``values`` within each segment along ``dim``: ``values - segment_logsumexp[segment]``."""
    return values - segment_logsumexp(values, segments, n_segments, dim).index_select(dim, segments)


class DepthLevels(nn.Module):
    """Root-path sums, subtree maxima and ancestor masks over node-indexed tensors ``[B, n_nodes]``.

    Canonical ids put every depth level in one contiguous id range, parents one level up,
    so each direction is one gather (top-down) or one ``scatter_reduce`` (bottom-up) per
    depth level: O(B x n_nodes) work and memory; the Python loop runs over depth levels
    only (at most the tree height), never over nodes.
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        super().__init__()
        bounds = np.searchsorted(taxonomy.depth, np.arange(taxonomy.max_depth + 2))
        self.bounds: list[tuple[int, int]] = [(int(bounds[d]), int(bounds[d + 1]))
                                              for d in range(taxonomy.max_depth + 1)]
        self.n_nodes = taxonomy.n_nodes
        parent = np.maximum(taxonomy.parent, 0)
        # index of each node's parent inside the parent's own depth level (0 for the root)
        local = parent - bounds[np.maximum(taxonomy.depth - 1, 0)]
        self.register_buffer("local_parent", torch.from_numpy(local.astype(np.int64)), persistent=False)
        self.register_buffer("preorder", torch.from_numpy(taxonomy.preorder.astype(np.int64)), persistent=False)
        self.register_buffer("subtree_end", torch.from_numpy((taxonomy.preorder + taxonomy.subtree_size)
                                                             .astype(np.int64)), persistent=False)

    def path_sum(self, values: Tensor) -> Tensor:
        """``out[:, v] = sum of values[:, u]`` over u = v and its ancestors (the root included)."""
        parts = [values[:, :1]]
        for lo, hi in self.bounds[1:]:
            parts.append(parts[-1].index_select(1, self.local_parent[lo:hi]) + values[:, lo:hi])
        return torch.cat(parts, dim=1)

    def subtree_max(self, values: Tensor) -> Tensor:
        """``out[:, v] = max of values[:, u]`` over u in v's subtree (v included): bottom-up ``amax``.

        The max constraint module of C-HMCNN (Giunchiglia & Lukasiewicz, NeurIPS 2020,
        "Coherent hierarchical multi-label classification networks"): a node's score is the
        maximum over itself and its descendants, so a parent never scores below a child.
        The gradient goes to the maximising entries.
        """
        parts: list[Tensor] = [values[:, self.bounds[-1][0]:self.bounds[-1][1]]]
        for d in range(len(self.bounds) - 2, -1, -1):
            lo, hi = self.bounds[d]
            c_lo, c_hi = self.bounds[d + 1]
            idx = self.local_parent[c_lo:c_hi].unsqueeze(0).expand(values.shape[0], -1)
            parts.append(values[:, lo:hi].scatter_reduce(1, idx, parts[-1], reduce="amax", include_self=True))
        return torch.cat(parts[::-1], dim=1)

    def ancestor_mask(self, nodes: Tensor) -> Tensor:
        """[B] node ids (>= 0) -> [B, n_nodes] bool, True at each node's ancestors-or-self.

        ``u`` is an ancestor-or-self of ``t`` iff ``pre(u) <= pre(t) < pre(u) + size(u)``
        (depth-first pre-order intervals): O(B x n_nodes), no ancestor table.
        """
        p = self.preorder[nodes].unsqueeze(1)
        return (self.preorder.unsqueeze(0) <= p) & (p < self.subtree_end.unsqueeze(0))


class _CsrColumnSum(torch.autograd.Function):
    """``out = x @ M^T`` for a CSR matrix ``M`` [n_out, n_in]; the backward uses ``M^T`` in CSR too."""

    # the CSR kernels take the transposed (column-major) dense operand as it is: copying it to a
    # contiguous [n_in, B] first costs as much as the product itself on a CPU
    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, mt: Tensor) -> Tensor:  # type: ignore[override]
        ctx.mt = mt
        return (m @ x.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return (ctx.mt @ grad.t()).t().contiguous(), None, None


class ColumnSums(nn.Module):
    """``out[:, o] = sum of x[:, i] over the columns i listed for o`` (any number per output).

    The per-level scores of a label (its ancestors' log-probabilities at every level) are such
    sums. As a sparse matrix product (CSR, both directions precomputed, built once per device and
    dtype; a pair listed k times counts k times) it costs
    O(batch x nnz) like K gathers, but runs 2-9x faster on a CPU than column gathers of
    ``[batch, n_out]`` each, whose backward is a scatter. ``out_index``/``in_index``: the (output, input)
    pairs, one per term of a sum.
    Devices without sparse CSR kernels (MPS) use the gathers.
    """

    def __init__(self, out_index: np.ndarray, in_index: np.ndarray, n_out: int, n_in: int) -> None:
        super().__init__()
        import scipy.sparse as sp

        m = sp.csr_matrix((np.ones(len(out_index), dtype=np.float32), (out_index, in_index)), shape=(n_out, n_in))
        mt = m.T.tocsr()
        for name, mat in (("m", m), ("mt", mt)):
            mat.sum_duplicates()
            mat.sort_indices()
            self.register_buffer(f"{name}_crow", torch.from_numpy(mat.indptr.astype(np.int64)), persistent=False)
            self.register_buffer(f"{name}_col", torch.from_numpy(mat.indices.astype(np.int64)), persistent=False)
            self.register_buffer(f"{name}_val", torch.from_numpy(mat.data.astype(np.float32)), persistent=False)
        self.shape = (int(n_out), int(n_in))
        self.register_buffer("out_index", torch.from_numpy(np.asarray(out_index, dtype=np.int64)), persistent=False)
        self.register_buffer("in_index", torch.from_numpy(np.asarray(in_index, dtype=np.int64)), persistent=False)
        self._csr: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _matrices(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The CSR tensors ``M`` and ``M^T`` on the buffers' device in ``dtype``, built once per
        (device, dtype, buffer storage): a ``.to(device)`` moves the buffers and so misses the cache."""
        key = (self.m_crow.device, dtype, self.m_crow.data_ptr(), self.mt_crow.data_ptr())
        hit = self._csr.get(key)
        if hit is None:
            m = torch.sparse_csr_tensor(self.m_crow, self.m_col, self.m_val.to(dtype), self.shape,
                                        check_invariants=False)  # built from scipy's canonical CSR
            mt = torch.sparse_csr_tensor(self.mt_crow, self.mt_col, self.mt_val.to(dtype), self.shape[::-1],
                                         check_invariants=False)
            hit = (m, mt)
            self._csr = {key: hit}            # one entry: a stale one (buffers moved) is dropped
        return hit

    def forward(self, x: Tensor) -> Tensor:
        """[B, n_in] -> [B, n_out] (float32 or float64)."""
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if x.device.type == "mps":
            out = x.new_zeros(x.shape[0], self.shape[0])
            return out.index_add(1, self.out_index, x.index_select(1, self.in_index))
        m, mt = self._matrices(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # sparse kernels have no bf16/fp16 on every device
            return _CsrColumnSum.apply(x, m, mt)
