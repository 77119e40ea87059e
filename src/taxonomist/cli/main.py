"""Entry point of the `taxonomist` command: builds the parser from one module per verb."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import USER_ERRORS

# Each module defines register(subparsers) and sets a `func(args) -> int` default.
COMMAND_MODULES = ["demo_cmd", "train_cmd", "evaluate_cmd", "predict_cmd", "taxonomy_cmd", "score_cmd",
                   "calibrate_cmd", "report_cmd", "pack_cmd", "list_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxonomist",
        description="Hierarchical (taxonomic) image classification: trees, training, evaluation, prediction.")
    parser.add_argument("--version", action="version", version=f"taxonomist {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"taxonomist {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
