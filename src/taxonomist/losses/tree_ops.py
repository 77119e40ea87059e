"""Batched tree quantities the taxonomy-aware losses share, built once per loss.

* :class:`SubtreeLabels`: which labels lie in the subtree of each target node, ``[B, n_labels]``.
* :class:`LabelDistance`: ``D(label, target node)`` for every label and every target of a
  batch, ``[B, n_labels]``, for any target depth (a partial label's node included).
* :class:`NodeLogProbs`: ``log p(v)`` for every node (the log-mass of its subtree) from label
  log-probabilities, ``[B, n_nodes]``, summed level by level in float64.
* :class:`NodeDistance`: distances between node pairs (a prediction and a target).

Nothing here loops over nodes or pairs in Python (loops run over depth levels), and the only
quadratic object is the optional ``[n_labels, n_labels]`` int16 distance matrix, built once at
construction by :meth:`Taxonomy.distance_matrix` when ``n_labels <= dense_max``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.tree_tensors import LabelSets
from ..taxonomy import Taxonomy

METRICS = ("path", "lca_height", "rank_steps")
DENSE_DISTANCE_MAX = 10_000
"""Up to this many labels :class:`LabelDistance` keeps the ``[n_labels, n_labels]`` int16 matrix
(200 MB at 10^4); above it distances are computed per batch from the label ancestor table."""


def check_metric(taxonomy: Taxonomy, metric: str, option: str = "loss.metric") -> str:
    """Validate a distance metric name for this tree (``rank_steps`` needs ranks)."""
    if metric not in METRICS:
        raise ConfigError(f"{option}={metric!r} is not a distance metric; choose one of {', '.join(METRICS)}")
    if metric == "rank_steps" and not taxonomy.has_ranks:
        raise ConfigError(f"{option}=rank_steps needs a taxonomy with ranks; this one has none. "
                          "Use 'path' or 'lca_height'.")
    return metric


def node_key(taxonomy: Taxonomy, metric: str, ranks: Sequence[str] | None = None) -> np.ndarray:
    """The per-node quantity a distance is built from (int64):

    ``path``: depth, ``d = k_a + k_b - 2 k_lca``; ``rank_steps``: the number of ranked
    ancestors-or-self (ranks in ``ranks``), same formula; ``lca_height``: height,
    ``d = k_lca`` (0 when a == b).
    """
    if metric == "path":
        return taxonomy.depth.astype(np.int64)
    if metric == "rank_steps":
        return taxonomy.rank_count(ranks).astype(np.int64)
    return taxonomy.height.astype(np.int64)


def representative_labels(taxonomy: Taxonomy) -> np.ndarray:
    """For every node, the index (in ``label_ids`` order) of one label in its subtree: the node
    itself when it is a label, else the lowest label index below it; -1 when it has none."""
    m = taxonomy.marginalization_matrix().tocoo()
    big = np.iinfo(np.int64).max
    rep = np.full(taxonomy.n_nodes, big, dtype=np.int64)
    np.minimum.at(rep, m.col, m.row.astype(np.int64))
    rep[rep == big] = -1
    li = taxonomy.label_index
    return np.where(li >= 0, li, rep).astype(np.int64)


def ancestors_at_depths(parent: Tensor, depth: Tensor, nodes: Tensor, max_depth: int) -> Tensor:
    """``[B, max_depth + 1]``: the ancestor-or-self of each node at each depth, -1 below the node.

    ``max_depth`` parent gathers on the batch (no table over all nodes).
    """
    out = nodes.new_full((nodes.shape[0], max_depth + 1), -1)
    cur = nodes.clone()
    d = depth[nodes]
    for _ in range(max_depth + 1):
        # finished rows (d < 0) write the root (id 0) into column 0, which is right for every node
        alive = d >= 0
        out.scatter_(1, d.clamp(min=0)[:, None], torch.where(alive, cur, torch.zeros_like(cur))[:, None])
        cur = torch.where(alive, parent[cur].clamp(min=0), cur)
        d = d - 1
    return out


PATH_TABLE_MAX = 1 << 24
"""Up to this many ``n_nodes x (max_depth + 1)`` entries :class:`RootPaths` keeps an int32 table."""


class RootPaths(nn.Module):
    """``forward(t) -> [B, max_depth + 1]``: the ancestor-or-self of each node at each depth (-1 below it).

    One gather from an int32 ``[n_nodes, depth+1]`` table when it is small enough (``PATH_TABLE_MAX``
    entries: 64 MB), else ``max_depth`` parent gathers on the batch (:func:`ancestors_at_depths`).
    """

    def __init__(self, taxonomy: Taxonomy, table_max: int = PATH_TABLE_MAX) -> None:
        super().__init__()
        self.max_depth = int(taxonomy.max_depth)
        self.use_table = taxonomy.n_nodes * (self.max_depth + 1) <= table_max
        if self.use_table:
            table = taxonomy.ancestor_matrix().astype(np.int32)
            self.register_buffer("table", torch.from_numpy(table), persistent=False)
        else:
            self.register_buffer("parent", torch.from_numpy(taxonomy.parent.astype(np.int64)), persistent=False)
            self.register_buffer("depth", torch.from_numpy(taxonomy.depth.astype(np.int64)), persistent=False)

    def forward(self, targets: Tensor) -> Tensor:
        if self.use_table:
            return self.table[targets].long()
        return ancestors_at_depths(self.parent, self.depth, targets, self.max_depth)


class SubtreeLabels(LabelSets):
    """``forward(t) -> [B, n_labels]`` bool: label ``l`` is ``t`` or a descendant of ``t``
    (:meth:`LabelSets.inside`); ``meant(t)`` is :meth:`LabelSets.mask`, the labels a target stands for."""

    def forward(self, targets: Tensor) -> Tensor:
        return self.inside(targets)

    def meant(self, targets: Tensor, inside: Tensor | None = None) -> Tensor:
        return self.mask(targets, inside)


class LabelDistance(nn.Module):
    """``D(label, t)`` for every label and every target node ``t`` of a batch, float32 ``[B, n_labels]``.

    Distances follow :meth:`Taxonomy.distance` (``path``, ``lca_height``, ``rank_steps``) and are
    defined for a target at any depth. Two ways, same values:

    * **dense** (``n_labels <= dense_max``): the label-to-label matrix ``Dm`` built once, plus a
      representative label ``u`` under every node. For a label ``l`` outside the subtree of ``t``,
      ``LCA(l, t) = LCA(l, u)`` (it is a strict ancestor of ``t``), so
      ``D(l, t) = Dm[l, u] + k_t - k_u`` (path, rank steps) or ``Dm[l, u]`` (LCA height); inside
      the subtree ``LCA(l, t) = t``: ``D = k_l - k_t`` or ``height(t)`` (0 for ``l == t``).
      Per batch: one row gather and a few ``[B, n_labels]`` operations.
    * **on the fly** (larger trees): the ancestors of ``t`` are nested pre-order intervals, and
      ``depth(LCA(l, t))`` is the number of them holding label ``l``'s pre-order position, minus 1:
      one batched ``searchsorted`` among the ``2 (depth + 1)`` interval bounds of each target,
      O(batch x labels x log depth) time, O(batch x labels) memory, no quadratic object.
    """

    def __init__(self, taxonomy: Taxonomy, metric: str = "path", ranks: Sequence[str] | None = None,
                 dense_max: int = DENSE_DISTANCE_MAX) -> None:
        super().__init__()
        self.metric = check_metric(taxonomy, metric)
        self.max_depth = int(taxonomy.max_depth)
        key = node_key(taxonomy, metric, ranks)
        labels = taxonomy.label_ids
        self.register_buffer("key", torch.from_numpy(key), persistent=False)
        self.register_buffer("label_key", torch.from_numpy(key[labels]), persistent=False)
        self.register_buffer("label_ids", torch.from_numpy(labels.astype(np.int64)), persistent=False)
        self.register_buffer("parent", torch.from_numpy(taxonomy.parent.astype(np.int64)), persistent=False)
        self.register_buffer("depth", torch.from_numpy(taxonomy.depth.astype(np.int64)), persistent=False)
        self.subtree = SubtreeLabels(taxonomy)
        self.dense = taxonomy.n_labels <= dense_max
        if not self.dense:
            self.paths = RootPaths(taxonomy)
            pre = taxonomy.preorder.astype(np.int64)
            self.register_buffer("preorder", torch.from_numpy(pre), persistent=False)
            self.register_buffer("size", torch.from_numpy(taxonomy.subtree_size.astype(np.int64)), persistent=False)
            self.register_buffer("label_pre", torch.from_numpy(pre[labels])[None, :], persistent=False)
        if self.dense:
            dm = taxonomy.distance_matrix(labels, metric=metric, ranks=ranks)
            self.register_buffer("matrix", torch.from_numpy(dm), persistent=False)
            self.register_buffer("rep", torch.from_numpy(representative_labels(taxonomy)), persistent=False)
            self.max_label_distance = float(dm.max()) if dm.size else 0.0
        else:
            self.max_label_distance = float(_label_distance_bound(taxonomy, key, metric))

    def forward(self, targets: Tensor, inside: Tensor | None = None) -> Tensor:
        """``[B]`` node ids (>= 0) -> ``[B, n_labels]`` float32 distances. ``inside``: the
        ``self.subtree(targets)`` mask, when the caller has it already."""
        if self.dense:
            return self._dense(targets, self.subtree(targets) if inside is None else inside)
        return self._on_the_fly(targets)

    def _dense(self, t: Tensor, inside: Tensor) -> Tensor:
        u = self.rep[t]
        row = self.matrix[u.clamp(min=0)].float()
        if self.metric == "lca_height":
            within = self.key[t].float()[:, None].expand_as(row)
            within = within.masked_fill(self.label_ids[None, :] == t[:, None], 0.0)
            return torch.where(inside, within, row)
        kt = self.key[t].float()[:, None]
        within = self.label_key.float()[None, :] - kt
        outside = row + (kt - self.key[self.label_ids[u.clamp(min=0)]].float()[:, None])
        return torch.where(inside, within, outside)

    def _on_the_fly(self, t: Tensor) -> Tensor:
        # The ancestors of t are nested pre-order intervals [pre_a, pre_a + size_a); the depth of
        # LCA(l, t) is (number of those intervals holding pre_l) - 1: one batched searchsorted of
        # the labels' pre-order positions among the 2 (depth + 1) interval ends of each target.
        anc = self.paths(t)                                      # [B, depth + 1], -1 below t
        ok = anc >= 0
        a = anc.clamp(min=0)
        big = torch.iinfo(torch.int64).max
        start = torch.where(ok, self.preorder[a], big)
        end = torch.where(ok, self.preorder[a] + self.size[a], big)
        bounds, order = torch.sort(torch.cat([start, end], dim=1), dim=1, stable=True)
        step = torch.cat([torch.ones_like(start), -torch.ones_like(end)], dim=1).gather(1, order)
        inside = step.cumsum(1)                                  # intervals holding a point after each bound
        pos = torch.searchsorted(bounds, self.label_pre.expand(t.shape[0], -1).contiguous(), right=True)
        depth_lca = inside.gather(1, (pos - 1).clamp(min=0)) - 1  # pos >= 1: the root interval holds all
        lca = anc.gather(1, depth_lca.clamp(min=0))              # [B, n_labels] node ids
        if self.metric == "lca_height":
            out = self.key[lca].float()
            return out.masked_fill(self.label_ids[None, :] == t[:, None], 0.0)
        return (self.label_key[None, :] + self.key[t][:, None] - 2 * self.key[lca]).float()


def _label_distance_bound(taxonomy: Taxonomy, key: np.ndarray, metric: str) -> int:
    """Largest label-to-label distance without the quadratic matrix: exact for ``lca_height``
    (the height of the LCA of all labels), an upper bound ``2 (max k_label - k_lca_all)`` otherwise."""
    labels = taxonomy.label_ids
    if len(labels) < 2:
        return 0
    anc = taxonomy.ancestor_matrix(labels)
    same = np.logical_and.accumulate((anc == anc[:1]).all(axis=0) & (anc[0] >= 0))
    top = anc[0, int(np.flatnonzero(same).max())]             # deepest node above every label
    if metric == "lca_height":
        return int(key[top])
    return int(2 * (key[labels].max() - key[top]))


class NodeLogProbs(nn.Module):
    """``log p(v)`` for every node from label log-probabilities: ``[B, n_labels] -> [B, n_nodes]`` (float64).

    ``p(v)`` is the mass of the labels in v's subtree (v itself included when it is a label), as in
    :class:`~taxonomist.models.tree_tensors.Marginalizer`. Summed bottom-up, one ``index_add`` of each
    depth level into its parents, in **float64** probability space: a sum of positive terms has no
    cancellation, float64 keeps ~16 digits, and ``exp`` only underflows below ``log p = -745`` (a
    subtree whose every label is that unlikely gets ``log(tiny) = -708`` and no gradient, as do nodes
    with no label below them). The log of a subtree mass is therefore exact to float64 rounding, which
    matters for conditionals ``log p(child) - log p(parent)`` near 0. O(batch x nodes) time and memory,
    ``max_depth`` additions.
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        super().__init__()
        depth = taxonomy.depth
        self.n_nodes = taxonomy.n_nodes
        bounds = np.searchsorted(depth, np.arange(taxonomy.max_depth + 2))   # canonical order: by depth
        self.widths = np.diff(bounds).tolist()
        self._n_levels = taxonomy.max_depth + 1
        self.register_buffer("label_ids", torch.from_numpy(taxonomy.label_ids.astype(np.int64)), persistent=False)
        for d in range(self._n_levels - 1):
            kids = np.arange(bounds[d + 1], bounds[d + 2])
            # position, within level d, of the parent of every node of level d + 1
            self.register_buffer(f"up{d}", torch.from_numpy(taxonomy.parent[kids] - bounds[d]), persistent=False)

    def forward(self, label_log_probs: Tensor) -> Tensor:
        return self.masses(label_log_probs).clamp(min=torch.finfo(torch.float64).tiny).log()

    def masses(self, label_log_probs: Tensor) -> Tensor:
        """The subtree masses ``p(v)`` themselves, float64 ``[B, n_nodes]`` (take the log of what you gather)."""
        p = label_log_probs.double().exp()
        own = p.new_zeros(p.shape[0], self.n_nodes).index_copy(1, self.label_ids, p)
        levels = list(own.split(self.widths, dim=1))         # one block per depth level
        for d in range(self._n_levels - 2, -1, -1):
            levels[d] = levels[d].index_add(1, getattr(self, f"up{d}"), levels[d + 1])
        return torch.cat(levels, dim=1)


class NodeDistance(nn.Module):
    """Distances between node pairs ``a[i], b[i]`` (same metrics as :meth:`Taxonomy.distance`), ``[B]``.

    ``depth(LCA)`` is the number of depths where the two root paths (:class:`RootPaths`) agree.
    """

    def __init__(self, taxonomy: Taxonomy, metric: str = "path", ranks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.metric = check_metric(taxonomy, metric)
        self.paths = RootPaths(taxonomy)
        self.register_buffer("key", torch.from_numpy(node_key(taxonomy, metric, ranks)), persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ta, tb = self.paths(a), self.paths(b)
        agree = ((ta == tb) & (ta >= 0)).sum(dim=1)
        lca = ta.gather(1, (agree - 1).clamp(min=0)[:, None])[:, 0]
        if self.metric == "lca_height":
            return torch.where(a == b, torch.zeros_like(lca), self.key[lca])
        return self.key[a] + self.key[b] - 2 * self.key[lca]
