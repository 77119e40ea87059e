"""Indented outlines: one node per line, children indented one unit deeper.

The indent unit is detected (the smallest indentation in the file: e.g. 4
spaces, or one tab). Mixing tabs and spaces, an indentation that is not a
multiple of the unit, or a jump of more than one level is an error naming the
line. Label nodes default to the leaves; ``labels=`` sets them by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, finish, line_where, read_text, write_text
from ._paths_common import PathNodes, drop_synthetic_root, preorder
from .report import LoadReport


def read_outline(path: PathLike, *, labels: Iterable[str] | None = None,
                 return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load an indented outline (see the module docstring)."""
    report = LoadReport(path=str(path), format="outline")
    file = Path(path).name
    entries: list[tuple[int, str, str]] = []  # (line number, indentation, name)
    for ln, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            report.skip("blank lines", 1)
            continue
        name = line.strip()
        entries.append((ln, line[:len(line) - len(line.lstrip())], name))
    if not entries:
        raise TaxonomyError(f"{path}: the outline is empty")
    kinds = {ch for _, ind, _ in entries for ch in ind}
    if len(kinds) > 1:
        first_tab = next(ln for ln, ind, _ in entries if "\t" in ind)
        first_space = next(ln for ln, ind, _ in entries if " " in ind)
        raise TaxonomyError(f"{file}: indentation mixes tabs (line {first_tab}) and spaces (line {first_space}); "
                            "indent with one kind only")
    widths = [len(ind) for _, ind, _ in entries]
    unit = min((w for w in widths if w > 0), default=1)
    nodes = PathNodes()
    stack: list[int] = []  # open ancestors, one per level
    for (ln, ind, name), w in zip(entries, widths):
        if w % unit:
            kind = "tab" if "\t" in ind else "space"
            raise TaxonomyError(f"{file} line {ln}: indentation of {w} is not a multiple of the indent unit ({unit} "
                                f"{kind}(s), from the least indented line); fix "
                                f"the indentation of {name!r}")
        level = w // unit
        if level > len(stack):
            raise TaxonomyError(f"{file} line {ln}: {name!r} is indented {level} level(s) but the line above is at "
                                f"level {len(stack) - 1}; a child goes exactly one level deeper")
        del stack[level:]
        stack.append(nodes.add_child(stack[-1] if stack else -1, name, ln))
    report.rows_read = len(entries)
    where = line_where(path, np.array(nodes.lines))
    tax = nodes.build(report, where, "leaves", labels)
    return finish(tax, report, return_report)


def write_outline(tax: Taxonomy, path: PathLike, indent: str = "    ") -> Path:
    """Write the tree as an indented outline (depth-first, children in id order).

    Loses ranks, keys and label flags (a reader takes the leaves as labels unless
    given ``labels=``). A synthetic root is left out.
    """
    bad = [str(n) for n in tax.names if str(n) != str(n).strip() or "\n" in str(n)]
    if bad:
        raise TaxonomyError(f"{len(bad)} name(s) start/end with spaces or contain a newline (e.g. {bad[0]!r}); "
                            "an outline cannot carry them")
    order = preorder(tax)
    depth = tax.depth[order]
    if drop_synthetic_root(tax):
        order, depth = order[1:], depth[1:] - 1
    lines = [indent * int(d) + str(tax.names[v]) for v, d in zip(order, depth)]
    return write_text(path, "\n".join(lines) + "\n")
