"""`taxonomist train CONFIG.yaml [key=value ...]`"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (auto-resumes an interrupted run)",
                       description="Train from a validated YAML config. Override any key with key=value "
                                   "(dotted path, YAML value), e.g. train.epochs=5 model.head.name=per_rank. "
                                   "Running the same command again resumes from the run's last checkpoint.")
    p.add_argument("config", help="YAML config file (see docs/config.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from ..train.loop import train

    result = train(cfg)
    if not result.is_main:  # under torchrun: rank 0 prints the summary, once
        return 0
    from .evaluate_cmd import print_metrics

    if result.metrics:
        print_metrics(result.metrics, title=f"validation (best epoch {result.metrics.get('epoch')})")
    print(f"run folder: {result.run_dir}\nbundle:     {result.bundle_dir}")
    return 0
