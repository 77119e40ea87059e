"""Top-down refined level heads: ``refined`` and ``conditional`` (the design documents' heads).

Both start like ``per_rank``: base logits ``Z_j`` for every level j (ranks, or depth
levels of an unranked tree; the classes of a level are its nodes with labels below
plus a **none** class where some label's lineage stops above the level or skips it,
see :func:`~taxonomist.models.heads.per_rank.level_codes`). They then refine the
levels from the top down with the parent -> child relation ``H[j, j+1]``::

    Z'_0     = Z_0
    Z'_{j+1} = Z_{j+1} + log( P_j . H[j, j+1] + eps )

* ``refined``: ``P_j = softmax(Z'_j)`` (the design documents' "hierarchical softmax").
* ``conditional``: ``P_j`` is a routing distribution computed from ``Z'_j``:
  ``soft`` = ``softmax(Z'_j / T)``; ``hard`` = ``one_hot(argmax Z'_j)`` (inference only);
  ``gumbel`` = Gumbel-softmax ``softmax((Z'_j + g) / T)``, ``g ~ Gumbel(0, 1)`` in
  training (Jang, Gu & Poole, ICLR 2017; Maddison, Mnih & Teh, ICLR 2017), and
  ``eval_routing`` (soft or hard) in evaluation, so inference is deterministic.

As the field notes point out, this is a prior-weighted softmax normalised over *all*
classes of the next level, not a path-product hierarchical softmax (that is ``hsoftmax``).

**H between levels of uneven depth.** ``H[j, j+1][a, b] = 1`` when some label has class
``a`` at level j and class ``b`` at level j+1 (sparse: at most one pair per label). A
real node at level j+1 has exactly one parent class: its ancestor at level j, or the
none class of level j when its lineage skips that level. The none class of level j+1
("the label stops above j+1") has as parents the classes of level j where such labels
stop or pass (an internal label node at level j, or level j's none class). A class with
no parent at all (possible only with ``none_class=False`` when lineages skip a level) gets
no prior term (``log 1``). ``P . H`` is a sparse product computed in log space,
``log(P.H + eps) = logaddexp(logsumexp over parents of log P, log eps)``: the same
number as the formula, without dividing by small probabilities in the gradient. Where every
class has at most one parent class (every level of a tree without none-class merges) it is
``log(P[parent] + eps)``: one exp on level j, one gather, one log (the gradient
``P / (P + eps)`` is bounded).

Outputs are keyed by level name, exactly like ``per_rank`` (the refined logits
``Z'_j``), so ``per_rank_ce`` trains them level by level; ``level_targets``,
``level_classes``, ``level_predictions`` and ``level_log_probs`` are inherited. The
label distribution is the **product of experts** of the refined level softmaxes,
renormalised over the label nodes (as in ``per_rank``): ``log p(l) = sum_j log
softmax(Z'_j)[c_j(l)] - logsumexp(...)``.

One fused ``Linear(in_features, sum_j C_j)`` holds the per-level layers. Setting
``head.refine = False`` returns the plain per-level logits ``Z_j`` (the design documents
let GradNorm measure task gradients on the unrefined heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from ...taxonomy import Taxonomy
from ..tree_tensors import segment_logsumexp
from .base import register_head
from .per_rank import PerRankHead, level_codes

ROUTINGS = ("soft", "hard", "gumbel")


def level_edges(label_codes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sparse ``H[j, j+1]`` as (parent class, child class) index pairs from the labels' level codes.

    ``label_codes[i, j]``: class of label i at level j (-1 = none and no none class). One
    pair per distinct (code at j, code at j+1) among the labels; vectorised ``np.unique``.
    """
    out = []
    for j in range(label_codes.shape[1] - 1):
        a, b = label_codes[:, j], label_codes[:, j + 1]
        ok = (a >= 0) & (b >= 0)
        pairs = np.unique(np.stack([a[ok], b[ok]], axis=1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
        out.append((pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)))
    return out


@register_head("refined")
class RefinedHead(PerRankHead):
    """Per-level softmaxes refined top down by the level above (module docstring).

    Options: ``ranks``, ``none_class``, ``dropout`` (as ``per_rank``), ``eps`` (> 0, the
    floor of the parent mass inside the log; default 1e-6).
    """

    def __init__(self, taxonomy: Taxonomy, in_features: int, ranks: Sequence[str] | None = None,
                 none_class: bool = True, dropout: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__(taxonomy, in_features, ranks=ranks, none_class=none_class, dropout=dropout)
        if not (isinstance(eps, (int, float)) and 0.0 < float(eps) < 1.0):
            raise ConfigError(f"model.head.eps={eps!r} must be a number in (0, 1) (the floor of the parent "
                              "mass inside log(P.H + eps)); e.g. 1e-6")
        self.eps = float(eps)
        self.log_eps = math.log(float(eps))
        self.refine = True
        _, _, label_codes, _ = level_codes(taxonomy, ranks, none_class)
        for j, (src, dst) in enumerate(level_edges(label_codes)):
            has_parent = np.zeros(self.sizes[j + 1], dtype=bool)
            has_parent[dst] = True
            self.register_buffer(f"edge_src_{j}", torch.from_numpy(src), persistent=False)
            self.register_buffer(f"edge_dst_{j}", torch.from_numpy(dst), persistent=False)
            self.register_buffer(f"has_parent_{j}", torch.from_numpy(has_parent), persistent=False)
            # the common case: every class of level j+1 has at most one parent class, so the sum over
            # parents is a gather (no segment logsumexp); -1 marks the (rare) several-parents case
            counts = np.bincount(dst, minlength=self.sizes[j + 1])
            single = np.zeros(self.sizes[j + 1], dtype=np.int64)
            single[dst] = src
            self.register_buffer(f"single_parent_{j}", torch.from_numpy(single if counts.max(initial=0) <= 1
                                                                       else np.zeros(0, np.int64)),
                                 persistent=False)

    def edges(self, j: int) -> tuple[Tensor, Tensor]:
        """(parent class at level j, child class at level j+1) pairs of ``H[j, j+1]``."""
        return getattr(self, f"edge_src_{j}"), getattr(self, f"edge_dst_{j}")

    def route_log_probs(self, refined: Tensor, j: int) -> Tensor:
        """``log P_j`` from the refined logits of level j: here ``log_softmax(Z'_j)``."""
        return refined.float().log_softmax(dim=-1)

    def log_prior(self, route_log_probs: Tensor, j: int) -> Tensor:
        """``log(P_j . H[j, j+1] + eps)`` for the classes of level j+1, [B, C_{j+1}] (float32)."""
        src, dst = self.edges(j)
        single = getattr(self, f"single_parent_{j}")
        if len(single):      # one parent at most per class: log(P[parent] + eps), exp on the smaller level
            prior = (route_log_probs.exp().index_select(1, single) + self.eps).log()
        else:
            lse = segment_logsumexp(route_log_probs.index_select(1, src), dst, self.sizes[j + 1])
            prior = torch.logaddexp(lse, torch.full_like(lse, self.log_eps))
        return torch.where(getattr(self, f"has_parent_{j}").unsqueeze(0), prior, torch.zeros_like(prior))

    def refine_levels(self, base: dict[str, Tensor], routes: bool = True
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(refined logits by level, routing distribution ``P_j`` by level for levels 0..L-2; empty
        with ``routes=False``, which the forward uses: it needs only the logits)."""
        out = [base[self.levels[0]].float()]
        kept = {}
        for j in range(1, len(self.levels)):
            route = self.route_log_probs(out[-1], j - 1)
            if routes:
                kept[self.levels[j - 1]] = route.exp()
            out.append(base[self.levels[j]].float() + self.log_prior(route, j - 1))
        return dict(zip(self.levels, out, strict=True)), kept

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        base = super().forward(features)
        return self.refine_levels(base, routes=False)[0] if self.refine else base

    def routing_probs(self, features: Tensor) -> dict[str, Tensor]:
        """The routing distributions ``P_j`` of one forward pass (levels 0..L-2), for inspection."""
        return self.refine_levels(super().forward(features))[1]


@register_head("conditional")
class ConditionalHead(RefinedHead):
    """Top-down routing between levels (module docstring).

    Options: ``routing`` (``soft`` | ``hard`` | ``gumbel``: the routing in training mode;
    ``hard`` has no gradient and is for inference only), ``temperature`` T (> 0, default 1),
    ``eval_routing`` (``soft`` | ``hard``; default: ``hard`` for ``routing=hard``, else
    ``soft``), plus ``ranks``, ``none_class``, ``dropout``, ``eps`` as ``refined``.
    """

    def __init__(self, taxonomy: Taxonomy, in_features: int, routing: Literal["soft", "hard", "gumbel"] = "soft",
                 temperature: float = 1.0, eval_routing: Literal["soft", "hard"] | None = None,
                 ranks: Sequence[str] | None = None, none_class: bool = True, dropout: float = 0.0,
                 eps: float = 1e-6) -> None:
        super().__init__(taxonomy, in_features, ranks=ranks, none_class=none_class, dropout=dropout, eps=eps)
        if routing not in ROUTINGS:
            raise ConfigError(f"model.head.routing={routing!r} is not one of {', '.join(ROUTINGS)}")
        if eval_routing is None:
            eval_routing = "hard" if routing == "hard" else "soft"
        if eval_routing not in ("soft", "hard"):
            raise ConfigError(f"model.head.eval_routing={eval_routing!r} must be 'soft' or 'hard' (evaluation is "
                              "deterministic; Gumbel noise is for training only)")
        if not (isinstance(temperature, (int, float)) and float(temperature) > 0):
            raise ConfigError(f"model.head.temperature={temperature!r} must be a positive number")
        self.routing = routing
        self.eval_routing = eval_routing
        self.temperature = float(temperature)

    @property
    def active_routing(self) -> str:
        """The routing used now: ``routing`` in training mode, ``eval_routing`` in eval mode."""
        return self.routing if self.training else self.eval_routing

    def route_log_probs(self, refined: Tensor, j: int) -> Tensor:
        z = refined.float()
        mode = self.active_routing
        if mode == "hard":
            if self.training and torch.is_grad_enabled():
                raise ConfigError("model.head.routing='hard' is inference-only (argmax routing has no gradient): "
                                  "train with routing=soft or routing=gumbel and set eval_routing=hard")
            hot = torch.nn.functional.one_hot(z.argmax(dim=-1), z.shape[-1]).bool()
            return torch.zeros_like(z).masked_fill(~hot, float("-inf"))
        if mode == "gumbel":
            u = torch.rand_like(z).clamp_(min=1e-20, max=1.0 - 1e-7)
            z = z - torch.log(-torch.log(u))
        return (z / self.temperature).log_softmax(dim=-1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, routing={self.routing}, eval_routing={self.eval_routing}, "
                f"temperature={self.temperature}")
