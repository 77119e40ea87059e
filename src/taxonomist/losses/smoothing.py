"""Soft-target losses built on tree distances: ``taxonomy_smoothing`` and ``soft_labels``.

Both are cross-entropies ``-sum_l T_l log p(l)`` against a target distribution ``T`` that
moves mass from the truth to its relatives, with ``p = exp(head.label_log_probs(outputs))``
(so they work with every head) and distances ``D(l, t)`` from
:class:`~taxonomist.losses.tree_ops.LabelDistance` (never a per-step pair loop; the label
distance matrix is built once).

``taxonomy_smoothing`` (Linnaeus, FIELD_NOTES.md "taxonomy-aware label smoothing"): with
``w_ik = exp(-beta * d_ik)`` the target row of class ``i`` is ``1 - alpha`` on ``i`` and
``alpha * w_ik / sum_{k != i} w_ik`` on every other class ``k``. ``alpha = 0`` is plain
cross-entropy; ``beta = 0`` is uniform label smoothing over the other classes; ``beta -> inf``
puts all of ``alpha`` on the nearest relatives (equally). ``max_distance`` makes labels
farther than it non-relatives; a class with no relative left falls back to uniform smoothing
over all other classes.

``soft_labels`` (Bertinetto et al., "Making Better Mistakes", CVPR 2020, section 3.2):
``T_l = softmax_l(-beta * d(l, y) / max d)`` with ``d`` the LCA height by default and
``max d`` the largest label-to-label distance of the tree. Large ``beta`` approaches one-hot.

Partial labels (a target node ``t`` above the labels: "one of the labels under t"). Let ``S``
be the labels under ``t`` and ``m_S`` the target mass the rule gives them (``1 - alpha`` for
smoothing; ``sum_{l in S} T_l`` for soft labels, with ``d(l, t)`` the distance to the node).
``partial="marginal"`` (default) trains ``m_S`` on the set likelihood ``-log sum_{l in S} p(l)``
(as ``ce`` does): its gradient on the logits of ``S`` is the model's own distribution inside
``S``, so no label under ``t`` is preferred to another. ``partial="uniform"`` spreads ``m_S``
evenly over ``S`` instead. The rest of the mass goes to the labels outside ``S`` by their
distance to ``t``, exactly as for a label target. A label target (internal labels included:
"this node, not further resolved") is ``S = {t}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.heads.base import Head
from ..taxonomy import Taxonomy
from .base import Loss, masked_mean, register_loss
from .tree_ops import DENSE_DISTANCE_MAX, LabelDistance


def _check_partial(partial: str) -> str:
    if partial not in ("marginal", "uniform"):
        raise ConfigError(f"loss.partial={partial!r} must be 'marginal' or 'uniform'")
    return partial


class _SetTargetLoss(Loss):
    """Shared part: the target set ``S`` of each sample, distances to the target node, the in-set term."""

    def __init__(self, taxonomy: Taxonomy, head: Head, metric: str, ranks: Sequence[str] | None,
                 partial: str, dense_max: int) -> None:
        super().__init__(taxonomy, head)
        self.partial = _check_partial(partial)
        self.distance = LabelDistance(taxonomy, metric, ranks, dense_max=dense_max)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def in_set_nll(self, lp: Tensor, in_set: Tensor) -> Tensor:
        """``-log p(S)`` (marginal) or ``mean_{l in S} -log p(l)`` (uniform), ``[B]``."""
        if self.partial == "marginal":
            return -torch.logsumexp(lp.masked_fill(~in_set, float("-inf")), dim=-1)
        return -(lp * in_set).sum(-1) / in_set.sum(-1).clamp(min=1)

    def target_weights(self, distances: Tensor, in_set: Tensor) -> tuple[Tensor, Tensor]:
        """``(m_S [B], W [B, n_labels])``: mass on the set, and the weights of the labels outside it."""
        raise NotImplementedError

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        valid = targets >= 0
        t = targets.clamp(min=0)                   # unlabelled rows: the root, a harmless stand-in
        lp = self.label_log_probs(outputs)
        with torch.no_grad():
            inside = self.distance.subtree(t)
            in_set = self.distance.subtree.meant(t, inside)
            mass, w = self.target_weights(self.distance(t, inside), in_set)
        out_set = torch.where(w > 0, w * lp, torch.zeros_like(lp)).sum(-1)     # 0 * (-inf) never happens
        per = mass * self.in_set_nll(lp, in_set) - out_set
        return {"labels": masked_mean(per, valid)}


@register_loss("taxonomy_smoothing")
class TaxonomySmoothing(_SetTargetLoss):
    """Taxonomy-aware label smoothing (Linnaeus; module docstring). Task ``"labels"``.

    Options: ``alpha`` (mass moved off the truth, [0, 1), default 0.1), ``beta`` (decay with
    distance, >= 0, default 1.0), ``metric`` (``path`` default, ``lca_height``, ``rank_steps``),
    ``ranks`` (ranks counted by ``rank_steps``), ``max_distance`` (relatives are labels at most
    this far; None = all), ``partial`` (``marginal`` / ``uniform``), ``dense_max`` (labels up to
    which the distance matrix is kept).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, alpha: float = 0.1, beta: float = 1.0,
                 metric: str = "path", ranks: Sequence[str] | None = None, max_distance: float | None = None,
                 partial: str = "marginal", dense_max: int = DENSE_DISTANCE_MAX) -> None:
        if not 0.0 <= float(alpha) < 1.0:
            raise ConfigError(f"loss.alpha={alpha} must be in [0, 1)")
        if not float(beta) >= 0.0:
            raise ConfigError(f"loss.beta={beta} must be >= 0")
        if max_distance is not None and not float(max_distance) >= 0.0:
            raise ConfigError(f"loss.max_distance={max_distance} must be >= 0 (or null for no limit)")
        super().__init__(taxonomy, head, metric, ranks, partial, dense_max)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.max_distance = None if max_distance is None else float(max_distance)

    def target_weights(self, distances: Tensor, in_set: Tensor) -> tuple[Tensor, Tensor]:
        others = ~in_set
        if self.max_distance is None:                       # everyone is a relative: the common, fast case
            has_other = others.any(-1, keepdim=True)
            logits = (-self.beta * distances).masked_fill(in_set, float("-inf")).masked_fill(~has_other, 0.0)
            w = torch.softmax(logits, dim=-1)
            alpha = self.alpha * has_other.float()
            return (1.0 - alpha)[:, 0], alpha * w
        related = others & (distances <= self.max_distance)
        has_related = related.any(-1, keepdim=True)
        # no relative: uniform over the other labels (equal logits); no other label at all: alpha -> 0
        logits = torch.where(has_related, -self.beta * distances, torch.zeros_like(distances))
        allowed = torch.where(has_related, related, others)
        has_other = others.any(-1, keepdim=True)
        allowed = allowed | ~has_other                      # keeps softmax finite; weight zeroed below
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        alpha = self.alpha * has_other.float()
        return (1.0 - alpha)[:, 0], alpha * w * others


@register_loss("soft_labels")
class SoftLabels(_SetTargetLoss):
    """Soft labels of Bertinetto et al. 2020 (module docstring). Task ``"labels"``.

    Options: ``beta`` (default 10; larger = closer to one-hot; ``inf`` is the limit, all mass on
    the nearest labels: the target itself, i.e. ``ce``, for a label target), ``metric`` (``lca_height``
    default, as in the paper; ``path``, ``rank_steps``), ``ranks``, ``partial``, ``dense_max``.
    ``max d`` is the largest label-to-label distance (exact with the dense matrix; above
    ``dense_max`` labels the exact value for ``lca_height`` and an upper bound otherwise).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, beta: float = 10.0, metric: str = "lca_height",
                 ranks: Sequence[str] | None = None, partial: str = "marginal",
                 dense_max: int = DENSE_DISTANCE_MAX) -> None:
        if not float(beta) >= 0.0:
            raise ConfigError(f"loss.beta={beta} must be >= 0")
        super().__init__(taxonomy, head, metric, ranks, partial, dense_max)
        self.beta = float(beta)
        self.scale = max(self.distance.max_label_distance, 1.0)

    def target_weights(self, distances: Tensor, in_set: Tensor) -> tuple[Tensor, Tensor]:
        if math.isinf(self.beta):   # the limit: equal mass on the nearest labels (-inf * 0 would be NaN)
            d = distances.float()
            nearest = d == d.min(dim=-1, keepdim=True).values
            t = nearest.float() / nearest.sum(dim=-1, keepdim=True)
        else:
            t = torch.softmax(-self.beta * distances / self.scale, dim=-1)
        return (t * in_set).sum(-1), t * ~in_set
