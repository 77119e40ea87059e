"""Hierarchical cross-entropy, ``hxe`` (Bertinetto et al., "Making Better Mistakes", CVPR 2020, eq. 4-5).

The probability of the target is factored into conditionals along its root path
``C_0 = t, C_1 = parent(t), ..., C_h = root``:

    p(t) = prod_{l=0}^{h-1} p(C_l | C_{l+1}),     p(C_l | C_{l+1}) = p(C_l) / p(C_{l+1})

and each factor is weighted by ``lambda(C_l) = exp(-alpha * height(C_l))``:

    HXE = - sum_{l=0}^{h-1} lambda(C_l) * log p(C_l | C_{l+1})

``alpha = 0`` telescopes to ``-log p(t)``, plain cross-entropy; larger ``alpha`` discounts the
fine-grained decisions (low in the tree) relative to the coarse ones.

``p(v)`` is the mass of v's subtree under the head's label distribution (any head), computed
for every node by :class:`~taxonomist.losses.tree_ops.NodeLogProbs` (float64 sums bottom-up,
one ``index_add`` per depth level: O(batch x nodes); no dense ``[C, C, depth]`` tensor as in the
reference code), then gathered along each target's root path (O(batch x depth)).

Internal label nodes ("this node, not further resolved") get one more factor, the label's own
share of its subtree ``p_label(t) / p(t)``, with the weight of a leaf (height 0, ``lambda = 1``).
Partial labels (``t`` above the labels): the sum starts at ``t`` (the path from the root down to
what is known), so with ``alpha = 0`` it equals the set likelihood ``-log p(t)`` that ``ce`` uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.heads.base import Head
from ..taxonomy import Taxonomy
from .base import Loss, masked_mean, register_loss
from .tree_ops import NodeLogProbs, RootPaths


@register_loss("hxe")
class HierarchicalCrossEntropy(Loss):
    """HXE with ``lambda(C) = exp(-alpha * height(C))`` (module docstring). Task ``"labels"``.

    Options: ``alpha`` (>= 0, default 0.1; Bertinetto et al. report 0.1-0.6 on their data).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, alpha: float = 0.1) -> None:
        super().__init__(taxonomy, head)
        if not float(alpha) >= 0.0:
            raise ConfigError(f"loss.alpha={alpha} must be >= 0")
        self.alpha = float(alpha)
        self.node_log_probs = NodeLogProbs(taxonomy)
        self.paths = RootPaths(taxonomy)
        lam = np.exp(-self.alpha * taxonomy.height.astype(np.float64))
        self.register_buffer("lam", torch.from_numpy(lam), persistent=False)
        self.register_buffer("label_index", torch.from_numpy(taxonomy.label_index.astype(np.int64)),
                             persistent=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def per_sample(self, label_log_probs: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` HXE of each sample (0 where the target is -1)."""
        t = targets.clamp(min=0)
        lp = label_log_probs.double()
        path = self.paths(t)                                              # [B, depth+1], -1 below t
        nodes = torch.cat([path.clamp(min=0), t[:, None]], dim=1)
        # one gather of the subtree masses on the root path (+ t), then the log of those only
        lpn = self.node_log_probs.masses(lp).gather(1, nodes).clamp(min=torch.finfo(torch.float64).tiny).log()
        on_path = path[:, 1:] >= 0
        cond = lpn[:, :-2] - lpn[:, 1:-1]                 # -log p(C_l | C_{l+1}) = log p(parent) - log p(C_l)
        lam = self.lam[path[:, 1:].clamp(min=0)]
        terms = torch.where(on_path, lam * cond, torch.zeros_like(cond)).sum(-1)
        li = self.label_index[t]
        own = lp.gather(1, li.clamp(min=0)[:, None])[:, 0]
        self_term = torch.where(li >= 0, lpn[:, -1] - own, torch.zeros_like(own))
        return torch.where(targets >= 0, terms + self_term, torch.zeros_like(terms)).float()

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        per = self.per_sample(self.label_log_probs(outputs), targets)
        return {"labels": masked_mean(per, targets >= 0)}
