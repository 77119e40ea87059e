"""Lineage tables: one row per label, one column per rank (CSV/TSV).

Rules (see docs/taxonomy.md for examples):

* Columns are ranks. Known Linnaean rank names are put in canonical order
  whatever the file order. A table with no known rank name (CIFAR's levels)
  is ordered root-first by the number of distinct values (fewest first; a
  higher level has fewer taxa), ties in file order (reversed for leaf-first
  files). A table with known rank names *and* other columns is an error
  naming the other columns: pass ``ignore_columns=`` (not ranks) or
  ``rank_columns=`` (every rank, root first; known ranks keep their order).
* ``X_id`` + ``X_name`` columns form one rank ``X`` (identity by id, display by
  name); an ``X_id`` column alone gives nodes named ``X_<id>``.
* An optional label column (``name``, ``label``, ``taxon``, ``scientificName``,
  ``category``; ``class`` when the other columns are not Linnaean ranks) names
  the row's label. A label equal to the row's deepest entry is that node; a
  different label becomes an *unranked* child of the deepest entry (FathomNet's
  Tunicata under phylum Chordata), so rank-step distances treat it as sitting
  at that rank. Without a label column the deepest entry is the label.
* Blank cells: trailing = the row stops above that rank; in the middle = the
  lineage skips that rank (the next entry hangs from the last filled one).
* A node is identified by (rank, name). A row giving a node another parent
  than an earlier row is an error naming both lines, unless
  ``on_conflict="split"``: then nodes are identified by their full lineage and
  the homonyms are kept apart (and counted).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import (PathLike, as_names, build_taxonomy, finish, head_lines, names_to_mask, read_table,
                      sniff_delimiter, suffix, write_text)
from .ranks import _CANONICAL_INDEX, normalize_rank
from .report import LoadReport

LABEL_COLUMNS = ("name", "label", "labelname", "taxon", "taxonname", "scientificname", "category",
                 "categoryname", "classname")
_PAIR = re.compile(r"^(?P<rank>.+?)(?:[_ \-](?P<kind>(?i:id|name))|(?P<camel>Id|ID|Name))$")


def _pair_parts(col: str) -> tuple[str, str] | None:
    """``fine_id`` -> ("fine", "id"); ``coarseName`` -> ("coarse", "name"); else None."""
    m = _PAIR.match(col)
    if not m:
        return None
    return m.group("rank"), (m.group("kind") or m.group("camel")).lower()


def _norm(col: str) -> str:
    return "".join(ch for ch in col.lower() if ch.isalnum())


class _RankColumn:
    """One rank of the table: its name, the column giving display names and the one giving identity."""

    def __init__(self, rank: str, name_col: str | None, id_col: str | None) -> None:
        self.rank, self.name_col, self.id_col = rank, name_col, id_col

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.id_col, self.name_col) if c]


def _plan_columns(header: list[str], label_column: str | None, ignore: set[str]
                  ) -> tuple[str | None, list[_RankColumn]]:
    cols = [c for c in header if c not in ignore]
    canonical = [c for c in cols if normalize_rank(c) in _CANONICAL_INDEX]
    if label_column is None:
        normed = {_norm(c): c for c in cols}
        for cand in LABEL_COLUMNS:
            if cand in normed:
                label_column = normed[cand]
                break
        else:
            if "class" in normed and len([c for c in canonical if _norm(c) != "class"]) < 2:
                label_column = normed["class"]
    elif label_column not in header:
        raise TaxonomyError(f"label_column {label_column!r} is not a column (columns: {header})")
    rest = [c for c in cols if c != label_column]
    bad = [c for c in rest if _norm(c) == "id"]
    if bad:
        raise TaxonomyError(f"column {bad[0]!r}: every column of a lineage table other than the label is a rank; "
                            f"an id column has no rank. Pass ignore_columns=[{bad[0]!r}] to skip it.")
    ranks: list[_RankColumn] = []
    used: set[str] = set()
    for c in rest:
        if c in used:
            continue
        m = _pair_parts(c)
        if m and normalize_rank(c) not in _CANONICAL_INDEX:
            stem, kind = m
            partner = next((o for o in rest if o != c and o not in used and (pm := _pair_parts(o))
                            and pm[0] == stem and pm[1] != kind), None)
            if partner is not None:
                id_col, name_col = (c, partner) if kind == "id" else (partner, c)
                ranks.append(_RankColumn(stem, name_col, id_col))
                used.update((c, partner))
                continue
            if kind == "id":
                ranks.append(_RankColumn(stem, None, c))
                used.add(c)
                continue
            ranks.append(_RankColumn(stem, c, None))
            used.add(c)
            continue
        ranks.append(_RankColumn(normalize_rank(c) or c, c, None))
        used.add(c)
    if not ranks:
        raise TaxonomyError(f"no rank columns found in the header {header}; a lineage table needs one column per "
                            "rank (and optionally a label column)")
    return label_column, ranks


def _resolve_rank_columns(ranks: list[_RankColumn], rank_columns: Sequence[str] | str) -> list[str]:
    """``rank_columns`` entries as rank names: a rank name (``kingdom``, ``fine`` for ``fine_id``/``fine_name``)
    or a column name (``Kingdom``, ``fine_name``) of that rank."""
    of_column = {c: r.rank for r in ranks for c in r.columns}
    names = {r.rank for r in ranks}
    return [e if e in names else of_column.get(e, e) for e in as_names(rank_columns)]


def _check_rank_columns(ranks: list[_RankColumn], rank_columns: Sequence[str] | None, file: str) -> None:
    """Refuse column sets whose rank order would be guesswork (before the table is read).

    * Without ``rank_columns``: a table whose columns include known rank names *and* other
      columns (``name,kingdom,genus,family,notes``) is an error naming the other columns, since
      they would become ranks ordered by value counts. Tables with no known rank name at all
      (CIFAR's ``level1..3``) are ordered by value counts as before.
    * With ``rank_columns``: it must list every rank column once, and known ranks in it must
      keep the canonical order (``genus`` never above ``family``).
    """
    by_name = {r.rank: r for r in ranks}
    known = [r for r in ranks if r.rank in _CANONICAL_INDEX]
    other = [r for r in ranks if r.rank not in _CANONICAL_INDEX]
    if rank_columns is None:
        if known and other:
            cols = [c for r in other for c in r.columns]
            ranks_shown = ", ".join(r.rank for r in sorted(known, key=lambda r: _CANONICAL_INDEX[r.rank]))
            raise TaxonomyError(
                f"{file} line 1: the column(s) {cols} are not rank names, but the table also has rank columns "
                f"({ranks_shown}). Every column of a lineage table other than the label is a rank, and an unknown "
                "rank could only be placed by guesswork. If they are not ranks, pass ignore_columns="
                f"{cols!r} (CLI: -O ignore_columns={','.join(cols)}); if they are, pass rank_columns=[...] listing "
                "every rank root first (CLI: -O rank_columns=a,b,c).")
        return
    rank_columns = _resolve_rank_columns(ranks, rank_columns)
    missing = [r for r in rank_columns if r not in by_name]
    extra = [r.rank for r in ranks if r.rank not in rank_columns]
    extra_cols = [c for r in ranks if r.rank not in rank_columns for c in r.columns]
    dup = sorted({r for r in rank_columns if rank_columns.count(r) > 1})
    if missing or extra or dup:
        parts = ([f"{missing} are not rank columns of the file"] if missing else []) + \
            ([f"it leaves out {extra} (pass ignore_columns={extra_cols!r} if they are not ranks)"] if extra else []) + \
            ([f"it repeats {dup}"] if dup else [])
        raise TaxonomyError(f"{file}: rank_columns {rank_columns} must list every rank column exactly once, root "
                            f"first: " + "; ".join(parts) + f" (rank columns in the file: {list(by_name)})")
    listed = [r for r in rank_columns if r in _CANONICAL_INDEX]
    canon = sorted(listed, key=_CANONICAL_INDEX.__getitem__)
    if listed != canon:
        i = next(k for k in range(len(listed)) if listed[k] != canon[k])
        raise TaxonomyError(f"{file}: rank_columns {rank_columns} puts {listed[i]!r} above {canon[i]!r}; known ranks "
                            f"keep the standard order (here: {', '.join(canon)}). Reorder rank_columns.")


def _order_ranks(ranks: list[_RankColumn], idents: dict[str, pd.Series], rank_columns: Sequence[str] | None
                 ) -> list[_RankColumn]:
    """Root-first rank columns (after :func:`_check_rank_columns`): as given, canonical, or by value counts."""
    by_name = {r.rank: r for r in ranks}
    if rank_columns is not None:
        return [by_name[r] for r in _resolve_rank_columns(ranks, rank_columns)]
    if all(r.rank in _CANONICAL_INDEX for r in ranks):
        return sorted(ranks, key=lambda r: _CANONICAL_INDEX[r.rank])
    card = [int(idents[r.rank].replace("", np.nan).nunique()) for r in ranks]
    leaf_first = card[0] > card[-1]
    pos = list(range(len(ranks)))
    if leaf_first:
        pos = pos[::-1]
    order = sorted(range(len(ranks)), key=lambda i: (card[i], pos[i]))
    return [ranks[i] for i in order]


def read_lineage_table(path: PathLike, *, label_column: str | None = None,
                       rank_columns: Sequence[str] | None = None, ignore_columns: Iterable[str] = (),
                       on_conflict: str = "error", labels: Iterable[str] | None = None,
                       return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a lineage table (see the module docstring for the rules).

    label_column: force the label column (default: detected by name).
    rank_columns: every rank, root first (rank names such as ``kingdom`` or ``fine`` for a
        ``fine_id``/``fine_name`` pair, or column names), to declare columns with unknown rank
        names as ranks and force their order. Known ranks must keep the canonical order.
    ignore_columns: columns to leave out (a table with known rank columns and other columns is
        an error until they are ignored or declared in ``rank_columns``).
    on_conflict: ``"error"`` or ``"split"`` (homonyms with different lineages become separate nodes).
    labels: names of label nodes to use instead of the rows' labels.
    """
    if on_conflict not in ("error", "split"):
        raise TaxonomyError(f"on_conflict must be 'error' or 'split', got {on_conflict!r}")
    report = LoadReport(path=str(path), format="lineage")
    head = head_lines(path, 1)
    if not head:
        raise TaxonomyError(f"{path}: the file is empty")
    sep = sniff_delimiter(path, head[0])
    header = next(csv.reader([head[0]], delimiter=sep))
    file = Path(path).name
    ignore = as_names(ignore_columns)
    not_there = [c for c in ignore if c not in header]
    if not_there:
        raise TaxonomyError(f"{file} line 1: ignore_columns {not_there} are not columns of the file (columns: "
                            f"{header})")
    label_col, rank_cols = _plan_columns(header, label_column, set(ignore))
    _check_rank_columns(rank_cols, rank_columns, file)
    df = read_table(path, sep).apply(lambda c: c.str.strip())
    report.rows_read = len(df)
    if ignore:
        report.note(f"columns ignored (ignore_columns): {', '.join(ignore)}")
    rank_cols = _order_ranks(rank_cols, {r.rank: df[r.id_col or r.name_col] for r in rank_cols}, rank_columns)
    ranks = [r.rank for r in rank_cols]
    used_cols = [c for r in rank_cols for c in r.columns] + ([label_col] if label_col else [])
    blank = (df[used_cols] == "").all(axis=1).to_numpy()
    report.skip("blank rows", int(blank.sum()))
    ident, display = _cells(df, rank_cols, file)
    cell_key, left = _cell_keys(ident, ranks, on_conflict)
    entries, label_key = _entries(df, label_col, ident, display, cell_key, left, ranks, blank, on_conflict, file,
                                  report)
    col_name = [r.name_col or r.id_col for r in rank_cols]

    def cell_where(row: int, col: int) -> str:
        return f"{file} line {row + 2} (column {(col_name[col] if col >= 0 else label_col)!r})"

    _check_conflicts(entries, ranks, cell_where, on_conflict, report)
    nodes = entries.drop_duplicates("key", keep="first").reset_index(drop=True)
    index = pd.Index(nodes["key"])
    parent = index.get_indexer(nodes["parent"].replace("", None))
    keys = _short_keys(nodes) if on_conflict == "split" else nodes["key"].to_numpy(dtype=object)
    label_rows = np.flatnonzero(label_key != "")
    label_nodes = index.get_indexer(label_key[label_rows])
    report.skip("rows repeating an earlier row's label (merged)", len(label_rows) - len(np.unique(label_nodes)))
    node_rows, node_cols = nodes["row"].to_numpy(), nodes["col"].to_numpy()

    def where(i: int) -> str:
        return cell_where(int(node_rows[i]), int(node_cols[i]))

    names = nodes["name"].to_numpy(dtype=object)
    if labels is not None:
        mask = names_to_mask(names, labels, str(path), where)
    else:
        mask = np.zeros(len(nodes), dtype=bool)
        mask[label_nodes] = True
    tax = build_taxonomy(parent, names, report=report, where=where, ranks=nodes["rank"].to_numpy(dtype=object),
                         keys=keys, labels=mask, rank_order=ranks)
    report.note("ranks root first: " + ", ".join(ranks))
    return finish(tax, report, return_report)


def _cells(df: pd.DataFrame, rank_cols: list[_RankColumn], file: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ident, display)`` matrices [rows x ranks]: the identity (id or name) and display name of each cell."""
    n_rows, n_ranks = len(df), len(rank_cols)
    ident = np.empty((n_rows, n_ranks), dtype=object)
    display = np.empty((n_rows, n_ranks), dtype=object)
    for j, r in enumerate(rank_cols):
        ident[:, j] = df[r.id_col or r.name_col].to_numpy(dtype=object)
        if r.name_col is not None:
            display[:, j] = df[r.name_col].to_numpy(dtype=object)
        else:
            display[:, j] = np.where(ident[:, j] != "", r.rank + "_" + ident[:, j].astype(str), "")
        if r.id_col and r.name_col:
            half = np.flatnonzero((ident[:, j] == "") != (display[:, j] == ""))
            if len(half):
                raise TaxonomyError(f"{file} line {half[0] + 2}: rank {r.rank!r} has an id but no name (or a name "
                                    f"but no id) in columns {r.id_col!r}/{r.name_col!r}; fill both or neither")
    return ident, display


def _cell_keys(ident: np.ndarray, ranks: list[str], on_conflict: str) -> tuple[np.ndarray, np.ndarray]:
    """Node key of every filled cell (``rank:name``, or ``rank:lineage`` when splitting) and the key of the
    nearest filled cell to its left (its parent; ``""`` at the top)."""
    n_rows = len(ident)
    filled = ident != ""
    prefix = np.full(n_rows, "", dtype=object)
    cell_key = np.full(ident.shape, "", dtype=object)
    for j, r in enumerate(ranks):  # one vectorised step per rank column
        prefix = np.where(filled[:, j], np.where(prefix == "", ident[:, j], prefix + " > " + ident[:, j]), prefix)
        own = r + ":" + (ident[:, j] if on_conflict == "error" else prefix).astype(str)
        cell_key[:, j] = np.where(filled[:, j], own, "")
    left = pd.DataFrame(cell_key).replace("", np.nan).ffill(axis=1).shift(1, axis=1).fillna("")
    return cell_key, left.to_numpy(dtype=object)


def _entries(df: pd.DataFrame, label_col: str | None, ident: np.ndarray, display: np.ndarray,
             cell_key: np.ndarray, left: np.ndarray, ranks: list[str], blank: np.ndarray, on_conflict: str,
             file: str, report: LoadReport) -> tuple[pd.DataFrame, np.ndarray]:
    """Long table of (key, parent, name, rank, row, col, ident), one entry per filled cell plus one per label
    that is not its row's deepest entry; and the label node key of every row."""
    n_rows, n_ranks = ident.shape
    filled = ident != ""
    deepest_j = np.where(filled.any(axis=1), n_ranks - 1 - np.argmax(filled[:, ::-1], axis=1), -1)
    rows = np.arange(n_rows)
    deepest_key = np.where(deepest_j >= 0, cell_key[rows, np.maximum(deepest_j, 0)], "")
    deepest_name = np.where(deepest_j >= 0, display[rows, np.maximum(deepest_j, 0)], "")
    r_idx, c_idx = np.nonzero(filled & ~blank[:, None])
    entries = pd.DataFrame({
        "key": cell_key[r_idx, c_idx], "parent": left[r_idx, c_idx], "name": display[r_idx, c_idx],
        "rank": np.asarray(ranks, dtype=object)[c_idx], "row": r_idx, "col": c_idx, "ident": ident[r_idx, c_idx]})
    label_key = deepest_key.copy()
    if label_col is None:
        return entries, label_key
    lab = df[label_col].to_numpy(dtype=object)
    extra = (lab != "") & (lab != deepest_name) & ~blank
    on_path = (extra[:, None] & (display == lab[:, None])).any(axis=1)
    if on_path.any():
        i = int(np.flatnonzero(on_path)[0])
        raise TaxonomyError(f"{file} line {i + 2}: the label {lab[i]!r} names a higher entry of its own lineage, not "
                            f"the deepest one ({deepest_name[i]!r}); remove the deeper entries or fix the label")
    own = "label:" + lab.astype(str)
    if on_conflict == "split":
        own = np.where(deepest_key == "", own, deepest_key + " > " + own)
    label_key = np.where(extra, own, label_key)
    er = np.flatnonzero(extra)
    entries = pd.concat([entries, pd.DataFrame({
        "key": label_key[er], "parent": deepest_key[er], "name": lab[er], "rank": "", "row": er, "col": -1,
        "ident": lab[er]})], ignore_index=True)
    entries = entries.sort_values(["row", "col"], kind="stable").reset_index(drop=True)
    report.note(f"label column {label_col!r}" + (f"; {len(er)} label(s) below the deepest filled rank became "
                                                 "unranked nodes under it" if len(er) else ""))
    return entries, label_key


def _check_conflicts(entries: pd.DataFrame, ranks: list[str], cell_where, on_conflict: str,
                     report: LoadReport) -> None:
    """Error on a node given two parents (or an id given two names); count splits."""
    names_per = entries.groupby("key")["name"].nunique()
    if (names_per > 1).any():
        key = names_per.index[names_per > 1][0]
        rows = entries[entries["key"] == key].drop_duplicates("name")
        shown = "; ".join(f"{cell_where(r, c)}: {n!r}" for r, c, n in zip(rows["row"], rows["col"], rows["name"]))
        raise TaxonomyError(f"the id {key!r} has several names: {shown}. Give each id one name.")
    pairs = entries.drop_duplicates(["key", "parent"])
    multi = pairs["key"].duplicated(keep=False)
    if multi.any():
        bad = pairs[multi]
        first_key = bad["key"].iloc[0]
        two = bad[bad["key"] == first_key].head(2)
        lines = [f"{cell_where(r, c)} puts it under {p.split(':', 1)[-1] if p else 'the root'!r}"
                 for r, c, p in zip(two["row"], two["col"], two["parent"])]
        n_bad = bad["key"].nunique()
        raise TaxonomyError(
            f"lineage contradiction for {first_key.split(':', 1)[-1]!r} "
            f"({first_key.split(':', 1)[0] or 'label'}): " + "; ".join(lines)
            + f" ({n_bad} node(s) with contradicting parents). Fix the rows, or pass on_conflict='split' to keep "
            "homonyms with different lineages apart.")
    if on_conflict == "split":
        nodes = entries.drop_duplicates("key")
        per_name = nodes.groupby(["rank", "ident"])["key"].nunique()
        split = per_name[per_name > 1]
        if len(split):
            report.repair("homonyms kept apart as separate nodes (on_conflict='split')", int(split.sum()))


def _short_keys(nodes: pd.DataFrame) -> np.ndarray:
    """Split mode: keep ``rank:name`` keys where the name is unique at its rank, lineage keys otherwise."""
    short = (nodes["rank"].where(nodes["rank"] != "", "label") + ":" + nodes["ident"]).to_numpy(dtype=object)
    dup = pd.Series(short).duplicated(keep=False).to_numpy()
    return np.where(dup, nodes["key"].to_numpy(dtype=object), short)


def write_lineage_table(tax: Taxonomy, path: PathLike, label_column: str = "name") -> Path:
    """Write one row per label: the label name, then its ancestors' names per rank (root first).

    Needs a ranked tree in which every unranked node (other than a synthetic
    root) is a label leaf, and every leaf is a label: anything else cannot be
    written as a lineage table (use the edge table or JSON instead).
    """
    if not tax.has_ranks:
        raise TaxonomyError("this taxonomy has no ranks: a lineage table needs ranks (use the path-string, outline, "
                            "edge-table or JSON format)")
    if label_column in tax.rank_order:
        raise TaxonomyError(f"a rank is called {label_column!r}; pick another label_column")
    unranked = tax.ranks == ""
    synthetic_root = bool(unranked[0]) and tax.names[0] == "root" and tax.n_children[0] >= 2
    problems = []
    bad = np.flatnonzero(unranked & ~(tax.is_label & tax.is_leaf))
    bad = bad[bad != 0] if synthetic_root else bad
    if len(bad):
        problems.append(f"{len(bad)} unranked node(s) that are not label leaves (e.g. {tax.lineage(int(bad[0]))!r})")
    if unranked[0] and not synthetic_root:
        problems.append(f"an unranked root {tax.names[0]!r}")
    nl = np.flatnonzero(tax.is_leaf & ~tax.is_label)
    if len(nl):
        problems.append(f"{len(nl)} leaf node(s) that are not labels (e.g. {tax.lineage(int(nl[0]))!r})")
    labels = tax.label_ids
    par = tax.parent[labels]
    same = (tax.ranks[labels] == "") & (par >= 0) & (tax.names[np.maximum(par, 0)] == tax.names[labels])
    if same.any():
        problems.append(f"unranked label {tax.names[labels[same][0]]!r} has the same name as its parent")
    if problems:
        raise TaxonomyError("cannot write a lineage table without losing nodes: " + "; ".join(problems)
                            + ". Use the edge-table or JSON format instead.")
    view = tax.rank_view(tax.rank_order)[labels]
    cells = np.where(view >= 0, tax.names[np.maximum(view, 0)], "").astype(object)
    df = pd.DataFrame(cells, columns=list(tax.rank_order))
    df.insert(0, label_column, tax.names[labels])
    df = df.sort_values(list(tax.rank_order) + [label_column], kind="stable")
    sep = "\t" if suffix(path) in (".tsv", ".tab", ".txt") else ","
    return write_text(path, df.to_csv(sep=sep, index=False, lineterminator="\n"))
