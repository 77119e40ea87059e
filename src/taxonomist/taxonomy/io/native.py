"""taxonomist's own JSON format: the Taxonomy's arrays, column by column.

::

    {"format": "taxonomist-taxonomy", "version": 1, "fingerprint": "sha256:...",
     "n_nodes": 5, "parent": [-1, 0, 0, 1, 1], "names": [...], "ranks": [...],
     "keys": [...], "labels": [2, 3, 4], "rank_order": [...]}

Ids are already canonical, so a round trip is exact (same fingerprint); the
stored fingerprint is checked on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, build_taxonomy, finish, write_text
from .nested_json import parse_json
from .report import LoadReport

FORMAT_NAME = "taxonomist-taxonomy"
FORMAT_VERSION = 1


def is_native(data: object) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def to_native(tax: Taxonomy) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": tax.fingerprint,
            "n_nodes": tax.n_nodes, "parent": tax.parent.tolist(), "names": [str(x) for x in tax.names],
            "ranks": [str(x) for x in tax.ranks], "keys": [str(x) for x in tax.keys],
            "labels": tax.label_ids.tolist(), "rank_order": list(tax.rank_order)}


def read_taxonomy_json(path: PathLike, *, data: object | None = None, verify: bool = True,
                       return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load taxonomist's own JSON (see the module docstring); ``verify`` checks the stored fingerprint."""
    report = LoadReport(path=str(path), format="taxonomist-json")
    data = parse_json(path) if data is None else data
    file = Path(path).name
    if not is_native(data):
        raise TaxonomyError(f"{file}: not a taxonomist taxonomy file (no \"format\": {FORMAT_NAME!r})")
    assert isinstance(data, dict)
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise TaxonomyError(f"{file}: format version {data.get('version')} is newer than this taxonomist "
                            f"({FORMAT_VERSION}); upgrade taxonomist")
    missing = [k for k in ("parent", "names", "ranks", "keys", "labels", "rank_order") if k not in data]
    if missing:
        raise TaxonomyError(f"{file}: missing field(s) {missing}")
    n = len(data["parent"])
    for k in ("names", "ranks", "keys"):
        if len(data[k]) != n:
            raise TaxonomyError(f"{file}: {k!r} has {len(data[k])} entries but 'parent' has {n}")
    labels = np.asarray(data["labels"], dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise TaxonomyError(f"{file}: 'labels' holds node ids outside 0..{n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[labels] = True
    report.rows_read = n

    def where(i: int) -> str:
        return f"{file} node {i} ({data['names'][i]!r})"

    tax = build_taxonomy(np.asarray(data["parent"], dtype=np.int64), np.asarray(data["names"], dtype=object),
                         report=report, where=where, ranks=np.asarray(data["ranks"], dtype=object),
                         keys=np.asarray(data["keys"], dtype=object), labels=mask, rank_order=data["rank_order"],
                         check_rank_order=False)
    stored = data.get("fingerprint")
    if verify and stored and stored != tax.fingerprint:
        raise TaxonomyError(f"{file}: the stored fingerprint {stored} does not match the tree in the file "
                            f"({tax.fingerprint}): the file was edited or corrupted. Re-export it, or load with "
                            "verify=False to accept the tree as it is.")
    if not np.array_equal(tax.parent, np.asarray(data["parent"])):
        report.note("node ids were not in canonical order; they were renumbered")
    return finish(tax, report, return_report)


def write_taxonomy_json(tax: Taxonomy, path: PathLike, indent: int | None = None) -> Path:
    """Write taxonomist's own JSON (exact round trip)."""
    return write_text(path, json.dumps(to_native(tax), indent=indent, ensure_ascii=False) + "\n")
