"""WordNet hierarchies from a list of noun synset ids (wnids such as ``n01443537``).

Needs the optional package nltk (``pip install 'taxonomist[wordnet]'``) and the
WordNet corpus (``NLTK_DATA=/path/to/nltk_data`` or ``nltk_data=`` here).

The hypernym graph (hypernyms and instance hypernyms) of every ancestor of the
given synsets is a DAG; :func:`taxonomist.taxonomy.dag.dag_to_tree` keeps one
parent per synset by the chosen rule (default: the parent on the longest path
to ``entity.n.01``). The given wnids are the label nodes (they may be internal
when one is a hypernym of another); keys are wnids; names are the first lemma
(``names="lemma"``, underscores as spaces) or the synset name
(``names="synset"``, e.g. ``goldfish.n.01``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..core import Taxonomy
from ..dag import dag_to_tree
from ..errors import TaxonomyError
from ._common import MissingDependencyError, PathLike, build_taxonomy, finish, read_text
from .report import LoadReport

WNID = re.compile(r"^[nvasr]\d{8}$")


def _wordnet(nltk_data: PathLike | None):
    try:
        import nltk
    except ImportError:
        raise MissingDependencyError("nltk", "wordnet", "building a taxonomy from WordNet") from None
    if nltk_data is not None and str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    from nltk.corpus import wordnet as wn
    try:
        wn.ensure_loaded()
    except LookupError:
        raise TaxonomyError("the WordNet corpus is not installed: set NLTK_DATA to a folder holding "
                            "corpora/wordnet (or pass nltk_data=...), or run python -m nltk.downloader wordnet") \
            from None
    return wn


def read_wnid_list(path: PathLike) -> tuple[list[str], list[int]]:
    """Wnids from a file: a one-per-line list, or a table with a ``wnid`` column (first in any other
    column layout: the first column whose values look like wnids). Returns (wnids, line numbers)."""
    lines = read_text(path).splitlines()
    file = Path(path).name
    rows = [(i + 1, ln.split("\t") if "\t" in ln else ln.split(",")) for i, ln in enumerate(lines) if ln.strip()]
    if not rows:
        raise TaxonomyError(f"{path}: no wnids found")
    header = [c.strip().lower() for c in rows[0][1]]
    col = None
    if "wnid" in header:
        col, rows = header.index("wnid"), rows[1:]
    else:
        first = rows[0][1] if WNID.match(rows[0][1][0].strip()) else rows[1][1] if len(rows) > 1 else rows[0][1]
        col = next((j for j, c in enumerate(first) if WNID.match(c.strip())), None)
        if col is None:
            raise TaxonomyError(f"{file}: no 'wnid' column and no column of wnids like 'n01443537'")
        if not WNID.match(rows[0][1][col].strip() if col < len(rows[0][1]) else ""):
            rows = rows[1:]
    wnids, where = [], []
    for ln, cells in rows:
        value = cells[col].strip() if col < len(cells) else ""
        if not WNID.match(value):
            raise TaxonomyError(f"{file} line {ln}: {value!r} is not a WordNet id like 'n01443537'")
        wnids.append(value)
        where.append(ln)
    return wnids, where


def read_wordnet(source: PathLike | Iterable[str], *, rule: str = "longest", names: str = "lemma",
                 nltk_data: PathLike | None = None,
                 return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Build the taxonomy of the given wnids (a list, or a file: see :func:`read_wnid_list`).

    rule: how to keep one hypernym per synset (:data:`taxonomist.taxonomy.dag.DAG_RULES`).
    names: ``"lemma"`` or ``"synset"``.
    """
    if names not in ("lemma", "synset"):
        raise TaxonomyError(f"names must be 'lemma' or 'synset', got {names!r}")
    if isinstance(source, (str, Path)):
        wnids, lines = read_wnid_list(source)
        label = str(source)
    else:
        wnids = [str(w) for w in source]
        lines = list(range(1, len(wnids) + 1))
        label = "<wnid list>"
    report = LoadReport(path=label, format="wordnet", rows_read=len(wnids))
    wn = _wordnet(nltk_data)
    given: dict[str, int] = {}
    for w, ln in zip(wnids, lines):
        if w in given:
            report.skip("repeated wnids (merged)", 1)
            continue
        given[w] = ln
    # breadth-first walk over hypernyms: collect every ancestor synset and the child -> parent links
    index: dict[str, int] = {}
    synsets = []
    for w, ln in given.items():
        with warnings.catch_warnings():  # nltk warns and returns None for an unknown offset
            warnings.simplefilter("ignore")
            try:
                s = wn.synset_from_pos_and_offset(w[0], int(w[1:]))
            except Exception:  # older nltk raises instead
                s = None
        if s is None:
            raise TaxonomyError(f"{label} line {ln}: {w!r} is not a synset in this WordNet")
        if w not in index:
            index[w] = len(synsets)
            synsets.append(s)
    child: list[int] = []
    parent: list[int] = []
    k = 0
    while k < len(synsets):
        s = synsets[k]
        for h in s.hypernyms() + s.instance_hypernyms():
            hw = f"{h.pos()}{h.offset():08d}"
            if hw not in index:
                index[hw] = len(synsets)
                synsets.append(h)
            child.append(k)
            parent.append(index[hw])
        k += 1
    keys = np.array(list(index), dtype=object)
    result = dag_to_tree(len(keys), np.array(child, dtype=np.int64), np.array(parent, dtype=np.int64),
                         keys=keys, rule=rule, where=lambda i: f"synset {keys[i]}")
    report.repair(f"synsets with several hypernyms (kept the one on the {rule} path)", result.n_multi_parent)
    report.note(f"{len(keys)} synsets in the hypernym DAG, {len(child)} hypernym links, "
                f"{result.n_dropped_edges} links dropped by the {rule!r} rule")
    if names == "lemma":
        display = np.array([s.lemma_names()[0].replace("_", " ") for s in synsets], dtype=object)
    else:
        display = np.array([s.name() for s in synsets], dtype=object)
    mask = np.zeros(len(keys), dtype=bool)
    mask[[index[w] for w in given]] = True

    def where(i: int) -> str:
        w = keys[i]
        return f"{label} line {given[w]} ({w})" if w in given else f"synset {w} ({synsets[i].name()})"

    tax = build_taxonomy(result.parent, display, report=report, where=where, keys=keys, labels=mask, rank_order=())
    return finish(tax, report, return_report)
