"""Nested JSON trees, in two shapes:

* node objects: ``{"name": "A", "rank": "kingdom", "children": [{...}, ...]}``;
  optional ``key``/``id``, ``label`` (true/false: default = is a leaf) and, on the
  top node, ``rank_order`` (a list). A top-level list of nodes gets a synthetic root.
* dict of dicts: ``{"A": {"B": {}, "C": {"D": null}}}`` (a leaf's value is ``{}``,
  ``null`` or a list of leaf names).

Error messages locate nodes by their JSON path (``$.children[2].children[0]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, build_taxonomy, finish, names_to_mask, path_keys, read_text, write_text
from ._paths_common import preorder
from .ranks import normalize_rank
from .report import LoadReport

_NODE_KEYS = {"name", "rank", "children", "key", "id", "label", "is_label", "rank_order"}


def parse_json(path: PathLike) -> object:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaxonomyError(f"{Path(path).name} line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}") \
            from None


def is_node_object(data: object) -> bool:
    if isinstance(data, list):
        return bool(data) and all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in data)
    return isinstance(data, dict) and isinstance(data.get("name"), str) and \
        isinstance(data.get("children", []), list)


def read_nested_json(path: PathLike, *, labels: Iterable[str] | None = None, data: object | None = None,
                     return_report: bool = False) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a nested JSON tree (either shape; see the module docstring)."""
    report = LoadReport(path=str(path), format="nested-json")
    data = parse_json(path) if data is None else data
    parent: list[int] = []
    names: list[str] = []
    ranks: list[str] = []
    keys: list[str | None] = []
    flags: list[bool | None] = []
    jpath: list[str] = []
    file = Path(path).name
    rank_order = None

    def add(p: int, name: object, at: str, rank: object = "", key: object = None, flag: object = None) -> int:
        if not isinstance(name, str):
            raise TaxonomyError(f"{file} {at}: 'name' must be a string, got {name!r}")
        if flag is not None and not isinstance(flag, bool):
            raise TaxonomyError(f"{file} {at}: 'label' must be true or false, got {flag!r}")
        parent.append(p)
        names.append(name)
        ranks.append(normalize_rank(rank) if rank else "")
        keys.append(None if key is None else str(key))
        flags.append(flag)
        jpath.append(at)
        return len(names) - 1

    if is_node_object(data):
        tops = data if isinstance(data, list) else [data]
        if isinstance(data, dict) and "rank_order" in data:
            rank_order = [normalize_rank(r) for r in data["rank_order"]]
        stack = [(-1, node, f"$[{i}]" if isinstance(data, list) else "$") for i, node in enumerate(tops)][::-1]
        while stack:
            p, node, at = stack.pop()
            if not isinstance(node, dict):
                raise TaxonomyError(f"{file} {at}: expected a node object, got {type(node).__name__}")
            unknown = set(node) - _NODE_KEYS
            if unknown:
                report.note(f"ignored unknown node field(s) {sorted(unknown)} (first at {at})")
                report.skip("unknown node fields", len(unknown))
            flag = node.get("label", node.get("is_label"))
            idx = add(p, node.get("name"), at, node.get("rank") or "", node.get("key", node.get("id")), flag)
            children = node.get("children") or []
            if not isinstance(children, list):
                raise TaxonomyError(f"{file} {at}.children: expected a list")
            stack.extend((idx, c, f"{at}.children[{k}]") for k, c in reversed(list(enumerate(children))))
    elif isinstance(data, dict):
        stack2 = [(-1, k, v, f"$[{json.dumps(k)}]") for k, v in reversed(list(data.items()))]
        while stack2:
            p, name, value, at = stack2.pop()
            idx = add(p, name, at)
            if value is None or value == {} or value == []:
                continue
            if isinstance(value, dict):
                stack2.extend((idx, k, v, f"{at}[{json.dumps(k)}]") for k, v in reversed(list(value.items())))
            elif isinstance(value, list) and all(isinstance(x, str) for x in value):
                stack2.extend((idx, x, None, f"{at}[{j}]") for j, x in reversed(list(enumerate(value))))
            else:
                raise TaxonomyError(f"{file} {at}: a dict-of-dicts value must be an object, null or a list of names, "
                                    f"got {type(value).__name__}")
    else:
        raise TaxonomyError(f"{file}: expected a node object {{'name':..,'children':[..]}}, a list of them, or a "
                            "dict of dicts")
    report.rows_read = len(names)

    def where(i: int) -> str:
        return f"{file} {jpath[i]}"

    n = len(names)
    par = np.array(parent, dtype=np.int64)
    # keys: given ones, else the name path (unique among siblings)
    key_arr = path_keys(par, np.array(names, dtype=object), np.array(keys, dtype=object))
    label_mask: np.ndarray | str = "leaves"
    names_arr = np.array(names, dtype=object)
    if labels is not None:
        label_mask = names_to_mask(names_arr, labels, str(path), where)
    elif any(f is not None for f in flags):
        has_child = np.zeros(n, dtype=bool)
        has_child[par[par >= 0]] = True
        label_mask = np.array([f if f is not None else not hc for f, hc in zip(flags, has_child)], dtype=bool)
    tax = build_taxonomy(par, names_arr, report=report, where=where, ranks=np.array(ranks, dtype=object),
                         keys=key_arr, labels=label_mask, rank_order=rank_order)
    return finish(tax, report, return_report)


def to_nested(tax: Taxonomy, keys: bool = True) -> dict:
    """The tree as nested node objects (``name``, ``rank``, ``key``, ``label`` when not the leaf default)."""
    objs: list[dict] = [None] * tax.n_nodes  # type: ignore[list-item]
    for v in preorder(tax).tolist():
        o: dict = {"name": str(tax.names[v])}
        if tax.ranks[v]:
            o["rank"] = str(tax.ranks[v])
        if keys:
            o["key"] = str(tax.keys[v])
        if bool(tax.is_label[v]) != bool(tax.is_leaf[v]):
            o["label"] = bool(tax.is_label[v])
        if tax.n_children[v]:
            o["children"] = []
        objs[v] = o
        if v:
            objs[int(tax.parent[v])]["children"].append(o)
    root = objs[0]
    if tax.rank_order:
        root = {**root, "rank_order": list(tax.rank_order)}
    return root


def write_nested_json(tax: Taxonomy, path: PathLike, indent: int | None = 1) -> Path:
    """Write nested node objects; carries names, ranks, keys, label flags and the rank order."""
    return write_text(path, json.dumps(to_nested(tax), indent=indent, ensure_ascii=False) + "\n")
