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
with one root-path sum (one sparse product over the labels' ancestors).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ...taxonomy import Taxonomy
from ..tree_tensors import ColumnSums, DepthLevels
from .arcface import check_scale_margin, cosine_logits, margin_logits
from .base import Head, register_head


@register_head("multilabel")
class MultiLabelHead(Head):
    """Hyperspherical multi-label head over all non-root nodes (module docstring).

    Options: ``scale`` s (30), ``margin`` m (radians, 0.2), ``dropout`` on the input (0).
    Extra methods: ``positives(targets)`` (the multi-hot root-path targets, [B, n_nodes] bool,
    root excluded), ``sigmoid_probs(outputs)`` (per-node sigmoids before the max constraint),
    ``coherent_logits(outputs)``.
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
        self.register_buffer("label_ids", torch.from_numpy(taxonomy.label_ids.astype(np.int64)), persistent=False)
        # a label's score: the sum of the logits on its root path (root excluded), one sparse product
        anc = taxonomy.ancestor_matrix(taxonomy.label_ids)
        lab, dep = np.nonzero(anc >= 0)
        keep = dep > 0
        self.path_sum = ColumnSums(lab[keep], anc[lab[keep], dep[keep]], taxonomy.n_labels, taxonomy.n_nodes)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("nodes",)

    def positives(self, targets: Tensor) -> Tensor:
        """[B] target nodes -> [B, n_nodes] bool multi-hot of each target's root path (root column
        False; all False for ``-1``)."""
        mask = self.levels_op.ancestor_mask(targets.clamp(min=0)) & (targets >= 0).unsqueeze(1)
        mask[:, 0] = False
        return mask

    def forward(self, features: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        cos = cosine_logits(self.dropout(features), self.weight)
        pos = self.positives(targets)[:, 1:] if (self.training and targets is not None) else None
        z = margin_logits(cos, pos, self.scale, self.margin)
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

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.path_sum(outputs["nodes"].float()).log_softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"
