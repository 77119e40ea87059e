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
levels a partial target does not determine are ignored; a label whose lineage
stops above a level is trained towards that level's none class.
"""

from __future__ import annotations

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

    Works with every head (it only uses ``head.label_log_probs``). Task name: ``"labels"``.
    The batch loss is the mean over samples with a target (``-1`` ignored).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, label_smoothing: float = 0.0) -> None:
        super().__init__(taxonomy, head)
        self.label_smoothing = _check_eps(label_smoothing)
        self.sets = LabelSets(taxonomy)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def per_sample(self, label_log_probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(nll [B], valid [B]) from label log-probs; nll is 0 where the target is -1."""
        valid = targets >= 0
        mask = self.sets.mask(targets.clamp(min=0)) | ~valid[:, None]  # unlabelled rows: a harmless full mask
        lp = label_log_probs.float()
        nll = -torch.logsumexp(lp.masked_fill(~mask, float("-inf")), dim=-1)
        if self.label_smoothing > 0:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * lp.mean(dim=-1)
        return torch.where(valid, nll, torch.zeros_like(nll)), valid

    def forward(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        self.check_targets(targets)
        nll, valid = self.per_sample(self.head.label_log_probs(outputs), targets)
        return {"labels": nll.sum() / valid.sum().clamp(min=1)}


@register_loss("per_rank_ce")
class PerRankCrossEntropy(Loss):
    """One cross-entropy per level of a per-level head; tasks are the level names.

    Each level's loss is the mean over the samples whose target determines that
    level; a level with none in the batch gives a connected zero.
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, label_smoothing: float = 0.0) -> None:
        super().__init__(taxonomy, head)
        if not hasattr(head, "level_targets") or not hasattr(head, "levels"):
            raise ConfigError(f"loss 'per_rank_ce' needs a head with one output per level (e.g. 'per_rank'); "
                              f"the head {head.registry_name or type(head).__name__!r} has none. "
                              "Use loss.name=ce, which works with every head.")
        self.label_smoothing = _check_eps(label_smoothing)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.head.levels)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        self.check_targets(targets)
        level_targets = self.head.level_targets(targets)
        out = {}
        for level in self.head.levels:
            t = level_targets[level]
            total = F.cross_entropy(outputs[level].float(), t, ignore_index=-1, reduction="sum",
                                    label_smoothing=self.label_smoothing)
            out[level] = total / (t >= 0).sum().clamp(min=1)
        return out
