"""Cross-entropy losses that accept targets at any depth.

``ce``: the negative log-likelihood of the target under any head's label
distribution ``p = exp(label_log_probs)``:

* target ``t`` is a label node: ``-log p(t)`` (an internal label node is its own
  class, "this node, not further resolved");
* target ``t`` is above the labels (a partial label, e.g. known only to genus):
  the likelihood of "some label under t", ``-log sum_{l under t} p(l)``, computed
  as ``-logsumexp`` of the label log-probabilities masked to ``t``'s subtree.
  This is the likelihood of a candidate label set, ``P(S | x) = sum_{y in S} p(y | x)``
  (Jin & Ghahramani, NIPS 2002, "Learning with multiple labels"), with S the labels
  under t; Deng et al. (ECCV 2014, label relation graphs) train on internal-node
  labels with the same marginal probability;
* label smoothing (Szegedy et al. 2016): ``(1 - eps) * nll + eps * mean_l(-log p(l))``.

``per_rank_ce``: one cross-entropy per level of the ``per_rank`` head, the level
target being the target's class at that level (``PerRankHead.level_targets``):
a label whose lineage stops above a level is trained towards that level's none
class. Levels a partial target does not determine (below it: the species of a
sample known only to genus) are ignored (``partial="ignore"``, default) or, with
``partial="null"``, trained towards the level's none class where it has one: the
per-rank "null" class of Linnaeus (FIELD_NOTES.md), which then also means "not
known at this rank". Scheduled null masking (``null_mask_start/end/steps``; after
Linnaeus' scheduled null-loss masking) drops the term of each sample whose level
target is the none class with a probability that moves linearly from start to
end over ``null_mask_steps`` training steps.

Taxonomy smoothing per task (``per_rank_ce`` with ``taxonomy_alpha`` > 0; FIELD_NOTES.md
"Taxonomy smoothing settings"): each level's target is ``1 - alpha`` on the true class ``i`` and
``alpha * w_ik / sum_{k != i} w_ik`` on the level's other classes, ``w_ik = exp(-beta * d_ik)`` with
``d_ik`` the tree path distance between the two class nodes. A class with no relative in its
level (no other class shares an ancestor below the root with it: a level whose classes are all
root children, or hierarchy links missing) and the none class fall back to uniform smoothing over
the level's other classes; no real class counts the none class as a relative (weight 0).
Distances come from the level's ``[C_j, depth+1]`` ancestor table, built once; a batch costs one
``[B, C_j]`` comparison per depth level.
"""

from __future__ import annotations

import warnings

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.heads.base import Head
from ..models.tree_tensors import LabelSets
from ..taxonomy import Taxonomy
from .base import Loss, register_loss


def _check_eps(eps: float) -> float:
    if not 0.0 <= float(eps) < 1.0:
        raise ConfigError(f"loss.label_smoothing={eps} must be in [0, 1)")
    return float(eps)


@register_loss("ce")
class CrossEntropy(Loss):
    """Cross-entropy over the label distribution, partial labels included (module docstring).

    Works with every head (it only uses ``head.label_log_probs``, or without label smoothing the
    head's ``target_log_likelihood`` shortcut where it has one: the same value). Task name: ``"labels"``.
    The batch loss is the mean over samples with a target (``-1`` ignored).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, label_smoothing: float = 0.0) -> None:
        super().__init__(taxonomy, head)
        self.label_smoothing = _check_eps(label_smoothing)
        self.sets = LabelSets(taxonomy)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def per_sample(self, label_log_probs: Tensor, targets: Tensor, mask: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
        """(nll [B], valid [B]) from label log-probs; nll is 0 where the target is -1. ``mask``: the
        ``[B, n_labels]`` label sets of the (clamped) targets, when the caller has them already.

        Rows whose target is a label take ``-log p(t)`` with one gather (the same number, and the
        same gradient, as the masked logsumexp over a one-label set); only the partial-label rows
        build their ``[n_partial, n_labels]`` label-set mask and take the masked logsumexp.
        """
        valid = targets >= 0
        t = targets.clamp(min=0)
        li = self.sets.label_index[t]
        lp = label_log_probs.float()
        nll = -lp.gather(1, li.clamp(min=0)[:, None])[:, 0]
        rows = torch.nonzero(valid & (li < 0))[:, 0]
        if rows.numel():
            m = self.sets.mask(t[rows]) if mask is None else mask[rows]
            part = -torch.logsumexp(lp[rows].masked_fill(~m, float("-inf")), dim=-1)
            nll = nll.index_put((rows,), part)
        if self.label_smoothing > 0:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * lp.mean(dim=-1)
        return torch.where(valid, nll, torch.zeros_like(nll)), valid

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        if self.label_smoothing == 0:
            ll = self.head.target_log_likelihood(outputs, targets.clamp(min=0))
            if ll is not None:   # the head's shortcut (e.g. hsoftmax's path product): same value
                valid = targets >= 0
                return {"labels": -torch.where(valid, ll.float(), torch.zeros_like(ll)).sum()
                        / valid.sum().clamp(min=1)}
        nll, valid = self.per_sample(self.head.label_log_probs(outputs), targets)
        return {"labels": nll.sum() / valid.sum().clamp(min=1)}


@register_loss("per_rank_ce")
class PerRankCrossEntropy(Loss):
    """One cross-entropy per level of a per-level head; tasks are the level names.

    Each level's loss is the mean over the samples that have a target at that level; a
    level with none in the batch gives a connected zero.

    Options: ``label_smoothing`` (uniform) or ``taxonomy_alpha`` / ``taxonomy_beta`` (taxonomy
    smoothing within each level, module docstring; alpha 0 = off); ``partial`` = ``"ignore"`` (default) or ``"null"`` (levels
    below a partial target train towards the level's none class where the head has one;
    levels without a none class keep ignoring them, listed in ``ignored_null_levels``);
    ``null_mask_start``, ``null_mask_end`` (probabilities in [0, 1], default 0) and
    ``null_mask_steps``: each none-class term is dropped with probability
    ``start + (end - start) * min(1, step / null_mask_steps)``. ``step`` advances by one on
    every forward in training mode; a loop that accumulates gradients or resumes sets it
    with :meth:`set_step`.
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, label_smoothing: float = 0.0, partial: str = "ignore",
                 null_mask_start: float = 0.0, null_mask_end: float = 0.0, null_mask_steps: int = 0,
                 taxonomy_alpha: float = 0.0, taxonomy_beta: float = 1.0) -> None:
        super().__init__(taxonomy, head)
        if not hasattr(head, "level_targets") or not hasattr(head, "levels"):
            raise ConfigError(f"loss 'per_rank_ce' needs a head with one output per level (e.g. 'per_rank'); "
                              f"the head {head.registry_name or type(head).__name__!r} has none. "
                              "Use loss.name=ce, which works with every head.")
        self.label_smoothing = _check_eps(label_smoothing)
        if partial not in ("ignore", "null"):
            raise ConfigError(f"loss.partial={partial!r} must be 'ignore' or 'null'")
        self.partial = partial
        for key, val in (("null_mask_start", null_mask_start), ("null_mask_end", null_mask_end)):
            if not 0.0 <= float(val) <= 1.0:
                raise ConfigError(f"loss.{key}={val} must be a probability in [0, 1]")
        if int(null_mask_steps) < 0:
            raise ConfigError(f"loss.null_mask_steps={null_mask_steps} must be >= 0")
        self.null_mask = (float(null_mask_start), float(null_mask_end), int(null_mask_steps))
        if not 0.0 <= float(taxonomy_alpha) < 1.0:
            raise ConfigError(f"loss.taxonomy_alpha={taxonomy_alpha} must be in [0, 1)")
        if not float(taxonomy_beta) >= 0.0:
            raise ConfigError(f"loss.taxonomy_beta={taxonomy_beta} must be >= 0")
        if float(taxonomy_alpha) > 0 and self.label_smoothing > 0:
            raise ConfigError("loss.label_smoothing and loss.taxonomy_alpha are two kinds of smoothing: set one")
        self.taxonomy_alpha, self.taxonomy_beta = float(taxonomy_alpha), float(taxonomy_beta)
        self.step = 0
        self.register_buffer("is_label", torch.from_numpy(taxonomy.is_label.copy()), persistent=False)
        classes = head.level_classes() if hasattr(head, "level_classes") else {}
        # index of each level's none class (-1: the level has none)
        self.none_index = {lv: (int(len(c) - 1) if len(c) and int(c[-1]) == -1 else -1) for lv, c in classes.items()}
        if self.taxonomy_alpha > 0:
            for j, lv in enumerate(head.levels):
                nodes = classes[lv].cpu().numpy()
                anc = np.full((len(nodes), taxonomy.max_depth + 1), -1, dtype=np.int64)
                real = nodes >= 0
                anc[real] = taxonomy.ancestor_matrix(nodes[real])
                dep = np.where(real, taxonomy.depth[np.maximum(nodes, 0)], -1)
                self.register_buffer(f"level_anc_{j}", torch.from_numpy(anc[:, :max(int(dep.max()), 0) + 1]),
                                     persistent=False)
                self.register_buffer(f"level_depth_{j}", torch.from_numpy(dep.astype(np.int64)), persistent=False)
        self.ignored_null_levels = tuple(lv for lv in head.levels if self.none_index.get(lv, -1) < 0)
        if partial == "null" and len(self.ignored_null_levels) == len(head.levels):
            warnings.warn("loss per_rank_ce with partial='null': no level of this head has a none class "
                          "(every label reaches every level), so partial targets are ignored below their "
                          "level as with partial='ignore'", stacklevel=2)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.head.levels)

    def set_step(self, step: int) -> None:
        """Set the training step the null-mask schedule reads."""
        self.step = int(step)

    def null_mask_probability(self) -> float:
        start, end, steps = self.null_mask
        frac = 1.0 if steps == 0 else min(1.0, self.step / steps)
        return start + (end - start) * frac

    def smoothed_targets(self, j: int, t: Tensor) -> Tensor:
        """``[B, C_j]`` taxonomy-smoothed target distribution of level ``j`` for class indices ``t``
        (``-1`` rows: zeros). Module docstring."""
        anc, dep = getattr(self, f"level_anc_{j}"), getattr(self, f"level_depth_{j}")
        n = anc.shape[0]
        tc = t.clamp(min=0)
        at = anc[tc]                                                        # [B, D]
        lca = torch.zeros(t.shape[0], n, dtype=torch.long, device=t.device)  # depth(LCA) + 1 (root agrees)
        for d in range(anc.shape[1]):
            lca += (at[:, d:d + 1] == anc[None, :, d]) & (at[:, d:d + 1] >= 0)
        real = dep >= 0
        dist = (dep[tc][:, None] + dep[None, :] - 2 * (lca - 1)).float()
        own = torch.nn.functional.one_hot(tc, n).bool()
        related = (lca > 1) & ~own & real[None, :] & real[tc][:, None]
        has = related.any(dim=-1, keepdim=True)
        logits = torch.where(has, -self.taxonomy_beta * dist, torch.zeros_like(dist))
        allowed = torch.where(has, real[None, :].expand_as(own), torch.ones_like(own)) & ~own
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        alpha = self.taxonomy_alpha * allowed.any(dim=-1, keepdim=True).float()
        out = (1.0 - alpha) * own.float() + alpha * w
        return torch.where((t >= 0)[:, None], out, torch.zeros_like(out))

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_targets(targets)
        level_targets = self.head.level_targets(targets)
        partial = (targets >= 0) & ~self.is_label[targets.clamp(min=0)]
        p_mask = self.null_mask_probability() if self.training else 0.0
        out = {}
        for j, level in enumerate(self.head.levels):
            t = level_targets[level]
            none = self.none_index.get(level, -1)
            if none >= 0:
                if self.partial == "null":
                    t = torch.where(partial & (t < 0), torch.full_like(t, none), t)
                if p_mask > 0:
                    drop = (t == none) & (torch.rand(t.shape, device=t.device) < p_mask)
                    t = torch.where(drop, torch.full_like(t, -1), t)
            if self.taxonomy_alpha > 0:
                with torch.no_grad():
                    soft = self.smoothed_targets(j, t)
                total = -(soft * outputs[level].float().log_softmax(dim=-1)).sum()
            else:
                total = F.cross_entropy(outputs[level].float(), t, ignore_index=-1, reduction="sum",
                                        label_smoothing=self.label_smoothing)
            out[level] = total / (t >= 0).sum().clamp(min=1)
        if self.training:
            self.step += 1
        return out
