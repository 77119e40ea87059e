"""`taxonomist taxonomy info|show|distance|convert|validate TREE ...`"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MAX_LINES = 200


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("taxonomy", help="inspect, convert and validate taxonomy files",
                       description="Read a taxonomy in any supported format (auto-detected: taxonomist JSON, nested "
                                   "JSON, Newick, edge tables such as NCBI/iNaturalist/Darwin Core, lineage tables, "
                                   "path strings, indented outlines, WordNet ids) and inspect, convert or check it.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("tree", help="taxonomy file")
    common.add_argument("--format", default=None,
                        help="input format instead of auto-detection (taxonomist-json, nested-json, newick, edges, "
                             "lineage, paths, outline, wordnet)")
    common.add_argument("--labels-from", default=None, metavar="FILE",
                        help="make exactly these nodes the labels: one name/key per line, or a table with a "
                             "label/class/name/wnid column")
    common.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                        help="reader option, e.g. on_conflict=split, orphans=attach_to_root, strict_ranks=true, "
                             "lengths_as_ranks=true, ignore_columns=a,b (repeatable)")

    info = verbs.add_parser("info", parents=[common], help="counts, depth, ranks, fingerprint and the load report")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_guard(cmd_info))

    show = verbs.add_parser("show", parents=[common], help="print the tree (ranks in [], labels marked *)")
    show.add_argument("--max-depth", type=int, default=None, help="print nodes down to this depth only")
    show.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES,
                      help=f"stop after this many lines (default {DEFAULT_MAX_LINES}; 0 = no limit)")
    show.set_defaults(func=_guard(cmd_show))

    dist = verbs.add_parser("distance", parents=[common], help="tree distance between two taxa (names or keys)")
    dist.add_argument("a", help="first taxon (name or key)")
    dist.add_argument("b", help="second taxon (name or key)")
    dist.add_argument("--metric", choices=["path", "lca_height", "rank_steps"], default=None,
                      help="one metric (default: every metric that applies)")
    dist.add_argument("--ranks", default=None, help="comma-separated ranks counted by rank_steps (default: all)")
    dist.set_defaults(func=_guard(cmd_distance))

    conv = verbs.add_parser("convert", parents=[common], help="write the tree in another format")
    conv.add_argument("out", help="output file (format from the extension: .json, .nwk, .tsv/.csv edges, .txt outline)")
    conv.add_argument("--to", default=None, metavar="FORMAT",
                      help="output format (taxonomist-json, nested-json, newick, edges, lineage, paths, outline); "
                           "--format names the INPUT format")
    conv.add_argument("--check", action="store_true", help="read the written file back and compare fingerprints")
    conv.set_defaults(func=_guard(cmd_convert))

    val = verbs.add_parser("validate", parents=[common], help="check the tree; exit 0 with 'OK' or 1 with problems")
    val.set_defaults(func=_guard(cmd_validate))

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a missing optional dependency (an ImportError, not a user error) without a traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from ..taxonomy import MissingDependencyError

        try:
            return fn(args)
        except MissingDependencyError as exc:
            print(f"taxonomist taxonomy {args.verb}: error: {exc}", file=sys.stderr)
            return 1

    return run


# ------------------------------------------------------------------ loading
def _option_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    try:
        return int(text)
    except ValueError:
        return text


def parse_options(items: list[str]) -> dict[str, Any]:
    from ..errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. --option on_conflict=split")
        key, value = item.split("=", 1)
        out[key.strip()] = _option_value(value.strip())
    return out


def read_label_list(path: str) -> list[str]:
    """Names from a label file: one per line, or the label/class/name/wnid column of a CSV/TSV table."""
    import csv

    from ..errors import DataError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"label file not found: {path}")
    lines = [ln for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no labels found")
    sep = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    if sep is None:
        return [ln.strip() for ln in lines]
    rows = list(csv.reader(lines, delimiter=sep))
    header = [h.strip().lower() for h in rows[0]]
    for cand in ("label", "class", "name", "wnid", "taxon", "category"):
        if cand in header:
            j = header.index(cand)
            return [r[j].strip() for r in rows[1:] if len(r) > j and r[j].strip()]
    raise DataError(f"{path}: a table of labels needs a label, class, name or wnid column (header: {rows[0]})")


def load_tree(args: argparse.Namespace, return_report: bool = True):
    """Load TREE with --format/--option, then apply --labels-from."""
    import numpy as np

    from ..taxonomy import load

    tax, report = load(args.tree, format=args.format, return_report=True, **parse_options(args.option))
    if args.labels_from:
        names = read_label_list(args.labels_from)
        ids = np.unique(np.array([tax.find(n) for n in names], dtype=np.int64))
        before = report.n_labels
        tax = tax.with_labels(ids)
        report.n_labels = tax.n_labels  # the report describes the tree returned, not the file's own labels
        report.note(f"label nodes set from {args.labels_from}: {tax.n_labels} node(s) (the file alone gives "
                    f"{before})" + (f"; {len(names) - len(ids)} line(s) naming an already listed node merged"
                                    if len(names) > len(ids) else ""))
    return (tax, report) if return_report else tax


# ------------------------------------------------------------------ verbs
def cmd_info(args: argparse.Namespace) -> int:
    tax, report = load_tree(args)
    summary = tax.summary()
    if args.json:
        print(json.dumps({"tree": args.tree, "format": report.format, "summary": summary,
                          "load_report": report.to_dict()}, indent=2, default=str))
        return 0
    print(f"{args.tree} ({report.format})")
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        shown = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        print(f"  {k:<{width}}  {shown if shown != '' else '-'}")
    print("load report:")
    for line in report.lines():
        print(f"  {line}")
    return 0


def format_tree(tax, max_depth: int | None = None, max_lines: int = DEFAULT_MAX_LINES) -> list[str]:
    """Readable tree lines (box drawing), depth-first; only visited nodes are touched."""

    def label(v: int) -> str:
        s = str(tax.names[v])
        if tax.ranks[v]:
            s += f" [{tax.ranks[v]}]"
        if tax.is_label[v]:
            s += " *"
        return s

    lines = [label(0)]
    stack: list[tuple[int, str, bool]] = [(int(c), "", i == tax.n_children[0] - 1)
                                          for i, c in reversed(list(enumerate(tax.children(0))))]
    shown = 1
    while stack:
        if max_lines and shown >= max_lines:
            hidden = tax.n_nodes - shown
            lines.append(f"... {hidden:,} more node(s) not shown (use --max-depth or --max-lines)")
            break
        v, prefix, last = stack.pop()
        text = prefix + ("└── " if last else "├── ") + label(v)
        kids = tax.children(v)
        if len(kids) and max_depth is not None and tax.depth[v] >= max_depth:
            text += f"  (+{int(tax.subtree_size[v]) - 1:,} nodes below)"
            kids = kids[:0]
        lines.append(text)
        shown += 1
        child_prefix = prefix + ("    " if last else "│   ")
        stack.extend((int(c), child_prefix, i == len(kids) - 1) for i, c in reversed(list(enumerate(kids))))
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    tax = load_tree(args, return_report=False)
    print("\n".join(format_tree(tax, args.max_depth, args.max_lines)))
    return 0


def cmd_distance(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    tax = load_tree(args, return_report=False)
    a, b = tax.find(args.a), tax.find(args.b)
    ranks = [r.strip() for r in args.ranks.split(",") if r.strip()] if args.ranks else None
    if ranks and args.metric not in (None, "rank_steps"):
        raise ConfigError("--ranks only applies to --metric rank_steps")
    metrics = [args.metric] if args.metric else ["path", "lca_height"] + (["rank_steps"] if tax.has_ranks else [])
    lca = int(tax.lca(a, b))

    synthetic_root = tax.names[0] == "root" and not tax.ranks[0]

    def describe(v: int) -> str:
        rank = f" [{tax.ranks[v]}]" if tax.ranks[v] else ""
        return f"{tax.names[v]}{rank} (key {tax.keys[v]}): {tax.lineage(v, include_root=not synthetic_root) or 'root'}"

    print(f"A: {describe(a)}")
    print(f"B: {describe(b)}")
    print(f"lowest common ancestor: {describe(lca)}")
    for m in metrics:
        d = int(tax.distance(a, b, metric=m, ranks=ranks if m == "rank_steps" else None))
        extra = f" (ranks: {', '.join(ranks or tax.rank_order)})" if m == "rank_steps" else ""
        print(f"{m}: {d}{extra}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..taxonomy import FORMATS, load, save
    from ..taxonomy.io.detect import SAVE_BY_EXTENSION, resolve_format
    from ..taxonomy.io._common import suffix

    tax = load_tree(args, return_report=False)
    out = save(tax, args.out, format=args.to)
    fmt = resolve_format(args.to) if args.to else SAVE_BY_EXTENSION[suffix(args.out)]
    print(f"wrote {out} ({fmt}: keeps {FORMATS[fmt].carries}); fingerprint {tax.fingerprint}")
    if args.check:
        back = load(out, format=fmt)
        same = back.fingerprint == tax.fingerprint
        verdict = "identical" if same else "DIFFERENT: the format lost information, see above"
        print(f"read back: fingerprint {back.fingerprint} ({verdict})")
        return 0 if same else 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..taxonomy import validate_taxonomy

    tax, report = load_tree(args)
    result = validate_taxonomy(tax)
    s = tax.summary()
    head = (f"{s['n_nodes']:,} nodes, {s['n_labels']:,} labels ({s['n_internal_labels']:,} internal), "
            f"depth {s['depth_min_leaf']}-{s['depth_max']}, ranks: {', '.join(s['ranks']) or '-'}")
    for line in report.lines()[1:]:
        print(f"note: {line}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.ok:
        print(f"OK: {args.tree}: {head}")
        return 0
    for prob in result.problems:
        print(f"problem: {prob}")
    print(f"INVALID: {args.tree}: {len(result.problems)} problem(s); {head}")
    return 1
