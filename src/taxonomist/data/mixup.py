"""Taxon-grouped mixup and cutmix: mix only samples that share a taxon at a grouping rank.

Plain mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR
2018) blends two random images, ``x = lam * x_i + (1 - lam) * x_j`` with
``lam ~ Beta(alpha, alpha)``; cutmix (Yun et al., "CutMix", ICCV 2019) pastes a
box of ``x_j`` into ``x_i``, the box covering a fraction ``1 - lam`` of the
image, and then sets ``lam`` to the fraction actually left of ``x_i``. Either
way the target becomes a blend of two classes, which a hierarchical loss that
expects one node per sample cannot take.

**Grouped mixing** (design notes of taxonomist, after the "taxonomy-grouped
mixup" of earlier taxonomic classifiers): a sample is mixed only with a sample
that has the *same taxon at the grouping rank*, so every rank at or above it
keeps a single class. ``group_rank``:

* ``None`` (default): the label itself, the lowest rank in use. Pairs share
  their node, so the target of every sample is unchanged.
* a rank name of a ranked tree (``"genus"``): the sample's ancestor of that rank
  (``Taxonomy.rank_view``).
* a depth ``d`` (int) or ``"level<d>"`` (unranked trees such as NDSB plankton):
  the sample's ancestor at depth ``d``.

Samples without a taxon at the grouping rank are **never mixed**: unknown
labels (``-1``) and partial labels above the grouping rank (a family-level
sample when grouping by genus), unless ``mix_unknown=True`` (then they are
mixed among themselves, with a warning).

**Pairing** is vectorised: each sample gets its group id and a random key;
sorting by (group, key) lays every group out as one run, and each sample is
paired with the next one in its run (the last with the first), i.e. a random
cyclic permutation inside each group. Samples alone in their group are left
unmixed.

**Targets** (:class:`MixedBatch`): ``targets`` is the lowest common ancestor of
the pair, a single node. With the default grouping the two nodes are equal, so
``targets`` is the original target. With a coarser grouping rank the two may
differ below it: their LCA sits at or below the group node, every rank at or
above the grouping rank keeps its class, and below it the sample becomes a
*partial label* (known only to the LCA), which every taxonomist loss accepts.
``targets_a``, ``targets_b`` and ``lam`` are also returned for the usual
soft-target mixture, ``lam * loss(out, targets_a) + (1 - lam) * loss(out, targets_b)``
(:func:`mixture_loss`); unmixed samples have ``targets_a == targets_b``, so that
mixture is exact for them too when the loss is a mean over samples.
``taxonomist train`` trains on that mixture; ``targets`` (the LCA) reaches only
heads that take targets in their forward pass (the ArcFace margin). So with a
coarser grouping rank the loss below it is a soft target over the pair's two
classes, which is what the :class:`HierarchyConsistencyWarning` says.

Whether a batch is mixed at all is drawn with probability ``prob`` (a constant
or a :class:`~taxonomist.data.augment.ProbabilitySchedule`, e.g. cosine 0.8 ->
0.2); when both alphas are > 0, cutmix is chosen with probability
``cutmix_prob``. One ``lam`` per batch (as in the reference implementations).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..taxonomy import Taxonomy
from .augment import ProbabilitySchedule

GroupRank = str | int | None


class HierarchyConsistencyWarning(UserWarning):
    """A mixing configuration under which a mixed target may not be a single class at every rank."""


@dataclass
class MixedBatch:
    """What :class:`TaxonMixup` returns for one batch.

    inputs: mixed inputs (same shape and dtype as given).
    targets: LongTensor[B], the LCA of each pair: the target to give a loss that
        takes one node per sample (the original target for unmixed samples).
    targets_a, targets_b: LongTensor[B], each sample's own target and its partner's.
    lam: weight of ``targets_a`` (1.0 when the batch was not mixed).
    perm: LongTensor[B], the partner of each sample (itself when unmixed).
    mixed: BoolTensor[B], which samples were mixed.
    mode: ``"mixup"``, ``"cutmix"`` or ``"none"``.
    group_rank: the grouping rank used for this batch.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    targets_a: torch.Tensor
    targets_b: torch.Tensor
    lam: float
    perm: torch.Tensor
    mixed: torch.Tensor
    mode: str
    group_rank: GroupRank


def pair_within_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Partner of each sample: a random cyclic permutation inside each group (vectorised).

    ``groups``: int array [B]; negative ids are never paired. Returns ``perm`` [B]
    with ``perm[i] == i`` for excluded samples and for samples alone in their group,
    else another member of the same group; ``perm`` is a permutation.
    """
    g = np.asarray(groups, dtype=np.int64)
    b = len(g)
    perm = np.arange(b)
    if b < 2:
        return perm
    order = np.lexsort((rng.random(b), g))  # by group, then by a random key
    gs = g[order]
    is_start = np.r_[True, gs[1:] != gs[:-1]]
    run_start = np.flatnonzero(is_start)
    run_id = np.cumsum(is_start) - 1
    pos = np.arange(b)
    nxt = pos + 1
    wrap = np.r_[~is_start[1:], False]  # the next sorted position is in the same run
    nxt = np.where(wrap, nxt, run_start[run_id])
    perm[order] = order[nxt]
    perm[g < 0] = np.flatnonzero(g < 0)
    return perm


def _parse_rank(taxonomy: Taxonomy, rank: str | int) -> tuple[str, int | str]:
    """('depth', d) or ('rank', name); raises ConfigError naming the allowed values."""
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        d = int(rank)
        if not 1 <= d <= taxonomy.max_depth:
            raise ConfigError(f"mixup group_rank={rank}: a depth must be in 1..{taxonomy.max_depth}")
        return "depth", d
    if isinstance(rank, str):
        m = re.fullmatch(r"level(\d+)", rank)
        if m and rank not in taxonomy.rank_order:
            return _parse_rank(taxonomy, int(m.group(1)))
        if rank in taxonomy.rank_order:
            return "rank", rank
        allowed = list(taxonomy.rank_order) or [f"level1..level{taxonomy.max_depth}"]
        raise ConfigError(f"mixup group_rank={rank!r}: not a rank of this taxonomy; choose one of {allowed}, a depth "
                          "(int), or None for the label itself")
    raise ConfigError(f"mixup group_rank={rank!r}: expected a rank name, a depth or None")


class TaxonMixup:
    """Taxon-grouped mixup / cutmix of a batch (see the module docstring).

    Args:
        taxonomy: the training taxonomy (targets are its node ids).
        mixup_alpha: Beta(alpha, alpha) of mixup; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of cutmix; 0 disables cutmix (inputs must be [B, C, H, W]).
        cutmix_prob: probability of cutmix rather than mixup when both are enabled.
        prob: probability that a batch is mixed: a number or a ProbabilitySchedule (or its dict).
        group_rank: None (the label itself), a rank name, a depth or ``"level<d>"``; a list of
            several is accepted with a warning, and each batch then uses one of them at random.
        task_ranks: the ranks the model is trained on (e.g. per-rank heads); used only to warn
            when the grouping rank is coarser than the lowest of them. None: the label nodes.
        mix_unknown: also mix samples with no taxon at the grouping rank among themselves (warns).
        seed: seed of the numpy generator behind every draw.
    """

    def __init__(self, taxonomy: Taxonomy, *, mixup_alpha: float = 0.2, cutmix_alpha: float = 0.0,
                 cutmix_prob: float = 0.5, prob: float | ProbabilitySchedule | dict[str, Any] = 1.0,
                 group_rank: GroupRank | Sequence[str | int] = None, task_ranks: Sequence[str | int] | None = None,
                 mix_unknown: bool = False, seed: int | None = None) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError(f"mixup: alphas must be >= 0 (got mixup_alpha={mixup_alpha}, "
                              f"cutmix_alpha={cutmix_alpha})")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ConfigError("mixup: mixup_alpha and cutmix_alpha are both 0; enable one (e.g. mixup_alpha=0.2) "
                              "or do not build a TaxonMixup")
        if not 0.0 <= cutmix_prob <= 1.0:
            raise ConfigError(f"mixup: cutmix_prob={cutmix_prob} is not a probability")
        self.taxonomy = taxonomy
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.cutmix_prob = float(cutmix_prob)
        self.schedule = ProbabilitySchedule.of(prob)
        self.mix_unknown = bool(mix_unknown)
        self.rng = np.random.default_rng(seed)
        ranks: list[GroupRank]
        if isinstance(group_rank, (list, tuple)):
            if not group_rank:
                raise ConfigError("mixup group_rank: an empty list; give one rank, or None for the label itself")
            ranks = list(group_rank)
        else:
            ranks = [group_rank]  # type: ignore[list-item]
        self.group_ranks: list[GroupRank] = ranks
        self._lookup: list[np.ndarray] = [self._group_lookup(r) for r in ranks]
        self._warn_config(task_ranks)

    # ------------------------------------------------------------ groups
    def _group_lookup(self, rank: GroupRank) -> np.ndarray:
        """Group node of every node id at ``rank`` (-1: none); index n_nodes maps the unknown target -1."""
        tax = self.taxonomy
        if rank is None:
            look = np.arange(tax.n_nodes, dtype=np.int64)
        else:
            kind, value = _parse_rank(tax, rank)
            if kind == "depth":
                look = tax.ancestor_at_depth(np.arange(tax.n_nodes), int(value))
            else:
                look = tax.rank_view([str(value)])[:, 0]
        return np.r_[look, -1].astype(np.int64)

    def _rank_position(self, rank: GroupRank) -> tuple[str, int] | None:
        """('depth', d) / ('rank', index in rank_order) for comparisons; None for the label itself."""
        if rank is None:
            return None
        kind, value = _parse_rank(self.taxonomy, rank)
        return (kind, int(value)) if kind == "depth" else (kind, self.taxonomy.rank_order.index(str(value)))

    def _warn_config(self, task_ranks: Sequence[str | int] | None) -> None:
        tax = self.taxonomy
        if len(self.group_ranks) > 1:
            warnings.warn(f"mixup: several grouping ranks {self.group_ranks} given; each batch is grouped by one of "
                          "them at random, and a pair that matches only on the coarser one differs at the finer "
                          "ranks, so its target is not one class at every rank. Give a single grouping rank "
                          "to keep targets consistent.", HierarchyConsistencyWarning, stacklevel=3)
        if self.mix_unknown:
            warnings.warn("mixup: mix_unknown=True mixes samples that have no taxon at the grouping rank (unknown "
                          "or partial labels) among themselves; the mixed input then gets the blend "
                          "lam * loss(own label) + (1 - lam) * loss(partner's label) (mixture_loss), where an "
                          "unknown label adds nothing, so a sample is trained toward a partner's class it may not "
                          "belong to (MixedBatch.targets, given to margin heads, is the pair's common ancestor or "
                          "-1). Leave mix_unknown=False to keep them unmixed.",
                          HierarchyConsistencyWarning, stacklevel=3)
        for rank, look in zip(self.group_ranks, self._lookup):
            if rank is None:
                continue
            if task_ranks:
                pos = self._rank_position(rank)
                assert pos is not None
                lowest = [self._rank_position(r) for r in task_ranks]
                finer = [r for r, p in zip(task_ranks, lowest) if p is not None and p[0] == pos[0] and p[1] > pos[1]]
                if finer:
                    warnings.warn(f"mixup: grouping rank {rank!r} is higher than the lowest task rank "
                                  f"{finer[-1]!r}; mixed pairs may differ at {finer}, and there the loss is "
                                  f"the blend lam * loss(own class) + (1 - lam) * loss(partner's class) "
                                  "(mixture_loss): a soft target over two classes, not one class (only margin "
                                  "heads get MixedBatch.targets, the pair's common ancestor). Group by "
                                  f"{finer[-1]!r} (or None) to keep every task's target a single class.",
                                  HierarchyConsistencyWarning, stacklevel=3)
            else:
                labels = tax.label_ids
                below = labels[(look[labels] >= 0) & (look[labels] != labels)]
                if len(below):
                    warnings.warn(f"mixup: grouping rank {rank!r} is higher than the lowest label rank: "
                                  f"{len(below)} label node(s) (e.g. {tax.names[below[0]]!r}) lie below it, so mixed "
                                  "pairs may have different labels; the loss is then the blend "
                                  "lam * loss(own label) + (1 - lam) * loss(partner's label) (mixture_loss), a "
                                  "soft target over two labels below the grouping rank, not one class (only margin "
                                  "heads get MixedBatch.targets, the pair's common ancestor). Use group_rank=None "
                                  "to mix only same-label pairs.", HierarchyConsistencyWarning, stacklevel=3)

    def group_ids(self, targets: np.ndarray | torch.Tensor, rank_index: int = 0) -> np.ndarray:
        """Group node of each target at ``group_ranks[rank_index]``; -1 where the sample is not mixable."""
        t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
        t = t.astype(np.int64)
        bad = (t < -1) | (t >= self.taxonomy.n_nodes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"mixup: target {int(t[i])} (batch position {i}) is not a node id of this taxonomy "
                              f"(0..{self.taxonomy.n_nodes - 1}, or -1 for unknown)")
        return self._lookup[rank_index][np.where(t < 0, self.taxonomy.n_nodes, t)]

    # ------------------------------------------------------------ mixing
    def probability(self, step: int | float) -> float:
        """Probability of mixing a batch at ``step`` (the schedule's value)."""
        return self.schedule(step)

    def _cutmix_box(self, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
        """Box of side ratio sqrt(1 - lam) at a uniform centre, clipped (Yun et al. 2019)."""
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(self.rng.integers(0, h)), int(self.rng.integers(0, w))
        y1, y2 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x1, x2 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        return int(y1), int(y2), int(x1), int(x2)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, step: int | float = 0) -> MixedBatch:
        """Mix a batch: ``inputs`` [B, ...] (images or features), ``targets`` LongTensor[B] node ids."""
        if inputs.shape[0] != targets.shape[0]:
            raise ConfigError(f"mixup: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
        b = int(targets.shape[0])
        device = targets.device
        rank_index = int(self.rng.integers(len(self.group_ranks))) if len(self.group_ranks) > 1 else 0
        rank = self.group_ranks[rank_index]
        identity = torch.arange(b, device=device)
        none = MixedBatch(inputs, targets, targets, targets, 1.0, identity, torch.zeros(b, dtype=torch.bool,
                          device=device), "none", rank)
        if self.rng.random() >= self.probability(step):
            return none
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.cutmix_prob)
        if use_cutmix and inputs.dim() != 4:
            raise ConfigError(f"cutmix needs images [B, C, H, W]; got inputs of shape {tuple(inputs.shape)} "
                              "(use mixup_alpha > 0 and cutmix_alpha=0 for feature vectors)")
        groups = self.group_ids(targets, rank_index)
        if self.mix_unknown:
            groups = np.where(groups < 0, self.taxonomy.n_nodes, groups)  # one pool for the rest
        perm_np = pair_within_groups(groups, self.rng)
        mixed_np = perm_np != np.arange(b)
        if not mixed_np.any():
            return none
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(perm_np).to(device)
        mixed = torch.from_numpy(mixed_np).to(device)
        rows = torch.from_numpy(np.flatnonzero(mixed_np)).to(inputs.device)
        partners = perm.to(inputs.device)[rows]
        out = inputs.clone()
        if use_cutmix:
            h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
            y1, y2, x1, x2 = self._cutmix_box(lam, h, w)
            out[rows, :, y1:y2, x1:x2] = inputs[partners, :, y1:y2, x1:x2]
            lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
            mode = "cutmix"
        else:
            out[rows] = (lam * inputs[rows] + (1.0 - lam) * inputs[partners]).to(inputs.dtype)
            mode = "mixup"
        t_np = targets.detach().cpu().numpy().astype(np.int64)
        b_np = t_np[perm_np]
        known = (t_np >= 0) & (b_np >= 0)
        lca = np.full(b, -1, dtype=np.int64)
        if known.any():
            lca[known] = self.taxonomy.lca(t_np[known], b_np[known])
        lca = np.where(mixed_np, lca, t_np)
        return MixedBatch(out, torch.from_numpy(lca).to(device), targets, torch.from_numpy(b_np).to(device),
                          lam, perm, mixed, mode, rank)


def mixture_loss(loss: Callable[..., dict[str, torch.Tensor]], outputs: Any, batch: MixedBatch,
                 extra_targets: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``lam * loss(outputs, targets_a) + (1 - lam) * loss(outputs, targets_b)`` per task (soft targets).

    ``loss`` follows the Loss interface (``forward(outputs, target_nodes[, extra_targets]) -> dict``).
    ``extra_targets`` (attribute targets by output key) are the samples' own for the first term and
    their partners' (permuted by ``batch.perm``) for the second. Exact for unmixed samples when the
    loss averages over samples (their two targets are equal).
    """
    if extra_targets is None:
        def call(targets: torch.Tensor, _extra: Any) -> dict[str, torch.Tensor]:
            return loss(outputs, targets)
    else:
        def call(targets: torch.Tensor, extra: Any) -> dict[str, torch.Tensor]:
            return loss(outputs, targets, extra)
    if batch.mode == "none":
        return call(batch.targets_a, extra_targets)
    la = call(batch.targets_a, extra_targets)
    lb = call(batch.targets_b, None if extra_targets is None else {k: v[batch.perm] for k, v in extra_targets.items()})
    return {k: batch.lam * la[k] + (1.0 - batch.lam) * lb[k] for k in la}
