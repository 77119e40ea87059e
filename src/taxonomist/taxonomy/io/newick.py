"""Newick trees (``((A:1,B:1)C:1)D;``), with quoted names, internal names, branch lengths
and NHX comments.

Reading:

* Names may be quoted (``'Homo sapiens'``, ``''`` escapes a quote) or unquoted;
  unquoted names keep inner spaces (as in FathomNet's file). ``underscores=True``
  turns ``_`` in unquoted names into spaces (the Newick standard's rule).
* Comments ``[...]`` are skipped, except NHX comments ``[&&NHX:rank=genus:label=1]``
  whose ``rank``/``label`` tags give a node's rank and label flag (taxonomist's own
  writer uses them, so a written tree reads back identically) and whose
  ``rank_order`` tag on the root gives the rank order (``|``-separated).
* ``lengths_as_ranks=True``: a node whose branch length is >= 1 gets the rank
  ``"ranked"``, others none. FathomNet's tree marks standard ranks with length 1,
  so ``distance(..., metric="rank_steps", ranks=["ranked"])`` counts rank steps.
* An unnamed root is named ``root``; other unnamed nodes are an error unless
  ``unnamed="auto"`` (named ``node<N>``).
* Label nodes: the leaves, NHX ``label`` tags, or ``labels=`` names.
* Keys are root-first name paths (``"R > X > A"``): a name may repeat under different
  parents (homonyms load as separate nodes; names stay display names), not among siblings.

Errors give the line and column of the offending character.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, build_taxonomy, finish, names_to_mask, path_keys, read_text, write_text
from ._paths_common import preorder
from .report import LoadReport

RANKED = "ranked"
_TOKEN = re.compile(r"""\s*(?:(?P<punct>[(),:;])|(?P<comment>\[[^\]]*\]?)|'(?P<quoted>(?:[^']|'')*)(?P<qend>'?)"""
                    r"""|(?P<bare>[^()\[\]',:;]+))""")
_NEEDS_QUOTES = re.compile(r"[\s()\[\]',:;_]")


class _Locator:
    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def __call__(self, pos: int) -> str:
        line = bisect.bisect_left(self.newlines, pos)
        col = pos - (self.newlines[line - 1] + 1 if line else 0) + 1
        return f"{self.file} line {line + 1}, column {col} (character {pos + 1})"


def _parse_nhx(comment: str) -> dict[str, str]:
    body = comment[len("[&&NHX"):].rstrip("]")
    tags = {}
    for item in body.split(":"):
        if "=" in item:
            k, v = item.split("=", 1)
            tags[k] = v
    return tags


def parse_newick(text: str, file: str = "<newick>", underscores: bool = False) -> dict[str, Any]:
    """Parse one Newick tree into columns: parent (input index), name, length, pos, nhx, plus
    ``locate`` (character position -> "file line L, column C").

    Iterative (no recursion), so deep trees parse. Raises TaxonomyError with the
    line/column for unbalanced parentheses, misplaced tokens and bad lengths.
    """
    loc = _Locator(text, file)
    parent: list[int] = []
    names: list[str | None] = []
    lengths: list[float | None] = []
    pos: list[int] = []
    nhx: list[dict[str, str]] = []
    open_pos: list[int] = []
    stack: list[int] = []
    last: int | None = None
    expect_length = False
    done = False
    i = 0

    def new(at: int) -> int:
        parent.append(stack[-1] if stack else -1)
        names.append(None)
        lengths.append(None)
        pos.append(at)
        nhx.append({})
        return len(names) - 1

    n = len(text)
    while i < n:
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            if text[i:].strip() == "":
                break
            raise TaxonomyError(f"{loc(i)}: unexpected character {text[i]!r}")
        kind = next(g for g in ("punct", "comment", "quoted", "bare") if m.group(g) is not None)
        start = m.start(kind)
        i = m.end()
        if kind == "bare" and not m.group("bare").strip():
            continue
        if done:
            raise TaxonomyError(f"{loc(start)}: text after the closing ';' (one tree per file)")
        if kind == "comment":
            c = m.group("comment")
            if not c.endswith("]"):
                raise TaxonomyError(f"{loc(start)}: unterminated comment '[' (add the closing ']')")
            if c.startswith("[&&NHX") and last is not None:
                nhx[last].update(_parse_nhx(c))
            continue
        if expect_length:
            if kind != "bare":
                raise TaxonomyError(f"{loc(start)}: expected a branch length after ':'")
            value = m.group("bare").strip()
            try:
                lengths[last] = float(value)  # type: ignore[index]
            except ValueError:
                raise TaxonomyError(f"{loc(start)}: malformed branch length {value!r}") from None
            expect_length = False
            continue
        if kind == "punct":
            ch = m.group("punct")
            if ch == "(":
                if last is not None:
                    raise TaxonomyError(f"{loc(start)}: '(' after a node; separate siblings with ','")
                stack.append(new(start))
                open_pos.append(start)
            elif ch == ",":
                if not stack:
                    raise TaxonomyError(f"{loc(start)}: ',' outside any parentheses")
                if last is None:
                    new(start)  # empty sibling, e.g. "(,A)"
                last = None
            elif ch == ")":
                if not stack:
                    raise TaxonomyError(f"{loc(start)}: unbalanced ')': no matching '('")
                if last is None:
                    new(start)
                last = stack.pop()
                open_pos.pop()
            elif ch == ":":
                if last is None:
                    last = new(start)
                if lengths[last] is not None:
                    raise TaxonomyError(f"{loc(start)}: a second branch length for the same node")
                expect_length = True
            else:  # ';'
                if stack:
                    raise TaxonomyError(f"{loc(open_pos[-1])}: unbalanced '(': {len(stack)} parenthesis(es) not "
                                        f"closed before the ';' at {loc(start)}")
                if last is None and not names:
                    raise TaxonomyError(f"{loc(start)}: empty tree")
                done = True
            continue
        # a name (quoted or bare)
        if kind == "quoted":
            if not m.group("qend"):
                raise TaxonomyError(f"{loc(start - 1)}: unterminated quoted name (add the closing ')")
            name = m.group("quoted").replace("''", "'")
        else:
            name = m.group("bare").strip()
            if underscores:
                name = name.replace("_", " ")
        if last is None:
            last = new(start)
        elif names[last] is not None:
            raise TaxonomyError(f"{loc(start)}: unexpected name {name!r} after {names[last]!r}; separate siblings "
                                "with ','")
        names[last] = name
    if expect_length:
        raise TaxonomyError(f"{loc(n)}: the file ends after ':' (missing branch length)")
    if stack:
        raise TaxonomyError(f"{loc(open_pos[-1])}: unbalanced '(': {len(stack)} parenthesis(es) never closed")
    if not names:
        raise TaxonomyError(f"{file}: no tree found")
    if not done:
        raise TaxonomyError(f"{loc(n)}: the tree does not end with ';' (truncated file?)")
    return {"parent": parent, "name": names, "length": lengths, "pos": pos, "nhx": nhx, "locate": loc}


def read_newick(path: PathLike, *, lengths_as_ranks: bool = False, labels: Iterable[str] | None = None,
                unnamed: str = "error", underscores: bool = False,
                return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a Newick file (see the module docstring for the options)."""
    if unnamed not in ("error", "auto"):
        raise TaxonomyError(f"unnamed must be 'error' or 'auto', got {unnamed!r}")
    report = LoadReport(path=str(path), format="newick")
    cols = parse_newick(read_text(path), Path(path).name, underscores)
    loc = cols["locate"]
    pos = cols["pos"]

    def where(i: int) -> str:
        return loc(pos[i])

    names = np.array(cols["name"], dtype=object)
    report.rows_read = len(names)
    missing = np.flatnonzero(np.array([nm is None or nm == "" for nm in names]))
    root_idx = int(np.flatnonzero(np.array(cols["parent"]) < 0)[0])
    if len(missing) and missing[0] == root_idx:
        names[root_idx] = "root"
        missing = missing[1:]
        report.note("the unnamed root was named 'root'")
    if len(missing):
        if unnamed == "error":
            raise TaxonomyError(f"{len(missing)} unnamed node(s), first at {where(int(missing[0]))}. Name every node, "
                                "or pass unnamed='auto' to call them node<N>.")
        names[missing] = [f"node{i}" for i in missing]
        report.repair("unnamed nodes named node<N>", len(missing))
    nhx = cols["nhx"]
    ranks = np.array([t.get("rank", "") for t in nhx], dtype=object)
    rank_order = None
    root_tags = nhx[root_idx]
    if "rank_order" in root_tags:
        rank_order = [r for r in root_tags["rank_order"].split("|") if r]
    lengths = np.array([np.nan if x is None else x for x in cols["length"]], dtype=float)
    if lengths_as_ranks:
        if (ranks != "").any():
            raise TaxonomyError(f"{path}: the tree has NHX ranks; lengths_as_ranks=True would overwrite them")
        ranks = np.where(lengths >= 1, RANKED, "").astype(object)
        rank_order = [RANKED]
        report.note(f"lengths_as_ranks: {int((ranks == RANKED).sum())} node(s) with branch length >= 1 got rank "
                    f"{RANKED!r}")
    elif np.isfinite(lengths).any():
        report.note("branch lengths ignored (pass lengths_as_ranks=True to turn lengths >= 1 into ranks)")
    label_mask: np.ndarray | str = "leaves"
    if labels is not None:
        label_mask = names_to_mask(names, labels, str(path), where)
    elif any("label" in t for t in nhx):
        has_child = np.zeros(len(names), dtype=bool)
        par = np.array(cols["parent"])
        has_child[par[par >= 0]] = True
        flags = [t.get("label") for t in nhx]
        label_mask = np.array([(f in ("1", "true")) if f is not None else not hc
                               for f, hc in zip(flags, has_child)], dtype=bool)
    parent = np.array(cols["parent"], dtype=np.int64)
    # nodes are identified by their path of names (as in nested JSON and path strings), so the same
    # name under two parents ("((A)X,(A)Y)R;") gives two nodes; only siblings must differ
    keys = path_keys(parent, names)
    dup = pd.Series(keys).duplicated(keep=False).to_numpy()
    if dup.any():
        dup = dup & ~np.where(parent >= 0, dup[np.maximum(parent, 0)], False)  # not inside a repeated node
        first = keys[np.flatnonzero(dup)[0]]
        at = np.flatnonzero(keys == first)
        raise TaxonomyError(f"{int(pd.Series(keys[dup]).nunique())} name(s) repeated among siblings, e.g. "
                            f"{str(names[at[0]])!r} ({first!r}) at " + " and ".join(where(int(i)) for i in at[:3])
                            + ". Sibling nodes need different names: rename or merge them.")
    tax = build_taxonomy(parent, names, report=report, where=where, ranks=ranks, keys=keys,
                         labels=label_mask, rank_order=rank_order, check_rank_order=not lengths_as_ranks,
                         count_violations=not lengths_as_ranks)
    return finish(tax, report, return_report)


def _quote(name: str) -> str:
    if name and not _NEEDS_QUOTES.search(name):
        return name
    return "'" + name.replace("'", "''") + "'"


def _nhx_value(value: str, what: str) -> str:
    if any(c in value for c in ":=]|["):
        raise TaxonomyError(f"{what} {value!r} contains one of ':=[]|' and cannot be written as an NHX tag")
    return value


def write_newick(tax: Taxonomy, path: PathLike, lengths: str | None = None, nhx: bool = True) -> Path:
    """Write the tree as Newick (names quoted when needed).

    lengths: ``None`` (no branch lengths) or ``"ranks"`` (``:1`` for ranked nodes, ``:0`` for unranked ones,
        the FathomNet convention).
    nhx: add ``[&&NHX:rank=..:label=..]`` tags (and the rank order on the root) so that ranks and internal
        labels survive a round trip; other Newick tools skip them as comments.
    """
    if lengths not in (None, "ranks"):
        raise TaxonomyError(f"lengths must be None or 'ranks', got {lengths!r}")
    order = preorder(tax)
    names, ranks, is_label, is_leaf = tax.names, tax.ranks, tax.is_label, tax.is_leaf
    n_children = tax.n_children
    parent = tax.parent

    def suffix(v: int) -> str:
        s = _quote(str(names[v]))
        if lengths == "ranks" and v != 0:
            s += ":1" if ranks[v] else ":0"
        if nhx:
            tags = []
            if ranks[v]:
                tags.append(f"rank={_nhx_value(str(ranks[v]), 'rank')}")
            if bool(is_label[v]) != bool(is_leaf[v]):
                tags.append(f"label={int(is_label[v])}")
            if v == 0 and tax.rank_order:
                tags.append("rank_order=" + "|".join(_nhx_value(r, "rank") for r in tax.rank_order))
            if tags:
                s += "[&&NHX:" + ":".join(tags) + "]"
        return s

    # walk the pre-order; close parentheses when leaving subtrees
    out: list[str] = []
    remaining = n_children.copy()
    for k, v in enumerate(order.tolist()):
        if k:
            out.append(",") if out[-1] != "(" else None
        if n_children[v]:
            out.append("(")
            continue
        out.append(suffix(v))
        # close every ancestor whose last child this was
        u = v
        while u != 0:
            p = int(parent[u])
            remaining[p] -= 1
            if remaining[p]:
                break
            out.append(")")
            out.append(suffix(p))
            u = p
    text = "".join(out) + ";\n"
    return write_text(path, text)
