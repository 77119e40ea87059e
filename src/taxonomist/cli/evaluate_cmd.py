"""`taxonomist evaluate BUNDLE --data DATA`: metrics.json, the evaluation folder and report.html.

With ``--novel`` the data are images of taxa the model never saw (leaves held
out of training): each decision rule is scored on how it places them
(``taxonomist.metrics.novel``), written to novel.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# the keys printed in the summary table, in order (all keys go to metrics.json)
SUMMARY_KEYS = ["n_samples", "top1_error", "top5_error", "mistake_severity", "hdist@1", "hdist@5",
                "mean_path_distance", "mean_rank_distance", "hp", "hr", "hf", "ece", "haurc"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a bundle on labelled data; writes metrics.json and report.html",
                       description="Evaluate a trained bundle on labelled data (image folder, CSV or COCO). Writes "
                                   "an evaluation folder (default <bundle>/eval/): metrics.json, predictions.npz, "
                                   "samples.csv, taxonomy.json, eval.json and the HTML report report.html.")
    p.add_argument("bundle", help="bundle folder (a run's bundle/ sub-folder, or the run folder)")
    p.add_argument("--data", required=True, help="labelled data: image folder, CSV/TSV table or COCO JSON")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument("--out", default=None,
                   help="where metrics.json goes; the other files go beside it (default: <bundle>/eval/metrics.json)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks for per-rank metrics")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--group-rank", default=None,
                   help="rank/level of the report's confusion matrix (default: the deepest with <= 30 groups)")
    p.add_argument("--novel", action="store_true",
                   help="the data are images of leaves the model never saw: score how each decision rule places "
                        "them (correct ancestor, depth) and write novel.json instead of metrics.json")
    p.add_argument("--full-taxonomy", default=None, metavar="TREE",
                   help="with --novel: the complete tree holding the held-out leaves, when the bundle's tree "
                        "lacks them (nodes are matched by key)")
    p.add_argument("--save-probs", action="store_true", help=argparse.SUPPRESS)  # always saved now
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


def evaluate_to_dir(bundle, data: str | Path, metrics_path: Path, args: argparse.Namespace,
                    ranks: list[str] | None = None, report: bool = True, group_rank: str | None = None
                    ) -> dict[str, Any]:
    """Evaluate ``bundle`` on ``data`` and write the evaluation folder (and report) beside ``metrics_path``."""
    from ..data import load_samples
    from ..errors import DataError
    from ..metrics import compute_metrics
    from ..report import save_eval_dir, write_report
    from ..report.evaldir import run_dir_of

    table = load_samples(data, bundle.taxonomy, image_root=getattr(args, "image_root", None),
                         on_error=getattr(args, "on_error", "raise"))
    nodes = table.nodes()
    if (nodes < 0).all():
        raise DataError(f"{data}: no labelled samples to evaluate (use `taxonomist predict` for unlabelled images)")
    probs = bundle.label_probs(table, cache_dir=cache_dir_for(args), batch_size=args.batch_size,
                               num_workers=args.num_workers, progress=not args.no_progress)
    ranks = ranks or bundle.ranks
    metrics = compute_metrics(bundle.taxonomy, probs, nodes, ranks=ranks)
    run_dir = run_dir_of(bundle.path)
    meta = {"bundle": str(bundle.path.resolve()), "data": str(Path(data).resolve()), "ranks": ranks,
            "calibration": bundle.calibration, "threshold": bundle.meta.get("threshold", 0.8),
            "run_dir": str(run_dir) if run_dir else None}
    eval_dir = metrics_path.parent
    save_eval_dir(eval_dir, taxonomy=bundle.taxonomy, label_probs=probs, truth=nodes, metrics=metrics,
                  samples=table, meta=meta,
                  metrics_path=None if metrics_path.name == "metrics.json" else metrics_path)
    if report:
        out = write_report(eval_dir, group_rank=group_rank)
        print(f"report written to {out}")
    return metrics


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_bundle

    bundle = load_bundle(resolve_bundle(args.bundle), device=args.device)
    if args.full_taxonomy and not args.novel:
        from ..errors import ConfigError

        raise ConfigError("--full-taxonomy only applies with --novel")
    if args.novel:
        return run_novel(args, bundle)
    ranks = args.ranks.split(",") if args.ranks else None
    out = Path(args.out) if args.out else bundle.path / "eval" / "metrics.json"
    metrics = evaluate_to_dir(bundle, args.data, out, args, ranks=ranks, report=not args.no_report,
                              group_rank=args.group_rank)
    print_metrics(metrics, title=f"evaluation of {bundle.path} on {args.data}")
    print(f"\nmetrics written to {out} (evaluation folder: {out.parent})")
    return 0


# ------------------------------------------------------------------ novel taxa
def run_novel(args: argparse.Namespace, bundle) -> int:
    """Score how the bundle places images of leaves it was not trained on (see metrics/novel.py)."""
    import numpy as np
    import pandas as pd

    from ..data import load_samples
    from ..decide import decide
    from ..errors import DataError
    from ..metrics.novel import novel_metrics
    from ..report.analysis import decision_options
    from ..taxonomy import load as load_taxonomy
    from ..utils.io import atomic_write_json

    tax = bundle.taxonomy
    full = load_taxonomy(args.full_taxonomy) if args.full_taxonomy else tax
    table = load_samples(args.data, full, image_root=args.image_root, on_error=args.on_error)
    leaf = table.nodes()
    if (leaf < 0).any():
        raise DataError(f"{args.data}: {int((leaf < 0).sum())} sample(s) have no label; --novel needs every image "
                        "labelled with the held-out leaf it shows")
    if full is tax:
        to_full = np.arange(tax.n_nodes)
    else:
        to_full = pd.Index(full.keys).get_indexer(tax.keys)
        if (to_full < 0).any():
            missing = tax.keys[to_full < 0][:5].tolist()
            raise DataError(f"{args.full_taxonomy}: {int((to_full < 0).sum())} node(s) of the bundle's taxonomy are "
                            f"not in it (by key), e.g. {missing}; the full tree must contain the training tree")
    train_labels = to_full[tax.label_ids]
    seen = np.isin(leaf, train_labels)
    if seen.any():
        names = sorted({str(full.names[v]) for v in leaf[seen]})[:5]
        raise DataError(f"{args.data}: {int(seen.sum())} image(s) show labels the model was trained on "
                        f"(e.g. {names}); --novel scores images of taxa the model never saw")
    probs = bundle.label_probs(table, cache_dir=cache_dir_for(args), batch_size=args.batch_size,
                               num_workers=args.num_workers, progress=not args.no_progress)
    options = decision_options(tax, bundle.calibration, float(bundle.meta.get("threshold", 0.8)))
    decisions = {}
    for name, opt in options.items():
        opt = dict(opt)
        decisions[name] = to_full[decide(tax, probs, opt.pop("method"), **opt).node]
    result = novel_metrics(full, decisions, leaf, train_labels)
    result["settings"] = {name: {k: v for k, v in opt.items()} for name, opt in options.items()}
    result["n_held_out_leaves"] = int(len(np.unique(leaf)))
    out = Path(args.out) if args.out else bundle.path / "eval" / "novel.json"
    atomic_write_json(out, result)
    print(f"\nnovel taxa: {len(leaf)} images of {result['n_held_out_leaves']} leaves the model never saw")
    print(f"  {'rule':<10} {'correct anc.':>12} {'at best':>8} {'sibling':>8} {'wrong br.':>9} {'depth gap':>9}")
    for name in options:
        g = result.get(f"{name}/mean_depth_gap")
        print(f"  {name:<10} {result[f'{name}/correct_ancestor']:>12.3f} {result[f'{name}/at_best']:>8.3f} "
              f"{result[f'{name}/sibling']:>8.3f} {result[f'{name}/wrong_branch']:>9.3f} "
              f"{'–' if g is None else f'{g:.2f}':>9}")
    print(f"\nwritten to {out}")
    return 0
