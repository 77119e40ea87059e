"""Labels as the user wrote them -> node ids of the taxonomy.

Each *distinct* label is looked up once (``Taxonomy.find``: a name, or a node
key), then the result is broadcast to every row, so a million rows with a
thousand classes cost a thousand look-ups. Problems are reported per distinct
label with the rows that carry it: unknown names (with close-name
suggestions), homonyms (with the candidate lineages and keys), empty labels,
and per-rank columns that contradict the taxonomy's lineage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..taxonomy import AmbiguousNameError, Taxonomy, TaxonomyError, UnknownNameError
from .report import LoadReport

Locate = Callable[[np.ndarray], str]
"""Describes a group of rows (positions) for a report: ``"samples.csv lines 4, 9 (+3 more)"``."""


def group_rows(codes: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Row positions of every group code 0..n_groups-1 (stable order), in one sort."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    return [order[bounds[g]:bounds[g + 1]] for g in range(n_groups)]


def _ambiguous_detail(tax: Taxonomy, exc: AmbiguousNameError) -> str:
    shown = "; ".join(f"key {key!r}: {lineage}" for _, lineage, _, key in exc.candidates[:4])
    more = f"; ... {len(exc.candidates) - 4} more" if len(exc.candidates) > 4 else ""
    return f"{exc.name!r} names {len(exc.candidates)} taxa ({shown}{more}); use the key"


def _lookup(tax: Taxonomy, name: str) -> tuple[int, str, str]:
    """(node, problem kind, detail); node -1 with a kind on failure."""
    try:
        return tax.find(name), "", ""
    except AmbiguousNameError as exc:
        return -1, "ambiguous_label", _ambiguous_detail(tax, exc)
    except UnknownNameError as exc:
        return -1, "unknown_label", str(exc)


def _record(report: LoadReport, kind: str, rows: np.ndarray, locate: Locate, detail: str,
            lenient: bool) -> None:
    if lenient:
        report.note(f"{locate(rows)}: {detail} -> kept as unlabelled (node -1)")
    else:
        report.add(kind, locate(rows), detail, count=len(rows))


def resolve_labels(tax: Taxonomy, labels: Sequence[str] | np.ndarray, locate: Locate, report: LoadReport, *,
                   allow_empty: bool = False, lenient: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Node id per row and a mask of rows whose label failed.

    ``allow_empty``: an empty label means "unlabelled" (node -1), not a problem.
    ``lenient``: failed labels become notes and node -1 instead of problems
    (prediction inputs, where the label is only an optional truth).
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    uniq, inverse = np.unique(labels, return_inverse=True)
    node_of = np.full(len(uniq), -1, dtype=np.int64)
    bad_of = np.zeros(len(uniq), dtype=bool)
    failures: list[tuple[int, str, str]] = []
    for u, name in enumerate(uniq):
        if name.strip() == "":
            if not allow_empty:
                failures.append((u, "missing_label", "empty label"))
            continue
        node, kind, detail = _lookup(tax, name)
        if kind:
            failures.append((u, kind, detail))
        node_of[u] = node
    if failures:
        groups = group_rows(inverse, len(uniq))
        for u, kind, detail in failures:
            _record(report, kind, groups[u], locate, detail, lenient)
            bad_of[u] = not lenient
    return node_of[inverse], bad_of[inverse]


# --------------------------------------------------------------- rank columns
def _rank_of_column(tax: Taxonomy, column: str) -> str | None:
    lookup = {r.lower(): r for r in tax.rank_order}
    return lookup.get(column.strip().lower())


def _matches(tax: Taxonomy, node: int, value: str) -> bool:
    return value in (str(tax.names[node]), str(tax.keys[node]))


def _lineage_problem(tax: Taxonomy, cand: int, uppers: list[tuple[str, str | None, str]]) -> str:
    """Why candidate ``cand`` contradicts the upper rank columns ("" if it does not)."""
    anc = tax.ancestors(cand, include_self=False)
    name = str(tax.names[cand])
    for col, rank, value in uppers:
        if rank is not None:
            hits = [a for a in anc if tax.ranks[a] == rank]
            if not hits:
                return f"{col}={value!r}, but the taxonomy has no {rank} above {name!r} ({tax.lineage(cand)})"
            if not _matches(tax, hits[-1], value):
                return (f"{col}={value!r}, but the taxonomy puts {name!r} under {rank} "
                        f"{str(tax.names[hits[-1]])!r} ({tax.lineage(cand)})")
        elif not any(_matches(tax, a, value) for a in anc):
            return f"{col}={value!r} is not an ancestor of {name!r} ({tax.lineage(cand)})"
    return ""


def _resolve_lineage(tax: Taxonomy, columns: list[str], ranks: list[str | None],
                     values: Sequence[str]) -> tuple[int, str, str]:
    filled = [j for j, v in enumerate(values) if v.strip()]
    if not filled:
        return -1, "missing_label", "every rank column is empty"
    deep = filled[-1]
    value = values[deep].strip()
    uppers = [(columns[j], ranks[j], values[j].strip()) for j in filled[:-1]]
    cands = tax.find_all(value)
    if ranks[deep] is not None:
        of_rank = [c for c in cands if tax.ranks[c] == ranks[deep]]
        if cands and not of_rank:
            other = ", ".join(sorted({str(tax.ranks[c]) or "unranked" for c in cands}))
            return -1, "inconsistent_lineage", f"{columns[deep]}={value!r}, but in the taxonomy it is a {other}"
        cands = of_rank
    if not cands:
        node, kind, detail = _lookup(tax, value)  # a node key, or an unknown name with suggestions
        if kind:
            return -1, kind, detail
        cands = [node]
    reasons = [_lineage_problem(tax, c, uppers) for c in cands]
    good = [c for c, r in zip(cands, reasons) if not r]
    if len(good) == 1:
        return good[0], "", ""
    if not good:
        return -1, "inconsistent_lineage", reasons[0]
    return -1, "ambiguous_label", _ambiguous_detail(
        tax, AmbiguousNameError(value, [(c, tax.lineage(c), str(tax.ranks[c]), str(tax.keys[c])) for c in good]))


def resolve_lineages(tax: Taxonomy, columns: Sequence[str], values: np.ndarray, locate: Locate,
                     report: LoadReport, *, lenient: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank label columns (root first, e.g. kingdom..species) -> node per row.

    The label is the deepest non-empty column; every non-empty column above it
    must agree with the taxonomy's lineage of that node (columns named like a rank
    of the taxonomy are compared with the ancestor of that rank, other columns
    must name some ancestor). Upper columns also disambiguate homonyms.
    """
    columns = list(columns)
    ranks = [_rank_of_column(tax, c) for c in columns]
    values = np.asarray(values, dtype=object).astype(str)
    if values.ndim != 2 or values.shape[1] != len(columns):
        raise TaxonomyError(f"expected an [N, {len(columns)}] array of rank values, got {values.shape}")
    joined = np.array(["\x1f".join(r) for r in values], dtype=object) if len(values) else np.array([], object)
    uniq, first, inverse = np.unique(joined.astype(str), return_index=True, return_inverse=True)
    node_of = np.full(len(uniq), -1, dtype=np.int64)
    bad_of = np.zeros(len(uniq), dtype=bool)
    failures = []
    for u in range(len(uniq)):
        node, kind, detail = _resolve_lineage(tax, columns, ranks, list(values[first[u]]))
        node_of[u] = node
        if kind:
            failures.append((u, kind, detail))
    if failures:
        groups = group_rows(inverse, len(uniq))
        for u, kind, detail in failures:
            _record(report, kind, groups[u], locate, detail, lenient)
            bad_of[u] = not lenient
    return node_of[inverse], bad_of[inverse]
