"""Build a taxonomy from root-first name paths (shared by path strings and outlines).

A node is identified by its path prefix (``"A > B"``), which is also its key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..core import Taxonomy
from .report import LoadReport
from ._common import build_taxonomy, names_to_mask

KEY_SEP = " > "


class PathNodes:
    """Incremental node table: ``add(path_prefix_key, name, parent_index, line)`` -> index."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.parent: list[int] = []
        self.names: list[str] = []
        self.keys: list[str] = []
        self.lines: list[int] = []

    def add_path(self, parts: Sequence[str], line: int) -> int:
        """Create the missing nodes of a root-first path; return the index of its last node."""
        parent = -1
        key = ""
        for part in parts:
            key = part if not key else key + KEY_SEP + part
            idx = self.index.get(key)
            if idx is None:
                idx = len(self.names)
                self.index[key] = idx
                self.parent.append(parent)
                self.names.append(part)
                self.keys.append(key)
                self.lines.append(line)
            parent = idx
        return parent

    def add_child(self, parent: int, name: str, line: int) -> int:
        """Append a node under ``parent`` (outline: one node per line, duplicates kept for the core to report)."""
        key = name if parent < 0 else self.keys[parent] + KEY_SEP + name
        idx = len(self.names)
        self.index.setdefault(key, idx)
        self.parent.append(parent)
        self.names.append(name)
        self.keys.append(key)
        self.lines.append(line)
        return idx

    def build(self, report: LoadReport, where: Callable[[int], str], label_mask: np.ndarray | str,
              labels: Iterable[str] | None) -> Taxonomy:
        names = np.array(self.names, dtype=object)
        if labels is not None:
            label_mask = names_to_mask(names, labels, report.path, where)
        return build_taxonomy(np.array(self.parent, dtype=np.int64), names, report=report, where=where,
                              keys=np.array(self.keys, dtype=object), labels=label_mask, rank_order=())


def preorder(tax: Taxonomy) -> np.ndarray:
    """Node ids in depth-first pre-order (children in id order), from the core's ``preorder`` positions."""
    order = np.empty(tax.n_nodes, dtype=np.int64)
    order[tax.preorder] = np.arange(tax.n_nodes)
    return order


def drop_synthetic_root(tax: Taxonomy) -> bool:
    """True when the root is an unranked node named 'root' with >= 2 children: the readers re-create it."""
    return tax.names[0] == "root" and tax.ranks[0] == "" and int(tax.n_children[0]) >= 2
