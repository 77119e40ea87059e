"""`taxonomist list KIND`: the registered heads, losses, task weightings, decision rules and
augmentation presets, each with its options and their defaults (what a config may name)."""

from __future__ import annotations

import argparse
import json
from typing import Any

KINDS = ("heads", "losses", "weightings", "decisions", "augment")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list heads, losses, weightings, decision rules or augmentation presets",
                       description="List what a config can name, with each option and its default.")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def catalogue(kind: str) -> dict[str, dict[str, Any]]:
    """``{name: {option: default}}`` for one kind."""
    if kind == "heads":
        from ..models.heads import head_options, list_heads

        return {n: head_options(n) for n in list_heads()}
    if kind == "losses":
        from ..losses import list_losses, loss_options

        return {n: loss_options(n) for n in list_losses()}
    if kind == "weightings":
        from ..losses.weighting import WEIGHTINGS

        return {n: {k: v for k, v in WEIGHTINGS.options(n).items() if k != "tasks"} for n in WEIGHTINGS.names()}
    if kind == "decisions":
        import inspect

        from ..decide import DECISION_RULES

        out = {}
        for name, fn in DECISION_RULES.items():
            params = list(inspect.signature(fn).parameters.values())[2:]
            out[name] = {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params}
        return out
    from dataclasses import fields

    from ..data.augment import AUGMENT_PRESETS, AugmentSpec

    opts = {f.name: f.default for f in fields(AugmentSpec) if f.name != "name"}
    return {n: dict(opts, **{k: v for k, v in AugmentSpec(name=n).resolved().items()}) for n in AUGMENT_PRESETS}


def run(args: argparse.Namespace) -> int:
    items = catalogue(args.kind)
    if args.json:
        print(json.dumps(items, indent=2, default=str))
        return 0
    width = max(len(n) for n in items)
    for name, opts in items.items():
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items()) or "(no options)"
        print(f"{name:<{width}}  {shown}")
    return 0
