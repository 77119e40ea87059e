"""Parent/child edge tables: NCBI, iNaturalist, Darwin Core and taxonomist's own TSV.

Recognised columns (case, ``_`` and spaces ignored):

* id: ``tax_id``, ``taxon_id``, ``taxonID``, ``id``
* parent: ``parent_tax_id``, ``parent_taxon_id``, ``parentNameUsageID``, ``parent_id``, ``parent``
* rank (optional): ``rank``, ``taxonRank``, ``rank_level`` (iNaturalist numeric levels)
* name (optional, else the id): ``scientific_name``, ``scientificName``, ``name``
* label flags (optional): ``is_label`` (1/0, true/false)

The root is the row whose parent is empty or the row itself (NCBI: tax_id 1 is its
own parent). Several such rows get a synthetic root. Keys are the ids.

Big files are read with pandas (typed columns) and ids are mapped to rows with a
direct lookup table (dense integer ids, as in NCBI), ``numpy.searchsorted``
(other integer ids) or ``pandas.factorize`` (text ids): no per-row Python loop.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import (PathLike, as_names, build_taxonomy, finish, head_lines, line_where, names_to_mask, read_table,
                      sniff_delimiter, suffix, write_text)
from .ranks import INAT_RANK_LEVELS, canonical_sort, normalize_rank
from .report import LoadReport

ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("taxid", "taxonid", "id", "nodeid"),
    "parent": ("parenttaxid", "parenttaxonid", "parentnameusageid", "parentid", "parent", "parentnodeid"),
    "rank": ("rank", "taxonrank", "ranklevel"),
    "name": ("scientificname", "name", "taxonname"),
    "label": ("islabel",),
    "status": ("taxonomicstatus",),
}
DWC_MARKERS = ("taxonid", "parentnameusageid", "scientificname", "taxonrank")
#: taxonomicStatus values (lower-case) whose rows are not accepted taxa and are skipped (GBIF vocabulary).
NOT_ACCEPTED = ("synonym", "misapplied")


def _norm(col: str) -> str:
    return "".join(ch for ch in col.lower() if ch.isalnum())


def identify_columns(header: Sequence[str], columns: Mapping[str, str] | None = None,
                     ignore_columns: Iterable[str] = ()) -> tuple[dict[str, str], list[str], bool]:
    """Map roles (id, parent, rank, name, label, status) to header columns.

    Returns ``(roles, unknown_columns, is_darwin_core)``. ``columns`` forces roles
    (``{"id": "TaxID", ...}``).
    """
    roles: dict[str, str] = {}
    for role, col in (columns or {}).items():
        if role not in ROLE_ALIASES:
            raise TaxonomyError(f"columns: unknown role {role!r}; roles are {', '.join(ROLE_ALIASES)}")
        if col not in header:
            raise TaxonomyError(f"columns: {col!r} is not a column of the file (columns: {list(header)})")
        roles[role] = col
    normed = {_norm(c): c for c in header}
    for role, aliases in ROLE_ALIASES.items():
        if role in roles:
            continue
        for alias in aliases:
            if alias in normed and normed[alias] not in roles.values():
                roles[role] = normed[alias]
                break
    is_dwc = any(m in normed for m in DWC_MARKERS[:2])
    ignored = set(as_names(ignore_columns))
    unknown = [c for c in header if c not in roles.values() and c not in ignored]
    return roles, unknown, is_dwc


def looks_like_edge_table(header: Sequence[str]) -> bool:
    roles, _, _ = identify_columns(header)
    return "id" in roles and "parent" in roles


def _read_ids(path: PathLike, sep: str, cols: list[str], roles: dict[str, str]) -> tuple[pd.DataFrame, bool]:
    """Read the table; integer ids as int64 when the whole column parses, else strings."""
    sample = read_table(path, sep, usecols=cols, nrows=2000)
    id_like = sample[[roles["id"], roles["parent"]]].apply(lambda c: c.str.fullmatch(r"\d{1,18}")).all().all()
    if not id_like:
        return read_table(path, sep, usecols=cols), False
    dtype: dict[str, object] = {c: object for c in cols}
    dtype[roles["id"]] = np.int64
    dtype[roles["parent"]] = np.int64
    try:
        return read_table(path, sep, dtype=dtype, usecols=cols), True
    except (ValueError, TypeError, OverflowError):
        return read_table(path, sep, usecols=cols), False


def _id_index(ids: np.ndarray, parents: np.ndarray, integer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row index of every parent id (-1 = not in the table), plus the rows of duplicated ids.

    Returns ``(parent_row, root_mask, dup_rows)``.
    """
    n = len(ids)
    if integer and n and ids.min() >= 0 and ids.max() < 4 * n + 1_000_000:
        # dense ids (NCBI: max id ~1.3 n): a direct lookup table, O(n) gathers
        root = parents == ids
        hi = int(ids.max())
        counts = np.bincount(ids, minlength=hi + 1)
        dup_rows = np.flatnonzero(counts[ids] > 1)
        row_of_id = np.full(hi + 1, -1, dtype=np.int64)
        row_of_id[ids[::-1]] = np.arange(n - 1, -1, -1)  # first occurrence wins
        inside = (parents >= 0) & (parents <= hi)
        parent_row = np.where(inside, row_of_id[np.clip(parents, 0, hi)], -1)
    elif integer:
        root = parents == ids
        order = np.argsort(ids, kind="stable")
        srt = ids[order]
        dup_sorted = np.flatnonzero(srt[1:] == srt[:-1])
        dup_rows = np.unique(np.concatenate([order[dup_sorted], order[dup_sorted + 1]]))
        pos = np.minimum(np.searchsorted(srt, parents), n - 1)
        parent_row = np.where(srt[pos] == parents, order[pos], -1)
    else:
        root = (parents == "") | (parents == ids)
        codes, uniques = pd.factorize(np.concatenate([ids, parents]), sort=False)
        id_codes, par_codes = codes[:n], codes[n:]
        counts = np.bincount(id_codes, minlength=len(uniques))
        dup_rows = np.flatnonzero(counts[id_codes] > 1)
        row_of_code = np.full(len(uniques), -1, dtype=np.int64)
        row_of_code[id_codes[::-1]] = np.arange(n - 1, -1, -1)  # first occurrence wins
        parent_row = row_of_code[par_codes]
    parent_row = np.where(root, -1, parent_row)
    return parent_row, root, dup_rows


def _parse_flags(values: np.ndarray, where, column: str) -> np.ndarray:
    s = pd.Series(values, dtype=object).astype(str).str.strip().str.lower()
    truthy = s.isin(["1", "true", "yes", "y", "t"])
    falsy = s.isin(["0", "false", "no", "n", "f", ""])
    bad = np.flatnonzero(~(truthy | falsy).to_numpy())
    if len(bad):
        raise TaxonomyError(f"{where(int(bad[0]))}: column {column!r} must be 1/0 or true/false, "
                            f"got {values[bad[0]]!r}")
    return truthy.to_numpy()


def _rank_levels(values: np.ndarray, where) -> tuple[np.ndarray, list[str]]:
    """iNaturalist numeric rank levels -> rank names and a root-first rank order (descending level)."""
    lv = pd.to_numeric(pd.Series(values, dtype=object).replace("", np.nan), errors="coerce")
    bad = np.flatnonzero(lv.isna().to_numpy() & (pd.Series(values, dtype=object) != "").to_numpy())
    if len(bad):
        raise TaxonomyError(f"{where(int(bad[0]))}: rank_level must be a number, got {values[bad[0]]!r}")
    levels = sorted(lv.dropna().unique(), reverse=True)
    name_of = {v: INAT_RANK_LEVELS.get(float(v), f"rank_level_{float(v):g}") for v in levels}
    ranks = lv.map(name_of).fillna("").to_numpy(dtype=object)
    return ranks, [name_of[v] for v in levels]


def read_edge_table(path: PathLike, *, columns: Mapping[str, str] | None = None,
                    ignore_columns: Iterable[str] = (), orphans: str = "error",
                    multiple_parents: str = "error", strict_ranks: bool = False,
                    labels: Iterable[str] | None = None, keep_synonyms: bool = False,
                    return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a parent/child edge table (CSV/TSV, ``.gz`` allowed). See the module docstring for columns.

    orphans: ``"error"`` (default) or ``"attach_to_root"`` for rows whose parent id is not in the table.
    multiple_parents: ``"error"`` (default), or a DAG rule of :func:`taxonomist.taxonomy.dag.dag_to_tree`
        (``"longest"``, ``"shortest"``) when an id appears with several parents.
    strict_ranks: enforce the rank order (off by default: real NCBI breaks it, see docs/taxonomy.md);
        violations are counted in the report either way.
    labels: names of the label nodes (default: an ``is_label`` column, else the leaves).
    keep_synonyms: Darwin Core only; by default rows whose ``taxonomicStatus`` is a synonym (or
        misapplied) are skipped and counted.
    """
    if orphans not in ("error", "attach_to_root"):
        raise TaxonomyError(f"orphans must be 'error' or 'attach_to_root', got {orphans!r}")
    report = LoadReport(path=str(path), format="edges")
    head = head_lines(path, 2)
    if not head:
        raise TaxonomyError(f"{path}: the file is empty")
    sep = sniff_delimiter(path, head[0])
    header = next(csv.reader([head[0]], delimiter=sep))
    roles, unknown, is_dwc = identify_columns(header, columns, ignore_columns)
    missing_roles = [r for r in ("id", "parent") if r not in roles]
    if missing_roles:
        raise TaxonomyError(
            f"{path} line 1: an edge table needs an id and a parent column; no {' or '.join(missing_roles)} column "
            f"among {header}. Rename them (e.g. tax_id/parent_tax_id, taxonID/parentNameUsageID, id/parent_id) or "
            "pass columns={'id': ..., 'parent': ...}.")
    if unknown and not is_dwc:
        raise TaxonomyError(
            f"{path} line 1: unknown column(s) {unknown} (known: id, parent, rank, name, is_label columns: "
            f"{', '.join(roles.values())}). Remove them, or pass ignore_columns={unknown!r} "
            f"(CLI: --option ignore_columns={','.join(unknown)}).")
    if unknown and is_dwc:
        report.note(f"Darwin Core columns not used: {', '.join(unknown)}")
    usecols = [c for c in header if c in roles.values()]
    df, integer = _read_ids(path, sep, usecols, roles)
    report.rows_read = len(df)
    lines = np.arange(len(df), dtype=np.int64) + 2
    ids = df[roles["id"]].to_numpy()
    keep = np.ones(len(df), dtype=bool)
    if not integer:
        blank = (df[usecols] == "").all(axis=1).to_numpy()
        report.skip("blank lines", int(blank.sum()))
        keep &= ~blank
        empty_id = np.flatnonzero((ids == "") & keep)
        if len(empty_id):
            raise TaxonomyError(f"{Path(path).name} line {lines[empty_id[0]]}: empty id in column {roles['id']!r} "
                                f"({len(empty_id)} row(s)). Every row needs an id.")
    if "status" in roles and is_dwc and not keep_synonyms:
        status = df[roles["status"]].astype(str).str.lower()
        syn = status.str.contains("|".join(NOT_ACCEPTED), regex=True).to_numpy() & keep
        for value, count in df.loc[syn, roles["status"]].value_counts().items():
            report.skip(f"rows with taxonomicStatus {value!r} (not accepted taxa)", int(count))
        keep &= ~syn
    if not keep.all():
        df = df.loc[keep].reset_index(drop=True)
        lines = lines[keep]
        ids = df[roles["id"]].to_numpy()
    where = line_where(path, lines)
    parents = df[roles["parent"]].to_numpy()
    parent_row, root, dup_rows = _id_index(ids, parents, integer)
    names = df[roles["name"]].to_numpy(dtype=object) if "name" in roles else None
    # integer ids stay int64 here: the core turns keys into strings once (one C-level map(str))
    keys = ids if integer else ids.astype(object)
    if names is None:
        names = keys
        report.note("no name column: node names are the ids")
    if len(dup_rows):
        same_id = pd.DataFrame({"id": [str(k) for k in keys[dup_rows]],
                                "parent": [str(p) for p in parents[dup_rows]], "row": dup_rows})
        n_par = same_id.groupby("id")["parent"].nunique()
        multi = n_par[n_par > 1]
        if len(multi) and multiple_parents != "error":
            keys_s = np.array(list(map(str, keys.tolist())), dtype=object)
            return _finish_dag(df, roles, keys_s, names if names is not keys else keys_s, parents, where, lines,
                               report, multiple_parents, strict_ranks, labels, return_report)
        bad_id = multi.index[0] if len(multi) else n_par.index[0]
        rows = same_id[same_id["id"] == bad_id]
        listed = "; ".join(f"{where(int(r))} (parent {p!r})" for r, p in zip(rows["row"], rows["parent"]))
        if len(multi):
            raise TaxonomyError(
                f"{len(multi)} id(s) have several parents, e.g. {bad_id!r}: {listed}. A tree gives each taxon one "
                "parent: fix the rows, or load it as a DAG with multiple_parents='longest'.")
        raise TaxonomyError(f"duplicate id {bad_id!r} ({len(n_par)} duplicated id(s)): {listed}. "
                            "Every row needs a unique id: remove the repeated rows.")
    orphan = np.flatnonzero((parent_row < 0) & ~root)
    if len(orphan):
        if orphans == "error":
            shown = "; ".join(f"{where(int(i))}: parent {str(parents[i])!r} of {str(keys[i])!r}" for i in orphan[:5])
            raise TaxonomyError(
                f"{len(orphan)} row(s) name a parent id that is not in the table: {shown}. Add the missing rows, or "
                "pass orphans='attach_to_root' to hang them under the root.")
        roots = np.flatnonzero(root)
        target = int(roots[0]) if len(roots) == 1 else -1
        parent_row = parent_row.copy()
        parent_row[orphan] = target
        report.repair("orphan rows (parent id not in the table) attached to the root", len(orphan))
    return _finish(df, roles, parent_row, keys, names, where, report, strict_ranks, labels, return_report)


def _ranks_and_order(df: pd.DataFrame, roles: dict[str, str], where, report: LoadReport
                     ) -> tuple[np.ndarray | None, list[str] | None]:
    if "rank" not in roles:
        return None, None
    raw = df[roles["rank"]].to_numpy(dtype=object)
    if _norm(roles["rank"]) == "ranklevel":
        return _rank_levels(raw, where)
    codes, uniques = pd.factorize(raw, sort=False)
    normalized = [normalize_rank(u) for u in uniques]
    ranks = np.array(normalized + [""], dtype=object)[codes]
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    kinds = {str(u) or "empty": int(c) for u, norm, c in zip(uniques, normalized, counts) if not norm}
    if kinds:
        report.note(f"{sum(kinds.values()):,} node(s) have no rank ("
                    + ", ".join(f"{k}: {v:,}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ")")
    present = {r for r in normalized if r}
    order = canonical_sort(present)
    return ranks, (order if len(order) == len(present) else None)


def _finish(df, roles, parent_row, keys, names, where, report, strict_ranks, labels, return_report):
    ranks, rank_order = _ranks_and_order(df, roles, where, report)
    label_mask: np.ndarray | str = "leaves"
    if labels is not None:
        label_mask = names_to_mask(np.asarray(names, dtype=object), labels, report.path, where)
    elif "label" in roles:
        label_mask = _parse_flags(df[roles["label"]].to_numpy(dtype=object), where, roles["label"])
    tax = build_taxonomy(parent_row, names, report=report, where=where, ranks=ranks, keys=keys, labels=label_mask,
                         rank_order=rank_order, check_rank_order=strict_ranks)
    return finish(tax, report, return_report)


def _finish_dag(df, roles, keys, names, parents, where, lines, report, rule, strict_ranks, labels, return_report):
    """An id with several parents: keep one row per id, resolve parents with dag.dag_to_tree."""
    from ..dag import dag_to_tree

    first = ~pd.Series(keys).duplicated().to_numpy()
    node_rows = np.flatnonzero(first)
    codes, uniq = pd.factorize(keys[node_rows])
    code_of = pd.Series(np.arange(len(uniq)), index=pd.Index(uniq))
    par_str = pd.Series(parents).astype(str).to_numpy(dtype=object)
    is_root = (par_str == "") | (par_str == keys)
    child_code = code_of.reindex(keys[~is_root]).to_numpy()
    parent_code = code_of.reindex(par_str[~is_root]).to_numpy()
    if np.isnan(parent_code).any():
        i = int(np.flatnonzero(~is_root)[np.flatnonzero(np.isnan(parent_code))[0]])
        raise TaxonomyError(f"{where(i)}: parent {par_str[i]!r} is not in the table; add the missing row")
    edges = pd.DataFrame({"c": child_code.astype(np.int64), "p": parent_code.astype(np.int64)}).drop_duplicates()
    result = dag_to_tree(len(uniq), edges["c"].to_numpy(), edges["p"].to_numpy(), keys=uniq, rule=rule,
                         where=lambda k: where(int(node_rows[k])))
    report.repair(f"nodes with several parents (kept the parent on the {rule} path to the root)",
                  result.n_multi_parent)
    sub = df.iloc[node_rows].reset_index(drop=True)
    node_where = line_where(report.path, lines[node_rows])
    return _finish(sub, roles, result.parent, keys[node_rows], np.asarray(names)[node_rows], node_where, report,
                   strict_ranks, labels, return_report)


def write_edge_table(tax: Taxonomy, path: PathLike, sep: str | None = None) -> Path:
    """Write ``id, parent_id, rank, name, is_label`` (tab-separated unless the name ends in .csv).

    Carries everything but the rank order, which the reader re-derives (canonical
    order for Linnaean ranks, else mean depth).
    """
    sep = sep or ("," if suffix(path) == ".csv" else "\t")
    keys = tax.keys.astype(object)
    parent_keys = np.where(tax.parent >= 0, keys[np.maximum(tax.parent, 0)], "")
    df = pd.DataFrame({"id": keys, "parent_id": parent_keys, "rank": tax.ranks, "name": tax.names,
                       "is_label": tax.is_label.astype(np.int8)})
    return write_text(path, df.to_csv(sep=sep, index=False, lineterminator="\n"))
