"""Rank names: the canonical Linnaean order, unranked markers, rank-order checks.

The canonical order follows the ranks of the NCBI Taxonomy (Schoch et al. 2020,
*Database* baaa062, "NCBI Taxonomy: a comprehensive update on curation,
resources and tools") and the ICZN/ICN rank hierarchy, root first. Infraspecific
NCBI ranks (serotype, strain, isolate, ...) have no agreed nesting; they are put
below ``subspecies`` in the order NCBI most often nests them. Real NCBI data
breaks this order in places (see ``docs/taxonomy.md``), which is why edge tables
do not enforce it unless asked (``strict_ranks=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

#: Root-first canonical rank order. Synonyms share a neighbourhood (realm/domain/superkingdom,
#: phylum/division); a tree normally uses only one of each.
CANONICAL_RANKS: tuple[str, ...] = (
    "realm", "domain", "superkingdom", "kingdom", "subkingdom", "infrakingdom",
    "superphylum", "superdivision", "phylum", "division", "subphylum", "subdivision", "infraphylum",
    "superclass", "class", "subclass", "infraclass", "subterclass", "cohort", "subcohort",
    "superorder", "order", "suborder", "infraorder", "parvorder", "zoosection", "zoosubsection",
    "superfamily", "epifamily", "family", "subfamily", "supertribe", "tribe", "subtribe",
    "genus", "subgenus", "section", "subsection", "series", "subseries",
    "species_group", "species_subgroup", "complex", "species", "subspecies",
    "varietas", "variety", "subvariety", "forma", "form", "subform", "forma_specialis",
    "pathogroup", "serogroup", "serotype", "biotype", "genotype", "morph", "strain", "isolate",
)
_CANONICAL_INDEX = {r: i for i, r in enumerate(CANONICAL_RANKS)}

#: Rank values that mean "this node has no rank" (stored as "").
UNRANKED: frozenset[str] = frozenset({"", "no_rank", "norank", "clade", "unranked", "none", "nan"})

#: The seven FathomNet 2025 / WoRMS standard ranks.
STANDARD_RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

#: iNaturalist ``rank_level`` values with one rank name (levels shared by several ranks, such as 5 for
#: subspecies/variety/form, keep the name ``rank_level_<N>``). Source: iNaturalist Taxon model RANK_LEVELS.
INAT_RANK_LEVELS: dict[float, str] = {
    70: "kingdom", 67: "subkingdom", 60: "phylum", 57: "subphylum", 53: "superclass", 50: "class",
    47: "subclass", 45: "infraclass", 44: "subterclass", 43: "superorder", 40: "order", 37: "suborder",
    35: "infraorder", 34.5: "parvorder", 34: "zoosection", 33.5: "zoosubsection", 33: "superfamily",
    32: "epifamily", 30: "family", 27: "subfamily", 26: "supertribe", 25: "tribe", 24: "subtribe",
    20: "genus", 15: "subgenus", 13: "section", 12: "subsection", 11: "complex", 10: "species",
}


def _norm(value: str) -> str:
    return value.strip().lower().replace(" ", "_").replace("-", "_")


def normalize_rank(value: object) -> str:
    """Canonical spelling of a rank: known ranks lower-case (``"Species group"`` -> ``"species_group"``),
    unranked markers -> ``""``, anything else kept as written (stripped)."""
    text = "" if value is None else str(value).strip()
    key = _norm(text)
    if key in UNRANKED:
        return ""
    if key in _CANONICAL_INDEX:
        return key
    return text


def is_known_rank(rank: str) -> bool:
    return rank in _CANONICAL_INDEX


def canonical_sort(ranks: Iterable[str]) -> list[str]:
    """Known ranks in canonical root-first order (unknown ranks are dropped: see :func:`infer_rank_order`)."""
    return sorted({r for r in ranks if r in _CANONICAL_INDEX}, key=_CANONICAL_INDEX.__getitem__)


def infer_rank_order(ranks: np.ndarray, depth: np.ndarray | None = None) -> list[str]:
    """Root-first order of the ranks present in ``ranks`` (one per node, ``""`` = unranked).

    Rule: known ranks in :data:`CANONICAL_RANKS` order; each unknown rank is
    inserted after the last known rank whose mean node depth is not larger than
    its own (unknown ranks among themselves by mean depth, then name). Without
    known ranks this is the mean-depth order. ``depth`` is needed only when
    unknown ranks are present.
    """
    present = [r for r in pd.unique(np.asarray(ranks, dtype=object)) if r]
    known = canonical_sort(present)
    unknown = [r for r in present if r not in _CANONICAL_INDEX]
    if not unknown:
        return known
    if depth is None:
        raise ValueError("infer_rank_order needs node depths when unknown ranks are present")
    ranks_s = pd.Series(np.asarray(ranks, dtype=object))
    mean = pd.Series(np.asarray(depth, dtype=float)).groupby(ranks_s.to_numpy()).mean().to_dict()
    # position of every rank on a common scale: known ranks keep their canonical order, unknown
    # ones are slotted in by mean depth (stable ties: known before unknown, then name).
    slots: list[tuple[float, int, int, str]] = []
    best = -np.inf
    for i, r in enumerate(known):
        best = max(best, mean[r])  # known ranks are monotone on this scale
        slots.append((best, 0, i, r))
    for r in sorted(unknown, key=lambda r: (mean[r], r)):
        slots.append((mean[r], 1, 0, r))
    # known ranks must keep their canonical order even when their mean depths are not monotone
    slots.sort(key=lambda s: (s[0], s[1], s[2], s[3]))
    return [s[3] for s in slots]


def rank_index(ranks: np.ndarray, rank_order: Sequence[str]) -> np.ndarray:
    """Index of each node's rank in ``rank_order`` (-1 unranked), via factorize (no per-node loop)."""
    lookup = {r: i for i, r in enumerate(rank_order)}
    codes, uniques = pd.factorize(np.asarray(ranks, dtype=object), sort=False)
    table = np.array([lookup.get(u, -1) for u in uniques] + [-1], dtype=np.int64)
    return table[codes]


def rank_violations(tax, return_above: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Nodes whose rank is at or above the rank of their nearest ranked ancestor.

    Same rule as :meth:`Taxonomy.check_rank_order`, but returns the offending
    node ids (sorted) instead of raising, so loaders and ``validate`` can count
    them. Vectorised: one gather per depth level (ids are breadth-first).
    ``return_above=True`` also returns, per offending node, the index in
    ``rank_order`` of its nearest ranked ancestor's rank.
    """
    if not tax.rank_order:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty) if return_above else empty
    ri = rank_index(tax.ranks, tax.rank_order)
    bounds = np.searchsorted(tax.depth, np.arange(tax.max_depth + 2))
    above = np.full(tax.n_nodes, -1, dtype=np.int64)
    for d in range(1, tax.max_depth + 1):
        sl = slice(int(bounds[d]), int(bounds[d + 1]))
        p = tax.parent[sl]
        above[sl] = np.where(ri[p] >= 0, ri[p], above[p])
    bad = np.flatnonzero((ri >= 0) & (above >= ri))
    return (bad, above[bad]) if return_above else bad
