"""Path strings (EcoTaxa style): ``A > B > C`` per line, optionally after a class column.

Accepted layouts (tab-separated, optional header line such as ``class<TAB>path``):

* ``path`` alone: each line's last element is a label node;
* ``class<TAB>path``: the class must equal the path's last element (else an error naming
  the line); an empty class makes the path's last node a non-label node.

A class name that ends two different paths (``a<TAB>X > a`` and ``a<TAB>Y > a``) is an
error naming both lines, unless ``on_conflict="split"`` keeps them as separate labels
(same name, different path keys; counted in the load report).

Nodes are identified by their path prefix, so NDSB's internal classes (a class whose
path is a prefix of other paths) are internal label nodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, finish, line_where, read_text, write_text
from ._paths_common import PathNodes, drop_synthetic_root
from .report import LoadReport

PATH_HEADERS = {"path", "lineage", "hierarchy", "taxonomy", "taxonomic_path", "display_path",
                "object_annotation_hierarchy"}
CLASS_HEADERS = {"class", "label", "name", "category", "taxon", "object_annotation_category"}


def _is_header(cells: list[str], sep: str) -> bool:
    low = [c.strip().lower() for c in cells]
    if len(cells) == 2:
        return low[1] in PATH_HEADERS or (low[0] in CLASS_HEADERS and sep not in cells[1])
    return len(cells) == 1 and low[0] in PATH_HEADERS


def read_path_strings(path: PathLike, *, sep: str = ">", labels: Iterable[str] | None = None,
                      on_conflict: str = "error",
                      return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a path-string file (see the module docstring).

    sep: the path separator (elements are stripped of surrounding spaces).
    labels: names of label nodes to use instead of each line's last element.
    on_conflict: ``"error"`` (default): a class name ending two different paths is an error naming
        both lines; ``"split"``: keep them as separate label nodes (same name, different path keys).
    """
    if on_conflict not in ("error", "split"):
        raise TaxonomyError(f"on_conflict must be 'error' or 'split', got {on_conflict!r}")
    report = LoadReport(path=str(path), format="paths")
    file = Path(path).name
    lines = read_text(path).splitlines()
    nodes = PathNodes()
    label_idx: list[int] = []
    label_line: list[int] = []
    nonlabel_idx: list[int] = []
    seen_paths: set[str] = set()
    start = 0
    if lines and _is_header(lines[0].split("\t"), sep):
        start = 1
    n_cols = None
    for ln in range(start, len(lines)):
        line = lines[ln]
        if not line.strip():
            report.skip("blank lines", 1)
            continue
        cells = line.split("\t")
        if n_cols is None:
            n_cols = len(cells)
            if n_cols > 2:
                raise TaxonomyError(f"{file} line {ln + 1}: expected 'path' or 'class<TAB>path', found {n_cols} "
                                    "tab-separated fields")
        if len(cells) != n_cols:
            raise TaxonomyError(f"{file} line {ln + 1}: {len(cells)} field(s), but earlier lines have {n_cols}")
        report.rows_read += 1
        raw_path = cells[-1]
        parts = [p.strip() for p in raw_path.split(sep)]
        if any(not p for p in parts):
            k = next(i for i, p in enumerate(parts) if not p)
            raise TaxonomyError(f"{file} line {ln + 1}: empty name at position {k + 1} of the path {raw_path!r}; "
                                f"remove the doubled or dangling {sep!r}")
        cls = cells[0].strip() if n_cols == 2 else parts[-1]
        if cls and cls != parts[-1]:
            raise TaxonomyError(f"{file} line {ln + 1}: the class {cls!r} differs from the last element of its path "
                                f"{parts[-1]!r} ({raw_path.strip()!r}); make them equal")
        key = " > ".join(parts)
        if key in seen_paths:
            report.skip("lines repeating an earlier path (merged)", 1)
        seen_paths.add(key)
        idx = nodes.add_path(parts, ln + 1)
        (label_idx if cls else nonlabel_idx).append(idx)
        if cls:
            label_line.append(ln + 1)
    if not nodes.names:
        raise TaxonomyError(f"{path}: no paths found")
    if labels is None:
        _check_class_homonyms(nodes, np.array(label_idx, dtype=np.int64), np.array(label_line, dtype=np.int64),
                              file, on_conflict, report)
    mask = np.zeros(len(nodes.names), dtype=bool)
    mask[label_idx] = True
    where = line_where(path, np.array(nodes.lines))
    tax = nodes.build(report, where, mask, labels)
    return finish(tax, report, return_report)


def _check_class_homonyms(nodes: PathNodes, label_idx: np.ndarray, label_line: np.ndarray, file: str,
                          on_conflict: str, report: LoadReport) -> None:
    """A class name that ends two different paths would give two labels with one name: an error naming
    both lines, or (``on_conflict="split"``) counted in the report."""
    if len(label_idx) == 0:
        return
    names = np.asarray(nodes.names, dtype=object)
    df = pd.DataFrame({"name": names[label_idx], "node": label_idx, "line": label_line})
    per = df.drop_duplicates("node")
    n_nodes = per.groupby("name", sort=False)["node"].transform("size").to_numpy()
    clash = per[n_nodes > 1]
    if clash.empty:
        return
    if on_conflict == "split":
        report.repair("class names ending several paths kept as separate labels (on_conflict='split')",
                      int(len(clash)))
        return
    name = clash["name"].iloc[0]
    two = clash[clash["name"] == name].head(2)
    shown = "; ".join(f"{file} line {int(ln)} ({nodes.keys[int(v)]!r})" for v, ln in zip(two["node"], two["line"]))
    raise TaxonomyError(f"the class {name!r} ends two different paths: {shown} ({clash['name'].nunique()} class "
                        "name(s) like this). A class name must name one node: fix the paths, or pass "
                        "on_conflict='split' (CLI: -O on_conflict=split) to keep them as separate labels, told "
                        "apart by their path keys.")


def write_path_strings(tax: Taxonomy, path: PathLike, sep: str = " > ", header: bool = True) -> Path:
    """Write ``class<TAB>path`` for every label node (and, with an empty class, every non-label leaf).

    Loses ranks. A synthetic root (unranked 'root' with several children) is left out; the reader adds it back.
    """
    nodes = np.union1d(tax.label_ids, tax.leaves)
    anc = tax.ancestor_matrix(nodes)
    skip_root = drop_synthetic_root(tax)
    bad = [str(n) for n in tax.names if sep.strip() in str(n) or "\t" in str(n) or "\n" in str(n)]
    if bad:
        raise TaxonomyError(f"{len(bad)} name(s) contain the separator {sep.strip()!r} or a tab/newline "
                            f"(e.g. {bad[0]!r}); use another format")
    names = tax.names
    out = ["class\tpath"] if header else []
    for row, v in zip(anc, nodes):
        ids = row[row >= 0]
        if skip_root:
            ids = ids[1:]
        out.append(f"{names[v] if tax.is_label[v] else ''}\t{sep.join(str(names[i]) for i in ids)}")
    return write_text(path, "\n".join(out) + "\n")
