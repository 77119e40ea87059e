"""Shared plumbing for the importers: reading text (gzip aware), locating rows
for error messages, and building the Taxonomy (synthetic root, rank order)."""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import Taxonomy, _pointer_jump_depth
from ..errors import TaxonomyError
from .ranks import infer_rank_order, rank_violations
from .report import LoadReport

SYNTHETIC_ROOT = "root"
PathLike = str | os.PathLike


class MissingDependencyError(ImportError):
    """An optional package is missing; the message gives the pip command.

    Lives inside ``taxonomy/`` (which imports nothing else from taxonomist);
    it mirrors :class:`taxonomist.errors.MissingExtraError`.
    """

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the optional package {package!r}: "
                         f"pip install 'taxonomist[{extra}]'  (or: pip install {package})")


def base_name(path: PathLike) -> str:
    """File name without a trailing ``.gz``."""
    name = Path(path).name
    return name[:-3] if name.lower().endswith(".gz") else name


def suffix(path: PathLike) -> str:
    """Lower-case extension, ignoring ``.gz`` (``tree.nwk.gz`` -> ``.nwk``)."""
    return Path(base_name(path)).suffix.lower()


def read_text(path: PathLike) -> str:
    """Whole file as text (UTF-8, BOM stripped, ``.gz`` decompressed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"taxonomy file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise TaxonomyError(f"{path} line {line}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None


def head_lines(path: PathLike, n: int = 20, max_bytes: int = 1 << 16) -> list[str]:
    """First ``n`` lines (for sniffing) without reading a big file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"taxonomy file not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        raw = fh.read(max_bytes)
    text = raw.decode("utf-8-sig", errors="replace")
    return text.splitlines()[:n]


def write_text(path: PathLike, text: str) -> Path:
    """Write atomically (temp file + rename); gzip when the name ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sniff_delimiter(path: PathLike, header: str) -> str:
    """Tab for .tsv, comma for .csv, else whichever of tab/comma/semicolon the header uses."""
    ext = suffix(path)
    if ext in (".tsv", ".tab"):
        return "\t"
    if ext == ".csv":
        return ","
    for sep in ("\t", ",", ";"):
        if sep in header:
            return sep
    return "\t"


def read_table(path: PathLike, sep: str, dtype: Any = object, usecols: Sequence[str] | None = None,
               nrows: int | None = None) -> pd.DataFrame:
    """A delimited file as Python strings in object columns (no NA conversion: ``""`` stays ``""``;
    object columns avoid pandas' slower string-array conversion). Blank lines are kept as empty rows
    so that row ``i`` is always line ``i + 2``."""
    try:
        return pd.read_csv(path, sep=sep, dtype=dtype, usecols=usecols, keep_default_na=False, na_filter=False,
                           skip_blank_lines=False, engine="c", compression="infer", nrows=nrows)
    except pd.errors.ParserError as exc:
        raise TaxonomyError(f"{path}: cannot parse as a {'tab' if sep == chr(9) else repr(sep)}-separated table: "
                            f"{exc}") from None
    except pd.errors.EmptyDataError:
        raise TaxonomyError(f"{path}: the file is empty") from None


def line_where(path: PathLike, lines: np.ndarray, detail: Callable[[int], str] | None = None
               ) -> Callable[[int], str]:
    """``where(i)`` -> ``"file.csv line 7"`` from a per-input-node line-number array."""
    name = Path(path).name

    def where(i: int) -> str:
        text = f"{name} line {int(lines[i])}"
        return f"{text} ({detail(i)})" if detail else text

    return where


def as_names(value: Iterable[str] | str | None) -> list[str]:
    """A column or name list given as one string (``-O ignore_columns=notes`` on the CLI) or a sequence."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def path_keys(parent: np.ndarray, names: np.ndarray, given: np.ndarray | None = None, sep: str = " > "
              ) -> np.ndarray:
    """Key of every input node: its root-first path of names (``"R > X > A"``), or its entry of ``given``
    where that is not None (children of such a node build on the given key).

    ``parent`` holds input indices (-1 = top-level; several tops allowed). One vectorised string
    concatenation per depth level, so homonyms under different parents get different keys.
    """
    parent = np.asarray(parent, dtype=np.int64)
    names = np.array([str(x) for x in names], dtype=object)
    n = len(parent)
    keys = np.empty(n, dtype=object)
    if n == 0:
        return keys
    has = None if given is None else np.array([g is not None for g in given], dtype=bool)
    depth = _pointer_jump_depth(parent, lambda i: f"node #{i} {names[i]!r}")
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(int(depth.max()) + 2))
    for d in range(len(bounds) - 1):
        ids = order[bounds[d]:bounds[d + 1]]
        own = names[ids] if d == 0 else keys[parent[ids]] + sep + names[ids]   # object arrays of str
        if has is not None:
            own = np.where(has[ids], np.asarray(given, dtype=object)[ids], own)
        keys[ids] = own
    return keys


def finish(tax: Taxonomy, report: LoadReport, return_report: bool) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    report.n_nodes = tax.n_nodes
    report.n_labels = tax.n_labels
    return (tax, report) if return_report else tax


def _find_cycle_rows(parent: np.ndarray, where: Callable[[int], str]) -> str:
    """Error path only: walk parent links from node 0 until a node repeats."""
    seen: dict[int, int] = {}
    v = 0
    while v not in seen and len(seen) <= len(parent):
        seen[v] = len(seen)
        v = int(parent[v])
    cycle = [u for u, k in sorted(seen.items(), key=lambda x: x[1]) if k >= seen.get(v, 0)]
    return " -> ".join(where(u) for u in cycle[:8]) + (" -> ..." if len(cycle) > 8 else "")


def _with_synthetic_root(where: Callable[[int], str], n: int) -> Callable[[int], str]:
    """``where`` extended to index ``n``: the synthetic root, which no input line describes."""
    return lambda i: "the synthetic root" if i >= n else where(i)


def build_taxonomy(parent: np.ndarray, names: np.ndarray | Sequence[str], *, report: LoadReport,
                   where: Callable[[int], str], ranks: np.ndarray | Sequence[str] | None = None,
                   keys: np.ndarray | Sequence[str] | None = None,
                   labels: np.ndarray | str = "leaves", rank_order: Sequence[str] | None = None,
                   check_rank_order: bool = True, count_violations: bool = True) -> Taxonomy:
    """Build through :meth:`Taxonomy.from_parents`, adding a synthetic root when needed.

    ``parent`` holds input indices (-1 = top-level). Several top-level nodes get a
    synthetic root named ``"root"`` (recorded in the report). ``rank_order=None``
    infers it with :func:`infer_rank_order`. Errors from the core name input
    nodes through ``where``.
    """
    parent = np.asarray(parent, dtype=np.int64)
    n = len(parent)
    if n == 0:
        raise TaxonomyError(f"{report.path}: no taxa found in the file")
    names = np.asarray(names, dtype=object)
    ranks_a = np.full(n, "", dtype=object) if ranks is None else np.asarray(ranks, dtype=object)
    keys_a = names.copy() if keys is None else np.asarray(keys)  # int ids stay int: the core maps str once
    label_mask = labels if isinstance(labels, str) else np.asarray(labels, dtype=bool)
    tops = np.flatnonzero(parent < 0)
    if len(tops) == 0:
        raise TaxonomyError(f"{report.path}: no top-level node (every node has a parent), so the parent links "
                            f"form a cycle: {_find_cycle_rows(parent, where)}. Give the root an empty parent "
                            "(or make it its own parent).")
    if len(tops) > 1:
        keys_a = keys_a.astype(object)
        root_key = SYNTHETIC_ROOT
        if root_key in set(map(str, keys_a.tolist())):
            root_key = "__root__"
        parent = np.append(np.where(parent < 0, n, parent), -1)
        names = np.append(names, SYNTHETIC_ROOT)
        ranks_a = np.append(ranks_a, "")
        keys_a = np.append(keys_a, root_key)
        if not isinstance(label_mask, str):
            label_mask = np.append(label_mask, False)
        report.synthetic_root = True
    inner_where = _with_synthetic_root(where, n)

    infer = rank_order is None
    has_ranks = bool(np.any(ranks_a != "")) if infer else bool(rank_order)
    order_now: Sequence[str] | None = rank_order
    unknown_needed = False
    if infer:
        try:
            order_now = infer_rank_order(ranks_a) if has_ranks else ()
        except ValueError:
            unknown_needed = True
            order_now = None
    tax = Taxonomy.from_parents(parent, names, ranks=ranks_a, keys=keys_a, labels=label_mask,
                                rank_order=order_now, where=inner_where,
                                check_rank_order=check_rank_order and not unknown_needed)
    if unknown_needed:
        # unknown rank names: slot them in by mean depth, which needs the built tree's depths. Rebuild
        # only when that order differs from the core's plain mean-depth default (Taxonomy.replace
        # would enforce the rank order, which edge tables leave to strict_ranks).
        final = infer_rank_order(tax.ranks, tax.depth)
        if tuple(final) != tuple(tax.rank_order) or check_rank_order:
            tax = Taxonomy.from_parents(parent, names, ranks=ranks_a, keys=keys_a, labels=label_mask,
                                        rank_order=final, where=inner_where, check_rank_order=check_rank_order)
    if count_violations and tax.rank_order:
        report.rank_violations = int(len(rank_violations(tax)))
    return tax


def names_to_mask(names: np.ndarray, wanted: Iterable[object], source: str,
                  where: Callable[[int], str]) -> np.ndarray:
    """Boolean mask of the nodes named in ``wanted`` (each must name exactly one node); vectorised."""
    want = pd.unique(pd.Series(as_names(wanted), dtype=object))  # one string is one name, not its letters
    names_s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    counts = names_s.value_counts().reindex(want).fillna(0).astype(int).to_numpy()
    missing = want[counts == 0]
    if len(missing):
        shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise TaxonomyError(f"{source}: {len(missing)} label name(s) are not in the tree: {shown}. "
                            "Fix the label list or the tree.")
    ambiguous = want[counts > 1]
    if len(ambiguous):
        shown = "; ".join(f"{w!r} at " + ", ".join(where(int(h)) for h in np.flatnonzero(names_s == w)[:3])
                          for w in ambiguous[:5])
        raise TaxonomyError(f"{source}: {len(ambiguous)} label name(s) match several nodes: {shown}. "
                            "Rename the homonyms or give labels by path.")
    return names_s.isin(want).to_numpy()
