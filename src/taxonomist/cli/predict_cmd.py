"""`taxonomist predict BUNDLE IMAGES_OR_DIR_OR_CSV [--threshold 0.8] [--output preds.csv]`"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluate_cmd import add_runtime_args, cache_dir_for, resolve_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict images; backs off to a higher rank when unsure",
                       description="Predict one node per image. With --decision threshold (default) the answer "
                                   "backs off up the tree to the deepest node whose summed probability reaches "
                                   "the threshold.")
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="+", help="image files, a folder of images (sub-folders = labels) or a CSV/COCO table")
    p.add_argument("--decision", choices=["argmax", "threshold", "crm", "darts"], default="threshold")
    p.add_argument("--threshold", type=float, default=None,
                   help="back-off threshold (default: the bundle's calibrated or training value)")
    p.add_argument("--rank-thresholds", default=None,
                   help="per-rank thresholds as JSON, e.g. '{\"species\":0.55,\"genus\":0.6}'")
    p.add_argument("--threshold-default", type=float, default=None, metavar="TAU",
                   help="threshold for the ranks that --rank-thresholds (or the calibrated per-rank thresholds) "
                        "leave out or set to null; without it such ranks are never answered")
    p.add_argument("--crm-metric", choices=["path", "lca_height", "rank_steps"], default="path",
                   help="distance whose expected value CRM minimises (rank_steps: the FathomNet 2025 score)")
    p.add_argument("--crm-ranks", default=None,
                   help="comma-separated ranks counted by --crm-metric rank_steps (default: every rank)")
    p.add_argument("--crm-candidates", choices=["all", "labels"], default="all",
                   help="answers CRM may give: every node of the tree (default) or the label nodes only")
    p.add_argument("--lam", type=float, default=None,
                   help="DARTS lambda for --decision darts (default: the bundle's calibrated value, else 0)")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the bundle's calibration (temperature, thresholds, DARTS lambda) from "
                        "`taxonomist calibrate`")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--output", "-o", default=None, help="preds.csv, preds.tsv or preds.json (default: print)")
    add_runtime_args(p)
    p.set_defaults(func=run)


def decision_options(args: argparse.Namespace, bundle) -> dict:
    """Options of the chosen decision rule: command-line values first, then the bundle's calibration
    (``taxonomist calibrate``), then the training default."""
    from ..errors import ConfigError

    if getattr(args, "threshold_default", None) is not None and args.decision != "threshold":
        raise ConfigError("--threshold-default only applies with --decision threshold")
    if (getattr(args, "crm_ranks", None) or getattr(args, "crm_candidates", "all") != "all") \
            and args.decision != "crm":
        raise ConfigError("--crm-ranks and --crm-candidates only apply with --decision crm")
    if args.decision == "threshold":
        extra = {"default": args.threshold_default} if getattr(args, "threshold_default", None) is not None else {}
        if args.rank_thresholds:
            try:
                thr = json.loads(args.rank_thresholds)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--rank-thresholds is not valid JSON ({exc}); write e.g. "
                                  "'{\"species\": 0.55, \"genus\": 0.6}'") from None
            if not isinstance(thr, dict):
                raise ConfigError(f"--rank-thresholds must be a JSON object of rank: threshold, got {thr!r}; "
                                  "for one threshold use --threshold")
            return {"threshold": thr, **extra}
        cal = bundle.calibration.get("thresholds")
        if args.threshold is None and cal is not None:
            return {"threshold": cal, **extra}
        return {"threshold": args.threshold if args.threshold is not None else bundle.meta.get("threshold", 0.8),
                **extra}
    if args.decision == "crm":
        out = {"metric": args.crm_metric, "candidates": getattr(args, "crm_candidates", "all")}
        if getattr(args, "crm_ranks", None):
            if args.crm_metric != "rank_steps":
                raise ConfigError("--crm-ranks only applies with --crm-metric rank_steps")
            out["ranks"] = [r.strip() for r in args.crm_ranks.split(",") if r.strip()]
        return out
    if args.decision == "darts":
        lam = args.lam if getattr(args, "lam", None) is not None else bundle.calibration.get("darts_lambda")
        return {"lam": float(lam or 0.0)}
    return {}


def add_attribute_columns(rows: list[dict], classes: dict[str, list[str]], probs: dict) -> None:
    """``attr_<name>`` (the most probable class) and ``attr_<name>_score`` for each attribute head."""
    for name, values in classes.items():
        best = probs[name].argmax(axis=1)
        score = probs[name].max(axis=1)
        for r, b, p in zip(rows, best, score):
            r[f"attr_{name}"] = values[int(b)]
            r[f"attr_{name}_score"] = float(p)


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_bundle
    from ..data import load_images
    from ..predict import prediction_rows, write_predictions

    bundle = load_bundle(resolve_bundle(args.bundle), device=args.device)
    if args.no_calibration:
        bundle.calibration = {}   # in memory only: bundle.json keeps it
    table = load_images(args.inputs, bundle.taxonomy)
    report = getattr(table, "report", None)
    if report is not None and (report.notes or not report.ok):  # ignored files, sub-folders, unknown labels
        print(report, file=sys.stderr)
    probs, attr_probs = bundle.predict(table, cache_dir=cache_dir_for(args), batch_size=args.batch_size,
                                       num_workers=args.num_workers, progress=not args.no_progress)
    rows = prediction_rows(bundle.taxonomy, table, probs, method=args.decision, top_k=args.top_k,
                           **decision_options(args, bundle))
    add_attribute_columns(rows, bundle.attributes, attr_probs)
    if args.output:
        out = write_predictions(rows, args.output)
        print(f"{len(rows)} predictions written to {out}")
    else:
        for r in rows:
            print(f"{Path(r['image']).name}\t{r['prediction']}\t{r['probability']:.3f}\t{r['how']}")
    return 0
