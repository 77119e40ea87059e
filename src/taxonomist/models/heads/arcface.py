"""ArcFace heads: ``arcface`` (over the label nodes) and ``arcface_per_rank`` (one per level).

ArcFace (Deng, Guo, Xue & Zafeiriou, CVPR 2019, "ArcFace: additive angular margin loss
for deep face recognition"): the embedding ``h`` and the class weights ``w_c`` are
L2-normalised, so the logit of class c is a scaled cosine ``s * cos(theta_c)``. In
training, the **true class only** gets an additive angular margin m::

    logit_y = s * cos(theta_y + m)        if theta_y + m <= pi   (theta_y < pi - m)
            = s * (cos(theta_y) - m * sin(m))   otherwise

The second line is the guard of the authors' reference implementation (insightface):
``cos(theta + m)`` starts *increasing* again once ``theta + m > pi`` (a worse sample
would get a better logit), so beyond ``pi - m`` the margin logit is the CosFace-like
``cos(theta) - m*sin(m)``. Both pieces decrease with theta and lie below ``cos(theta)``;
the switch is a small downward step (m = 0.5: from -1 to -1.117), so the margin logit
never increases with the angle. ``cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)`` with
``sin(theta) = sqrt(1 - cos^2)``: no ``acos``, whose gradient is infinite at +-1.

As in the plankton thesis, the margin is applied *inside the head* and the loss stays a
plain cross-entropy outside it (``ce`` / ``per_rank_ce``). The head therefore needs the
targets in its forward: ``forward(features, targets=None)`` (node ids, ``-1`` =
unlabelled); :class:`~taxonomist.models.model.TaxonomistModel` passes them. A margin is
applied only in training mode and only where the target determines the class: for
``arcface`` a target that is a label node (a partial label above the labels gets no
margin, its true class is unknown); for ``arcface_per_rank`` every level the target
determines (``level_targets``; a genus-level target gets the margin on the levels down to
genus). In evaluation (or without targets) the logits are ``s * cos(theta)``, and
``label_log_probs`` is their log-softmax (``s`` acts as an inverse temperature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ...errors import ConfigError
from ...taxonomy import Taxonomy
from .base import Head, register_head
from .per_rank import PerRankHead


def check_scale_margin(scale: float, margin: float) -> tuple[float, float]:
    """Validate ArcFace's ``scale`` (s > 0) and ``margin`` (0 <= m < pi/2)."""
    if not (isinstance(scale, (int, float)) and float(scale) > 0):
        raise ConfigError(f"model.head.scale={scale!r} must be a positive number (ArcFace's s, e.g. 30)")
    if not (isinstance(margin, (int, float)) and 0.0 <= float(margin) < math.pi / 2):
        raise ConfigError(f"model.head.margin={margin!r} must be an angle in radians in [0, pi/2) "
                          "(ArcFace's m, e.g. 0.5)")
    return float(scale), float(margin)


class _UnitRows(torch.autograd.Function):
    """``x / max(||x_i||, eps)`` row-wise, the values of ``F.normalize(x, dim=-1)``, with a hand-written
    backward ``(g - u (g . u)) / max(||x_i||, eps)`` (no projection term where the norm is clamped).

    Autograd's backward of ``F.normalize`` goes through the norm and the broadcast division (about
    ten elementwise passes over ``x``): for a ``[10^4, 512]`` class-weight matrix on a CPU it cost as
    much as the logit product itself; this one is three.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denom = norm.clamp_min(eps)
        u = x / denom
        ctx.save_for_backward(u, denom, norm > eps)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, denom, unclamped = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad, u, dim=-1).unsqueeze(-1) * unclamped
        return torch.addcmul(grad, u, dot, value=-1.0).div_(denom), None


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (``F.normalize(x, dim=-1)``, a cheaper backward: ``_UnitRows``)."""
    return _UnitRows.apply(x, eps)


def cosine_logits(features: Tensor, weight: Tensor) -> Tensor:
    """``cos(theta)`` between each row of ``features`` [B, D] and each row of ``weight`` [C, D], float32.

    Computed in float32 with autocast off (cosines near +-1 need the precision for the margin).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.linear(unit_rows(features.float()), unit_rows(weight.float()))


def arc_margin(cos: Tensor, margin: float) -> Tensor:
    """``cos(theta + m)`` where ``theta < pi - m``, else ``cos(theta) - m * sin(m)`` (module docstring)."""
    c = cos.clamp(-1.0, 1.0)
    sin = (1.0 - c * c).clamp(min=1e-12).sqrt()
    shifted = c * math.cos(margin) - sin * math.sin(margin)
    return torch.where(c > math.cos(math.pi - margin), shifted, c - margin * math.sin(margin))


def arc_margin_slope(cos: Tensor, margin: float) -> Tensor:
    """``d arc_margin(cos, margin) / d cos``, elementwise: the derivative autograd takes through
    :func:`arc_margin` (its clamps included), without building a graph (for hand-written backwards)."""
    inside = (cos > -1.0) & (cos < 1.0)          # autograd gives clamp no gradient at its bounds
    c = cos.clamp(-1.0, 1.0)
    one_minus = 1.0 - c * c
    sin = one_minus.clamp(min=1e-12).sqrt()
    shifted = math.cos(margin) + math.sin(margin) * torch.where(one_minus >= 1e-12, c / sin, torch.zeros_like(c))
    slope = torch.where(c > math.cos(math.pi - margin), shifted, torch.ones_like(c))
    return torch.where(inside, slope, torch.zeros_like(c))


_ROWDOT_CHUNK = 1 << 18
"""Elements per chunk of :func:`_rowdot`'s product (a MB: no weight-sized temporary)."""


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for two ``[N, D]`` matrices, in row chunks (no ``[N, D]`` temporary)."""
    step = max(1, _ROWDOT_CHUNK // max(1, a.shape[1]))
    return torch.cat([(a[i:i + step] * b[i:i + step]).sum(-1) for i in range(0, a.shape[0], step)])


class _MarginCosines(torch.autograd.Function):
    """``[B, C]`` ArcFace logits from ``xs = s * normalize(x)`` [B, D] and the raw class weights ``W``
    [C, D]: ``s * cos(theta_c) = (xs . W_c) / max(||W_c||, eps)``, and ``s * arc_margin(cos)`` at the
    positives ``(rows, cols)``.

    The weight normalisation is a per-column scale of the product: ``F.normalize(W)`` would be a
    second weight-sized matrix, and autograd's backward of it a dozen weight-sized passes (on a CPU
    as much as the product itself at 10^4 classes). Forward: one product, scaled in place, the
    margin put in place on the gathered positives (no mask, no full-size copy). Backward: the
    rescaled gradient ``G' = G / ||W_c||`` (times :func:`arc_margin_slope` at the positives),
    ``dx = G' W`` and ``dW = G'^T xs - u (u . G'^T xs)`` with ``u = W / ||W||`` (the normalisation's
    projection, in place on the product; none where the norm is clamped at eps, as for ``F.normalize``).
    """

    @staticmethod
    def forward(ctx, xs: Tensor, weight: Tensor, rows: Tensor | None, cols: Tensor | None,  # type: ignore[override]
                scale: float, margin: float, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(weight, dim=-1)
        inv = norm.clamp_min(eps).reciprocal()
        out = torch.mm(xs, weight.t()).mul_(inv)   # (a strided out= view of a larger result: ~1.5x slower on a CPU)
        cos = None
        if rows is not None and margin != 0.0 and rows.numel():
            cos = out[rows, cols] / scale
            out[rows, cols] = scale * arc_margin(cos, margin)
        ctx.margin = margin
        ctx.save_for_backward(xs, weight, inv, norm > eps, rows, cols, cos)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xs, weight, inv, unclamped, rows, cols, cos = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            g = grad * inv                           # the one [B, C] buffer of the backward
            if cos is not None:
                g[rows, cols] = grad[rows, cols] * arc_margin_slope(cos, ctx.margin) * inv[cols]
            gx = g @ weight if ctx.needs_input_grad[0] else None
            gw = None
            if ctx.needs_input_grad[1]:
                gw = g.t() @ xs
                coef = _rowdot(gw, weight) * inv * inv * unclamped
                gw.addcmul_(weight, coef.unsqueeze(1), value=-1.0)
        return gx, gw, None, None, None, None, None


def scaled_cosines(features: Tensor, weight: Tensor, scale: float, margin: float = 0.0,
                   rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """``s * cos(theta)`` [B, C] between ``features`` [B, D] and ``weight`` [C, D], with the angular
    margin (:func:`arc_margin`) at the entries ``(rows, cols)``: the values of
    ``margin_logits(cosine_logits(features, weight), mask, s, m)`` in one fused step (``_MarginCosines``).
    Float32, autocast off (cosines near +-1 need the precision for the margin)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        xs = unit_rows(features.float()) * scale
        return _MarginCosines.apply(xs, weight.float(), rows, cols, float(scale), float(margin), 1e-12)


def margin_logits(cos: Tensor, positive: Tensor | None, scale: float, margin: float) -> Tensor:
    """``s * cos`` with the angular margin on the entries where ``positive`` is True."""
    if positive is None or margin == 0.0:
        return scale * cos
    # the margin only where it applies (a few entries per row for root paths): same values as
    # ``where(positive, arc_margin(cos), cos)`` without the margin's arithmetic over every entry
    idx = positive.nonzero(as_tuple=True)
    return (scale * cos).index_put(idx, scale * arc_margin(cos[idx], margin))


@register_head("arcface")
class ArcFaceHead(Head):
    """ArcFace over the label nodes (module docstring). Output key ``"labels"``: ``s * cos``
    (with the margin on the true label in training when targets are given).

    Options: ``scale`` s (30), ``margin`` m in radians (0.5), ``dropout`` on the input (0).
    """

    uses_targets = True

    def __init__(self, taxonomy: Taxonomy, in_features: int, scale: float = 30.0, margin: float = 0.5,
                 dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features)
        self.scale, self.margin = check_scale_margin(scale, margin)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight = nn.Parameter(torch.empty(self.n_labels, self.in_features))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("label_index", torch.from_numpy(taxonomy.label_index.astype(np.int64)),
                             persistent=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def positives(self, targets: Tensor) -> Tensor:
        """[B] target nodes -> [B, n_labels] bool: the true label of label targets, nothing otherwise."""
        li = torch.where(targets >= 0, self.label_index[targets.clamp(min=0)], -1)
        hot = F.one_hot(li.clamp(min=0), self.n_labels).bool()
        return hot & (li >= 0).unsqueeze(1)

    def positive_index(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, label indices) of the True entries of :meth:`positives`."""
        li = torch.where(targets >= 0, self.label_index[targets.clamp(min=0)], -1)
        rows = torch.nonzero(li >= 0).squeeze(1)
        return rows, li[rows]

    def forward(self, features: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        rows = cols = None
        if self.training and targets is not None:
            rows, cols = self.positive_index(targets)
        return {"labels": scaled_cosines(self.dropout(features), self.weight, self.scale, self.margin, rows, cols)}

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return outputs["labels"].float().log_softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"


@register_head("arcface_per_rank")
class ArcFacePerRankHead(PerRankHead):
    """One ArcFace classifier per level (the level classes of ``per_rank``, none classes
    included); outputs keyed by level name, so ``per_rank_ce`` trains it and its label
    distribution is ``per_rank``'s product of experts of the level softmaxes.

    Options: ``scale`` (30), ``margin`` (0.5), ``ranks``, ``none_class``, ``dropout``.
    """

    uses_targets = True

    def __init__(self, taxonomy: Taxonomy, in_features: int, scale: float = 30.0, margin: float = 0.5,
                 ranks: Sequence[str] | None = None, none_class: bool = True, dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features, ranks=ranks, none_class=none_class, dropout=dropout)
        self.scale, self.margin = check_scale_margin(scale, margin)
        total = self.linear.out_features
        del self.linear
        self.weight = nn.Parameter(torch.empty(total, self.in_features))
        nn.init.xavier_uniform_(self.weight)
        offsets = np.r_[0, np.cumsum(self.sizes)[:-1]]
        self.register_buffer("offsets", torch.from_numpy(offsets.astype(np.int64)), persistent=False)

    def positives(self, targets: Tensor) -> Tensor:
        """[B] target nodes -> [B, sum_j C_j] bool: the true class of every level the target determines."""
        t = self.node_targets[targets.clamp(min=0)]                 # [B, n_levels], -1 = undetermined
        t = torch.where((targets >= 0).unsqueeze(1), t, -1)
        total = self.weight.shape[0]
        cols = torch.where(t >= 0, t + self.offsets.unsqueeze(0), total)   # undetermined -> a dropped column
        hot = torch.zeros(t.shape[0], total + 1, dtype=torch.bool, device=t.device)
        hot.scatter_(1, cols, True)
        return hot[:, :total]

    def positive_index(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, columns) of the True entries of :meth:`positives`."""
        t = self.node_targets[targets.clamp(min=0)]                 # [B, n_levels], -1 = undetermined
        t = torch.where((targets >= 0).unsqueeze(1), t, -1)
        rows, level = torch.nonzero(t >= 0, as_tuple=True)
        return rows, t[rows, level] + self.offsets[level]

    def forward(self, features: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        rows = cols = None
        if self.training and targets is not None:
            rows, cols = self.positive_index(targets)
        z = scaled_cosines(self.dropout(features), self.weight, self.scale, self.margin, rows, cols)
        return dict(zip(self.levels, z.split(self.sizes, dim=-1), strict=True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"
