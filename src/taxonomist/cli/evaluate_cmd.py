"""`taxonomist evaluate BUNDLE --data DATA`"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# the keys printed in the summary table, in order (all keys go to metrics.json)
SUMMARY_KEYS = ["n_samples", "top1_error", "top5_error", "mistake_severity", "hdist@1", "hdist@5",
                "mean_path_distance", "mean_rank_distance", "hp", "hr", "hf", "ece", "haurc"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a bundle on labelled data; writes metrics.json",
                       description="Evaluate a trained bundle on labelled data (image folder, CSV or COCO).")
    p.add_argument("bundle", help="bundle folder (a run's bundle/ sub-folder, or the run folder)")
    p.add_argument("--data", required=True, help="labelled data: image folder, CSV/TSV table or COCO JSON")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument("--out", default=None, help="where metrics.json goes (default: <bundle>/eval/metrics.json)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks for per-rank metrics")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--save-probs", action="store_true", help="also save probabilities (.npz) beside metrics.json")
    add_runtime_args(p)
    p.set_defaults(func=run)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature cache (frozen backbones); default: the training default")
    p.add_argument("--no-progress", action="store_true")


def resolve_bundle(path: str) -> Path:
    p = Path(path)
    return p / "bundle" if (p / "bundle" / "bundle.json").exists() else p


def cache_dir_for(args: argparse.Namespace) -> Path:
    import os

    if args.cache_dir:
        return Path(args.cache_dir)
    env = os.environ.get("TAXONOMIST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "taxonomist" / "features"


def print_metrics(metrics: dict[str, Any], title: str = "metrics") -> None:
    print(f"\n{title}")
    keys = [k for k in SUMMARY_KEYS if k in metrics] + sorted(k for k in metrics if k.endswith("/top1"))
    width = max(len(k) for k in keys) if keys else 10
    for k in keys:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..bundle import load_bundle
    from ..data import load_samples
    from ..metrics import compute_metrics
    from ..utils.io import atomic_write_json

    bundle = load_bundle(resolve_bundle(args.bundle), device=args.device)
    table = load_samples(args.data, bundle.taxonomy, image_root=args.image_root, on_error=args.on_error)
    nodes = table.nodes()
    if (nodes < 0).all():
        from ..errors import DataError

        raise DataError(f"{args.data}: no labelled samples to evaluate (use `taxonomist predict` for unlabelled images)")
    probs = bundle.label_probs(table, cache_dir=cache_dir_for(args), batch_size=args.batch_size,
                               num_workers=args.num_workers, progress=not args.no_progress)
    ranks = args.ranks.split(",") if args.ranks else bundle.ranks
    metrics = compute_metrics(bundle.taxonomy, probs, nodes, ranks=ranks)
    out = Path(args.out) if args.out else bundle.path / "eval" / "metrics.json"
    atomic_write_json(out, metrics)
    if args.save_probs:
        np.savez_compressed(out.with_suffix(".npz"), label_probs=probs, truth=nodes,
                            label_ids=bundle.taxonomy.label_ids)
    print_metrics(metrics, title=f"evaluation of {bundle.path} on {args.data}")
    print(f"\nmetrics written to {out}")
    return 0
