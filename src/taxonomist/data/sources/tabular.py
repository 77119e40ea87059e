"""CSV/TSV sample tables: one row per image (or per crop box).

Columns (header names are matched exactly, surrounding blanks ignored):

* image path: ``path`` (or ``file``, ``filename``, ``file_name``, ``image``,
  ``image_path``; or ``path_column=``). Relative paths start at ``image_root``
  if given, else at the table file's folder.
* the label, either one column ``label`` (or ``class`` unless the taxonomy
  has a rank called class, ``taxon``, ``category``; or ``label_column=``) holding a node name at any depth or a node
  key, or per-rank columns root first (``rank_columns=``, or by default every
  column named like a rank of the taxonomy, e.g. kingdom..species): the deepest
  non-empty one is the label and the ones above must agree with its lineage.
  Without any label column the rows are unlabelled (node -1).
* optional ``box_x, box_y, box_w, box_h`` (all four; empty = whole image),
  ``split`` (train/val/test, also validation/valid/dev; empty = unassigned),
  numeric ``metadata_columns=[...]`` (stored as ``meta_<name>``) and categorical
  ``attribute_columns=[...]`` (``attr_<name>``); columns already named
  ``meta_*``/``attr_*`` are taken as such. Other columns are not used and the
  report says so.

Line numbers in messages count the header as line 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import DataError
from ...taxonomy import Taxonomy
from ..labels import resolve_labels, resolve_lineages
from ..report import LoadReport, check_on_error
from ..table import ATTR_PREFIX, BOX_COLUMNS, META_PREFIX, SampleTable
from ._assemble import assemble, report_rows

PATH_ALIASES: tuple[str, ...] = ("path", "file", "filename", "file_name", "image", "image_path")
LABEL_ALIASES: tuple[str, ...] = ("label", "class", "taxon", "category")
SPLIT_ALIASES: dict[str, str] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                                 "validation": "val", "dev": "val", "test": "test", "testing": "test", "": ""}
TAB_SUFFIXES: frozenset[str] = frozenset({".tsv", ".tab", ".txt"})


def read_text_table(path: Path, sep: str | None = None) -> pd.DataFrame:
    """Every cell as a string ("" for empty; "NA" stays "NA"). Raises DataError naming the file."""
    if sep is None:
        sep = "\t" if path.suffix.lower() in TAB_SUFFIXES else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False,
                         skipinitialspace=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (expected a header line and one row per image)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot parse as a {'TSV' if sep == chr(9) else 'CSV'} table: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    dup = df.columns[df.columns.duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: duplicate column name(s) {dup} in the header")
    return df


def _pick(columns: Sequence[str], explicit: str | None, aliases: Sequence[str], what: str, path: Path,
          option: str, required: bool) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{path}: {option}={explicit!r} but the columns are {list(columns)}")
        return explicit
    for a in aliases:
        if a in columns:
            return a
    if required:
        raise DataError(f"{path}: no {what} column; name it {aliases[0]!r} (or one of {list(aliases[1:])}) "
                        f"or pass {option}=...; columns are {list(columns)}")
    return None


def _numeric(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float values, mask of non-empty cells that are not numbers)."""
    text = values.astype(str).str.strip()
    num = pd.to_numeric(text.where(text != "", None), errors="coerce").to_numpy(dtype=np.float64)
    return num, np.isnan(num) & (text != "").to_numpy()


def load_table_file(path: str | Path, taxonomy: Taxonomy | None, *, image_root: str | Path | None = None,
                    on_error: str = "raise", verify_images: str = "header", path_column: str | None = None,
                    label_column: str | None = None, rank_columns: Sequence[str] | None = None,
                    metadata_columns: Sequence[str] = (), attribute_columns: Sequence[str] = (),
                    split_column: str = "split", sep: str | None = None,
                    lenient_labels: bool = False) -> tuple[SampleTable, LoadReport]:
    """Read a CSV/TSV sample table (see the module docstring for the columns)."""
    check_on_error(on_error)
    path = Path(os.path.abspath(os.fspath(path)))
    df = read_text_table(path, sep)
    cols = list(df.columns)
    report = LoadReport(source=str(path), kind="sample table")
    locate = _line_locator(path.name)
    used: set[str] = set()

    pcol = _pick(cols, path_column, PATH_ALIASES, "image path", path, "path_column", required=True)
    used.add(pcol)
    base = os.path.abspath(os.fspath(image_root)) if image_root is not None else str(path.parent)
    raw_paths = df[pcol].astype(str).str.strip().to_numpy(dtype=object)
    paths = np.array([os.path.normpath(os.path.join(base, p)) if p else "" for p in raw_paths], dtype=object)
    bad = paths == ""
    report_rows(report, "missing_file", np.flatnonzero(bad), locate, f"empty {pcol!r} cell")

    # ---- labels
    n = len(df)
    labels = np.full(n, "", dtype=object)
    nodes = np.full(n, -1, dtype=np.int64)
    if rank_columns is not None and label_column is not None:
        raise DataError(f"{path}: give label_column or rank_columns, not both")
    rank_names = {r.lower() for r in taxonomy.rank_order} if taxonomy is not None else set()
    aliases = [a for a in LABEL_ALIASES if a not in rank_names]  # "class" is a rank in Linnaean trees
    lcol = None if rank_columns is not None else _pick(cols, label_column, aliases, "label", path,
                                                         "label_column", required=False)
    rcols: list[str] = []
    if rank_columns is not None:
        missing = [c for c in rank_columns if c not in cols]
        if missing:
            raise DataError(f"{path}: rank_columns {missing} are not columns of the file; columns are {cols}")
        rcols = list(rank_columns)
    elif lcol is None and taxonomy is not None and taxonomy.rank_order:
        by_lower = {c.lower(): c for c in cols}
        rcols = [by_lower[r.lower()] for r in taxonomy.rank_order if r.lower() in by_lower]
    if (lcol or rcols) and taxonomy is None:
        raise DataError(f"{path}: the table has labels, so loading it needs a taxonomy")
    if lcol is not None:
        used.add(lcol)
        labels = df[lcol].astype(str).str.strip().to_numpy(dtype=object)
        nodes, bad_label = resolve_labels(taxonomy, labels, locate, report, lenient=lenient_labels)
        bad |= bad_label
    elif rcols:
        used.update(rcols)
        values = df[rcols].astype(str).to_numpy(dtype=object)
        nodes, bad_label = resolve_lineages(taxonomy, rcols, values, locate, report, lenient=lenient_labels)
        labels = np.array([next((v.strip() for v in reversed(r) if v.strip()), "") for r in values], dtype=object)
        bad |= bad_label
    else:
        report.note(f"no label column ({'/'.join(LABEL_ALIASES)} or rank columns): the samples are unlabelled")

    # ---- boxes
    present = [c for c in BOX_COLUMNS if c in cols]
    boxes = None
    if present:
        if len(present) != 4:
            raise DataError(f"{path}: crop boxes need all four columns {list(BOX_COLUMNS)}; found only {present}")
        used.update(BOX_COLUMNS)
        parts = [_numeric(df[c]) for c in BOX_COLUMNS]
        boxes = np.stack([p[0] for p in parts], axis=1)
        not_num = np.any(np.stack([p[1] for p in parts], axis=1), axis=1)
        report_rows(report, "bad_box", np.flatnonzero(not_num), locate,
                    lambda i: "not a number: " + ", ".join(f"{c}={df[c].iloc[i]!r}" for c in BOX_COLUMNS))
        bad |= not_num

    # ---- split
    split = None
    if split_column in cols:
        used.add(split_column)
        raw = df[split_column].astype(str).str.strip().str.lower()
        split = raw.map(SPLIT_ALIASES).fillna("!").to_numpy(dtype=object)
        wrong = np.flatnonzero(split == "!")
        report_rows(report, "bad_value", wrong, locate,
                    lambda i: f"{split_column}={df[split_column].iloc[i]!r} (use train, val, test or leave empty)")
        bad[wrong] = True
        split[wrong] = ""

    # ---- metadata and attributes
    meta: dict[str, np.ndarray] = {}
    attrs: dict[str, np.ndarray] = {}
    meta_cols = list(metadata_columns) + [c for c in cols if c.startswith(META_PREFIX) and c not in metadata_columns]
    attr_cols = list(attribute_columns) + [c for c in cols if c.startswith(ATTR_PREFIX) and c not in attribute_columns]
    for c in meta_cols + attr_cols:
        if c not in cols:
            raise DataError(f"{path}: metadata/attribute column {c!r} is not in the file; columns are {cols}")
    for c in meta_cols:
        used.add(c)
        values, not_num = _numeric(df[c])
        report_rows(report, "bad_value", np.flatnonzero(not_num), locate,
                    lambda i, c=c: f"{c}={df[c].iloc[i]!r} is not a number")
        bad |= not_num
        n_empty = int((np.isnan(values) & ~not_num).sum())
        if n_empty:
            report.note(f"metadata column {c!r}: {n_empty} empty cell(s) kept as NaN")
        meta[c[len(META_PREFIX):] if c.startswith(META_PREFIX) else c] = values
    for c in attr_cols:
        used.add(c)
        attrs[c[len(ATTR_PREFIX):] if c.startswith(ATTR_PREFIX) else c] = \
            df[c].astype(str).str.strip().to_numpy(dtype=object)

    unused = [c for c in cols if c not in used]
    if unused:
        report.note(f"column(s) not used: {', '.join(unused)} (pass metadata_columns=[...] for numeric "
                    "metadata or attribute_columns=[...] for categorical attributes)")
    return assemble(report, paths=paths, locate=locate, verify_images=verify_images, on_error=on_error,
                    labels=labels, nodes=nodes, bad=bad, boxes=boxes, split=split, meta=meta, attrs=attrs)


def _line_locator(name: str):
    def locate(rows: np.ndarray) -> str:
        rows = np.asarray(rows)
        shown = ", ".join(str(int(i) + 2) for i in rows[:3])
        more = f" (+{len(rows) - 3} more)" if len(rows) > 3 else ""
        return f"{name} line{'s' if len(rows) > 1 else ''} {shown}{more}"
    return locate
