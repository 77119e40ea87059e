"""Checks behind ``taxonomist taxonomy validate``: problems (rank order) and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..core import Taxonomy
from .ranks import rank_violations


@dataclass
class Validation:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_taxonomy(tax: Taxonomy, max_examples: int = 5) -> Validation:
    """Problems: nodes out of rank order, no label nodes. Warnings: label names shared by several
    label nodes, leaves that are not labels, single-child chains."""
    out = Validation()
    bad, above = rank_violations(tax, return_above=True)
    if len(bad):
        lines = []
        for v in bad[:max_examples]:
            u = _ranked_ancestor(tax, int(v))
            lines.append(f"  {tax.keys[v]!s} {tax.names[v]!r} ({tax.ranks[v]}) lies under {tax.names[u]!r} "
                         f"({tax.ranks[u]}): {tax.lineage(int(v))}")
        pairs = pd.DataFrame({"rank": tax.ranks[bad], "under": [tax.rank_order[a] for a in above]})
        common = ", ".join(f"{r} under {u} ({n:,})" for (r, u), n in pairs.value_counts().head(5).items())
        out.problems.append(f"{len(bad):,} node(s) out of rank order (ranks root first: "
                            f"{', '.join(tax.rank_order)}); most common: {common}\n" + "\n".join(lines)
                            + ("\n  ..." if len(bad) > max_examples else ""))
    if tax.n_labels == 0:
        out.problems.append("the tree has no label nodes")
    names = pd.Series(tax.names[tax.label_ids].astype(str))
    dup = names[names.duplicated(keep=False)]
    if len(dup):
        ex = ", ".join(map(repr, dup.unique()[:max_examples]))
        out.warnings.append(f"{dup.nunique():,} label name(s) are shared by several label nodes (e.g. {ex}); "
                            "refer to them by key or lineage")
    nl = int((tax.is_leaf & ~tax.is_label).sum())
    if nl:
        out.warnings.append(f"{nl:,} leaf node(s) are not labels (no model output can reach them)")
    single = int((tax.n_children == 1).sum())
    if single:
        out.warnings.append(f"{single:,} node(s) have a single child (single-child chains)")
    return out


def _ranked_ancestor(tax: Taxonomy, v: int) -> int:
    """Nearest ranked strict ancestor (error reporting only; bounded by the depth)."""
    u = int(tax.parent[v])
    while u > 0 and tax.ranks[u] == "":
        u = int(tax.parent[u])
    return u

