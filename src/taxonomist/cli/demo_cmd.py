"""`taxonomist demo`: train, evaluate and predict on the bundled real plankton sample."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the bundled NDSB plankton sample (a few minutes on a CPU)",
                       description="Train a hierarchical plankton classifier on the bundled real NDSB sample, "
                                   "evaluate it with hierarchical metrics and predict with back-off to higher ranks.")
    p.add_argument("--output-dir", default="runs", help="where the run folder 'demo' goes (default: runs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    p.set_defaults(func=run)


def demo_config(output_dir: str, overrides: list[str]):
    from importlib import resources

    from ..data.demo import demo_root
    from ..train.config import load_config

    root = demo_root()
    base = {"taxonomy": {"path": str(root / "class_paths.tsv")},
            "data": {"train": str(root / "train"), "val": str(root / "val")}, "output_dir": output_dir}
    cfg_path = resources.files("taxonomist") / "configs" / "demo.yaml"
    with resources.as_file(cfg_path) as path:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    for section, values in base.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    from ..train.config import apply_overrides

    return load_config(None, None, base=apply_overrides(data, overrides))


def run(args: argparse.Namespace) -> int:
    from ..data import load_samples
    from ..predict import prediction_rows, write_predictions
    from ..train.loop import train
    from .evaluate_cmd import print_metrics

    t0 = time.time()
    cfg = demo_config(args.output_dir, args.overrides)
    print("taxonomist demo: NDSB plankton (bundled real sample), official hierarchy\n")
    result = train(cfg)
    print_metrics(result.metrics, title=f"validation metrics (best epoch {result.metrics.get('epoch')})")

    from ..bundle import load_bundle

    bundle = load_bundle(result.bundle_dir)
    val = load_samples(cfg.data.val, bundle.taxonomy)
    from ..train.loop import default_cache_dir
    from .evaluate_cmd import evaluate_to_dir

    # the evaluation folder and the HTML report (per-rank accuracy, severity, calibration, risk-coverage, ...)
    eval_args = argparse.Namespace(cache_dir=str(default_cache_dir(cfg)), batch_size=64, num_workers=0,
                                   no_progress=True)
    evaluate_to_dir(bundle, cfg.data.val, result.run_dir / "eval" / "metrics.json", eval_args)

    probs = bundle.label_probs(val, cache_dir=default_cache_dir(cfg), progress=False)
    rows = prediction_rows(bundle.taxonomy, val, probs, method="threshold", threshold=cfg.predict.threshold)
    out = write_predictions(rows, result.run_dir / "predictions.csv")
    backed = [r for r in rows if r["how"] not in ("label", "leaf")]
    print(f"\npredictions with threshold {cfg.predict.threshold}: {len(rows)} images, "
          f"{len(rows) - len(backed)} answered at a label, {len(backed)} backed off to a higher rank")
    shown = backed[:4] + [r for r in rows if r["how"] in ("label", "leaf")][:4]
    for r in shown:
        print(f"  {Path(r['image']).name:>12}  truth {r.get('truth', '?'):<36} -> {r['prediction']:<30} "
              f"p={r['probability']:.2f} ({r['how']})")
    print(f"\nall predictions: {out}\nrun folder: {result.run_dir} (metrics.csv, tensorboard/, checkpoints/, bundle/, "
          f"eval/report.html)"
          f"\ndone in {time.time() - t0:.0f}s")
    return 0
