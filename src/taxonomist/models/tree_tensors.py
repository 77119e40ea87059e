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
        return out.index_add(1, self.cols, p[:, self.rows])


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

    def mask(self, targets: Tensor) -> Tensor:
        """[B] node ids (>= 0) -> [B, n_labels] bool."""
        anc = self.ancestors[:, self.depth[targets]]            # [n_labels, B]
        under = (anc == targets[None, :]).T                     # [B, n_labels]
        li = self.label_index[targets]
        is_label = li >= 0
        onehot = nn.functional.one_hot(li.clamp(min=0), under.shape[1]).bool()
        return torch.where(is_label[:, None], onehot, under)
