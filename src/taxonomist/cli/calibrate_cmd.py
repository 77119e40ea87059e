"""`taxonomist calibrate BUNDLE --data VAL [--target-accuracy 0.95] [--per-rank]`

Fits, on labelled validation data, a softmax temperature (Guo et al., ICML 2017)
and back-off thresholds that reach a target hierarchical accuracy (overall, or
per rank with ``--per-rank``), plus the DARTS lambda for the same target, and
stores them in the bundle (bundle.json "calibration"). `predict` and `evaluate`
then use them by default. See docs/decisions.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import warnings
from pathlib import Path
from typing import Any

from .evaluate_cmd import add_runtime_args, cache_dir_for, resolve_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit temperature and back-off thresholds on validation data; saved in "
                                         "the bundle",
                       description="Fit a softmax temperature and back-off thresholds (and the DARTS lambda) on "
                                   "labelled validation data so that the back-off answers reach a target accuracy, "
                                   "and store them in the bundle; `taxonomist predict` then uses them by default. "
                                   "Use data the model was not trained on.")
    p.add_argument("bundle", help="bundle folder (or the run folder)")
    p.add_argument("--data", required=True, help="labelled validation data: image folder, CSV/TSV table or COCO JSON")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--target-accuracy", type=float, default=0.95,
                   help="hierarchical accuracy the back-off answers must reach on this data (default 0.95)")
    p.add_argument("--per-rank", action="store_true",
                   help="one threshold per rank (per depth level for an unranked tree) instead of one overall")
    p.add_argument("--no-temperature", action="store_true", help="keep temperature 1 (fit thresholds only)")
    p.add_argument("--dry-run", action="store_true", help="print the fitted values without saving them")
    add_runtime_args(p)
    p.set_defaults(func=run)


def fit_calibration(tax, raw_probs, truth, target_accuracy: float, per_rank: bool, temperature: bool = True
                    ) -> dict[str, Any]:
    """The calibration dictionary for bundle.json from raw label probabilities and truths (node ids).

    Keys: ``temperature``, ``thresholds``, ``per_rank``, ``target_accuracy``,
    ``darts_lambda`` (None when no lambda reaches the target), ``n_samples`` (known
    truths used), ``ece_before`` / ``ece_after`` and ``nll_before`` / ``nll_after``
    (top-label ECE and partial-label-aware NLL on this data), ``val_accuracy``,
    ``val_mean_depth`` and ``val_at_label`` of the fitted threshold rule.
    """
    import numpy as np

    from ..decide import decide, fit_darts_lambda, fit_temperature, fit_thresholds
    from ..errors import DataError
    from ..metrics import expected_calibration_error
    from ..metrics._common import known_mask

    truth = np.asarray(truth, dtype=np.int64)
    keep = known_mask(truth)
    if not keep.any():
        raise DataError("calibration needs samples with a known label (node id > 0)")
    p, t = raw_probs[keep], truth[keep]
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    temp = fit_temperature(tax, logp, t) if temperature else 1.0
    pt = _softmax(logp / temp)
    out: dict[str, Any] = {"temperature": float(temp)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["thresholds"] = fit_thresholds(tax, pt, t, target_accuracy=target_accuracy, per_rank=per_rank)
    out["warnings"] = [str(w.message) for w in caught]
    out["per_rank"] = bool(per_rank)
    out["target_accuracy"] = float(target_accuracy)
    try:
        out["darts_lambda"] = fit_darts_lambda(tax, pt, t, target_accuracy=target_accuracy)
    except DataError as exc:
        out["darts_lambda"] = None
        out["warnings"].append(f"DARTS: {exc}")
    out["n_samples"] = int(len(t))
    is_lab = tax.is_label[t]
    for tag, q in (("before", p), ("after", pt)):
        top = q.argmax(axis=1)
        conf = q[np.arange(len(q)), top]
        out[f"ece_{tag}"] = float(expected_calibration_error(conf[is_lab], (tax.label_ids[top] == t)[is_lab]))
        out[f"nll_{tag}"] = _nll(tax, q, t)
    dec = decide(tax, pt, "threshold", threshold=out["thresholds"])
    out["val_accuracy"] = float(tax.is_ancestor(dec.node, t).mean())
    out["val_mean_depth"] = float(tax.depth[dec.node].mean())
    out["val_at_label"] = float(tax.is_label[dec.node].mean())
    return out


def _softmax(z):
    import numpy as np

    z = z - np.max(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(tax, probs, truth) -> float:
    """Mean ``-log p(subtree of the truth)`` (a partial truth scores the mass of its subtree)."""
    import numpy as np

    from ..metrics._common import node_prob_chunks

    total = 0.0
    for lo, hi, pn in node_prob_chunks(tax, probs):
        total += float(-np.log(np.maximum(pn[np.arange(hi - lo), truth[lo:hi]], 1e-300)).sum())
    return total / max(len(truth), 1)


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_bundle
    from ..data import load_samples
    from ..errors import ConfigError, DataError

    if not 0.0 < args.target_accuracy <= 1.0:
        raise ConfigError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    bundle = load_bundle(resolve_bundle(args.bundle), device=args.device)
    table = load_samples(args.data, bundle.taxonomy, image_root=args.image_root, on_error=args.on_error)
    nodes = table.nodes()
    if not (nodes > 0).any():
        raise DataError(f"{args.data}: no labelled samples; calibration needs validation data with labels")
    raw = bundle.label_probs(table, cache_dir=cache_dir_for(args), batch_size=args.batch_size,
                             num_workers=args.num_workers, progress=not args.no_progress, calibrated=False)
    cal = fit_calibration(bundle.taxonomy, raw, nodes, args.target_accuracy, args.per_rank,
                          temperature=not args.no_temperature)
    cal["data"] = str(Path(args.data).resolve())
    cal["taxonomy_fingerprint"] = bundle.taxonomy.fingerprint
    cal["fitted_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _print(cal)
    if args.dry_run:
        print("\n--dry-run: nothing saved")
        return 0
    bundle.save_calibration(cal)
    print(f"\ncalibration saved in {bundle.path / 'bundle.json'}; `taxonomist predict` uses it by default "
          "(--no-calibration to ignore it)")
    return 0


def _print(cal: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "never stop here"
        return f"{v:.4f}"

    print(f"\ncalibration on {cal['n_samples']} samples (target accuracy {cal['target_accuracy']:.3f})")
    print(f"  temperature       {cal['temperature']:.4f}")
    print(f"  ECE               {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    print(f"  NLL               {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")
    thr = cal["thresholds"]
    if isinstance(thr, dict):
        print("  thresholds")
        for r, v in thr.items():
            print(f"    {r:<15} {fmt(v)}")
    else:
        print(f"  threshold         {thr:.4f}")
    lam = cal.get("darts_lambda")
    print(f"  DARTS lambda      {'-' if lam is None else f'{lam:.4g}'}")
    print(f"  back-off on this data: accuracy {cal['val_accuracy']:.4f}, mean depth {cal['val_mean_depth']:.2f}, "
          f"{cal['val_at_label']:.1%} answered at a label")
    for w in cal.get("warnings", []):
        print(f"  warning: {w}")
    print("  note: these numbers are measured on the data the values were fitted on; evaluate on other data")
