"""The per-rank head: one softmax per rank (or per depth level for unranked trees).

Levels come from ``taxonomy.rank_view(ranks)``: level ``j`` is the rank
``ranks[j]`` (all ranks of the tree by default) or, for an unranked tree, depth
``j + 1``. The classes of level ``j`` are the nodes at that level that have a
label node in their subtree, plus, where some label's lineage stops above the
level or skips it, one extra **none** class ("this label has no node at this
level", the per-rank null class of Linnaeus, see FIELD_NOTES.md).

Each label ``l`` has a code ``c_j(l)`` at every level: its ancestor-or-self at
that level, or *none*. The label distribution is the **product of experts**
(Hinton, 2002, "Training products of experts by minimizing contrastive
divergence") of the level softmaxes, renormalised over the label nodes::

    score(l)       = sum_j log p_j(c_j(l) | x)       (levels where l has a code)
    log p(l | x)   = score(l) - logsumexp_l' score(l')

So a label is likely when every level agrees with its lineage; the tree
enters through the codes, so moving a node changes the distribution. Without
the none class (``none_class=False``) a label is scored only on the levels its
lineage reaches, which favours shallow labels (fewer terms): keep it on unless
every label reaches every level.

The level layers are fused into one ``Linear(in_features, sum_j C_j)`` whose
row blocks are the per-level heads (same parameters as separate layers, one matmul).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...taxonomy import Taxonomy, TaxonomyError
from ..tree_tensors import ColumnSums, covered_nodes
from .base import Head, register_head

_BIG = np.iinfo(np.int64).max


def level_codes(taxonomy: Taxonomy, ranks: Sequence[str] | None = None, none_class: bool = True
                ) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """The per-level class structure of a taxonomy.

    Returns ``(levels, class_nodes, label_codes, node_targets)``:

    * ``levels``: level names (ranks, or ``level1..levelK``), empty levels dropped;
    * ``class_nodes[j]``: node id of each class of level j (``-1`` for the none class, always last);
    * ``label_codes[i, j]``: class index of label ``i`` at level j, ``-1`` where it has none
      and the level has no none class;
    * ``node_targets[v, j]``: the class a sample with target node ``v`` has at level j, ``-1`` when
      it is not determined. A label node has its own code; a non-label node (a partial label)
      has the code shared by every label under it, or -1 when those labels differ there
      (e.g. the species level of a sample known only to genus); a node with no label below it
      has -1 everywhere.
    """
    view = taxonomy.rank_view(ranks)
    names = taxonomy.level_names(ranks)
    covered = covered_nodes(taxonomy)
    labels = taxonomy.label_ids
    ids = np.arange(taxonomy.n_nodes)
    m = taxonomy.marginalization_matrix().tocoo()  # (label row, ancestor-or-self col) pairs
    levels, class_nodes, codes = [], [], []
    for j, name in enumerate(names):
        nodes = ids[(view[:, j] == ids) & covered]
        if len(nodes) == 0:
            continue
        lab_anc = view[labels, j]
        code = np.full(len(labels), -1, dtype=np.int64)
        has = lab_anc >= 0
        code[has] = np.searchsorted(nodes, lab_anc[has])
        if none_class and not has.all():
            code[~has] = len(nodes)
            nodes = np.append(nodes, -1)
        levels.append(name)
        class_nodes.append(nodes)
        codes.append(code)
    if not levels:
        raise TaxonomyError(f"no level of this taxonomy has nodes above its labels (levels {names}); "
                            "the per_rank head needs ranks or depth levels")
    label_codes = np.stack(codes, axis=1)
    node_targets = np.full((taxonomy.n_nodes, len(levels)), -1, dtype=np.int64)
    for j in range(len(levels)):
        vals = label_codes[m.row, j]
        lo = np.full(taxonomy.n_nodes, _BIG, dtype=np.int64)
        hi = np.full(taxonomy.n_nodes, -_BIG, dtype=np.int64)
        np.minimum.at(lo, m.col, vals)
        np.maximum.at(hi, m.col, vals)
        node_targets[:, j] = np.where(covered & (lo == hi), lo, -1)
    node_targets[labels] = label_codes  # a label target is that label, not its subtree
    return levels, class_nodes, label_codes, node_targets


@register_head("per_rank")
class PerRankHead(Head):
    """One softmax per rank/level; outputs keyed by level name (see module docstring).

    Options: ``ranks`` (which ranks, root first; default all ranks of the tree, or
    the depth levels of an unranked tree), ``none_class`` (add a none class where
    a label lacks the level; default True), ``dropout`` before the layer.
    """

    def __init__(self, taxonomy: Taxonomy, in_features: int, ranks: Sequence[str] | None = None,
                 none_class: bool = True, dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features)
        levels, class_nodes, label_codes, node_targets = level_codes(taxonomy, ranks, none_class)
        self.levels: tuple[str, ...] = tuple(levels)
        self.sizes: list[int] = [len(c) for c in class_nodes]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        total = int(offsets[-1])
        # column of each (label, level) class in the concatenated level log-probs (-1: no class there)
        gather = np.where(label_codes >= 0, label_codes + offsets[:-1][None, :], -1)
        # a label's score = the sum of its classes' log-probabilities over the levels (none class: 0).
        # log_softmax(Z_j)[c] = Z_j[c] - logsumexp(Z_j), so the score is a sparse sum of the raw logits
        # minus sum_j logsumexp(Z_j) over the levels where the label has a class; where every label
        # has a class at every level that term is the same for all labels and cancels in the final
        # log_softmax. A level with one class adds log 1 = 0 and is left out.
        use = label_codes >= 0
        use[:, np.asarray(self.sizes) == 1] = False
        lab, lev = np.nonzero(use)
        self.level_sum = ColumnSums(lab, gather[lab, lev], taxonomy.n_labels, total)
        varied = np.flatnonzero(~(use.all(axis=0) | ~use.any(axis=0)))  # levels some labels lack (not all/none)
        self.lse_levels: list[int] = varied.tolist()
        self.register_buffer("lse_use", torch.from_numpy(use[:, varied].astype(np.float32)), persistent=False)
        self.register_buffer("node_targets", torch.from_numpy(node_targets), persistent=False)
        self.register_buffer("class_nodes", torch.from_numpy(np.concatenate(class_nodes).astype(np.int64)),
                             persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(self.in_features, total)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.levels

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        z = self.linear(self.dropout(features))
        return dict(zip(self.levels, z.split(self.sizes, dim=-1), strict=True))

    def level_log_probs(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each level's own softmax, log-space, [B, C_j] float32 (the none class last where present)."""
        return {lv: outputs[lv].float().log_softmax(dim=-1) for lv in self.levels}

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        z = [outputs[lv].float() for lv in self.levels]
        score = self.level_sum(torch.cat(z, dim=-1))
        if self.lse_levels:      # levels only some labels have a class at: their logsumexp differs by label
            lse = torch.stack([z[j].logsumexp(dim=-1) for j in self.lse_levels], dim=-1)
            score = score - lse @ self.lse_use.t()
        return score.log_softmax(dim=-1)

    def level_classes(self) -> dict[str, Tensor]:
        """Node id of each class per level (``-1`` = the none class)."""
        return dict(zip(self.levels, self.class_nodes.split(self.sizes), strict=True))

    def level_predictions(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Argmax of each level's own softmax as a node id per sample (``-1`` = none), [B] per level.

        These are the per-level experts' answers (for per-rank metrics of the level
        heads themselves); they need not lie on one lineage. The coherent answer is the
        label distribution (``label_log_probs`` / ``node_probs``).
        """
        classes = self.level_classes()
        return {lv: classes[lv][outputs[lv].argmax(dim=-1)] for lv in self.levels}

    def level_targets(self, targets: Tensor) -> dict[str, Tensor]:
        """Target node ids [B] (-1 = unknown) -> class index per level [B] (-1 = ignore)."""
        t = self.node_targets[targets.clamp(min=0)]
        t = torch.where((targets >= 0)[:, None], t, -1)
        return {lv: t[:, j] for j, lv in enumerate(self.levels)}
