"""`taxonomist report RUN_OR_METRICS [--out report.html] [--group-rank R]`

Writes the self-contained HTML report of an evaluation folder (see
:mod:`taxonomist.report`). The argument is an evaluation folder, a metrics
file in one (``<eval>/metrics.json``, or the ``--out`` file of ``taxonomist
evaluate``: its values are shown), or a bundle or run folder, whose
evaluation is where ``evaluate`` writes it (``<bundle>/eval``,
``<run>/bundle/eval``); when there is none it evaluates the bundle first, on
``--data`` or on the validation data named in the run's config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .evaluate_cmd import add_runtime_args, evaluate_to_dir, resolve_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML report of an evaluation (or of a run: evaluates it first)",
                       description="Write a self-contained HTML report (figures and image thumbnails embedded) of an "
                                   "evaluation folder written by `taxonomist evaluate`, or of a bundle/run folder "
                                   "(its eval/ folder; evaluated on --data or the run's validation data if missing).")
    p.add_argument("path", help="run folder, bundle folder, evaluation folder, or a metrics.json written by "
                                "`taxonomist evaluate` (its evaluation folder is used)")
    p.add_argument("--out", default=None, help="output HTML file (default: <eval folder>/report.html)")
    p.add_argument("--group-rank", default=None,
                   help="rank/level of the confusion matrix (default: the deepest with <= 30 groups)")
    p.add_argument("--max-groups", type=int, default=30, help="groups shown in the confusion matrix (default 30)")
    p.add_argument("--n-worst", type=int, default=24, help="mistakes shown in the gallery (default 24)")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--data", default=None,
                   help="labelled data to evaluate on when the folder has no evaluation yet "
                        "(default: the run's validation data)")
    p.add_argument("--image-root", default=None, help="folder that relative image paths of --data start from")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    add_runtime_args(p)
    p.set_defaults(func=run)


def validation_data_of(bundle_dir: Path) -> str | None:
    """The validation data source recorded in a bundle's (or its run's) config.yaml, if any."""
    import yaml

    for cfg in (bundle_dir / "config.yaml", bundle_dir.parent / "config.yaml"):
        if cfg.is_file():
            data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
            val = data.get("val")
            if isinstance(val, str) and val:
                return val
    return None


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, DataError
    from ..report import find_eval_dir, load_eval_dir, write_report
    from ..report.evaldir import read_metrics_file

    if args.max_groups < 2:
        raise ConfigError(f"--max-groups must be >= 2, got {args.max_groups}")
    eval_dir = find_eval_dir(args.path)
    if eval_dir is None:
        from ..bundle import load_bundle

        bundle_dir = resolve_bundle(args.path)
        data = args.data or validation_data_of(bundle_dir)
        if not data:
            raise DataError(f"{args.path} has no evaluation and its config names no validation data; pass --data "
                            "(labelled images) or run `taxonomist evaluate` first")
        if not Path(data).exists():
            raise DataError(f"{args.path}: the validation data {data} recorded in its config is not there; "
                            "pass --data")
        print(f"no evaluation in {args.path}: evaluating {bundle_dir} on {data}")
        bundle = load_bundle(bundle_dir, device=args.device)
        evaluate_to_dir(bundle, data, bundle.path / "eval" / "metrics.json", args, report=False)
        eval_dir = bundle.path / "eval"
    source = eval_dir
    given = Path(args.path)
    if given.is_file() and given.suffix.lower() == ".json":   # a metrics file: show its values
        metrics = read_metrics_file(given)
        source = load_eval_dir(eval_dir)
        source.metrics = metrics
        print(f"metrics from {given}; probabilities and samples from the evaluation folder {eval_dir}")
    out = write_report(source, args.out, group_rank=args.group_rank, max_groups=args.max_groups,
                       n_worst=args.n_worst, title=args.title)
    print(f"report written to {out}")
    return 0
