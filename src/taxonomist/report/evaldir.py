"""The evaluation folder that `taxonomist evaluate` writes and `taxonomist report` reads.

::

    eval/
      metrics.json      every metric (compute_metrics), the file scripts read
      predictions.npz   label_probs [N, n_labels] float32 (columns in taxonomy.label_ids order),
                        truth [N] node ids (-1 unknown), label_ids [n_labels], taxonomy_fingerprint
      samples.csv       the evaluated SampleTable (image paths, crop boxes, labels, node ids)
      taxonomy.json     the taxonomy the node ids refer to (a copy: the folder stands on its own)
      eval.json         where it came from: bundle, data, ranks, calibration, default threshold, run folder
      report.html       the human-readable report (taxonomist.report)

Everything is checked on reading: the taxonomy fingerprint of ``predictions.npz``
and ``eval.json`` must match ``taxonomy.json``, and the arrays must agree in
length, so a report never mixes two evaluations.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..utils.io import atomic_write, atomic_write_json

EVAL_FORMAT = "taxonomist-eval"
EVAL_VERSION = 1
FILES = {"metrics": "metrics.json", "predictions": "predictions.npz", "samples": "samples.csv",
         "taxonomy": "taxonomy.json", "meta": "eval.json", "report": "report.html"}


@dataclass
class EvalRecord:
    """One evaluation, loaded: the taxonomy, probabilities, truths, samples, metrics and provenance.

    ``samples`` is None when the folder has no samples.csv (then the report has no
    image gallery); ``history`` holds the training run's metrics.csv when found.
    """

    path: Path
    taxonomy: Any
    label_probs: np.ndarray
    truth: np.ndarray
    metrics: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    samples: Any = None
    history: Any = None

    @property
    def ranks(self) -> list[str] | None:
        r = self.meta.get("ranks")
        return list(r) if r else None

    @property
    def run_dir(self) -> Path | None:
        r = self.meta.get("run_dir")
        return Path(r) if r else None


def save_eval_dir(out_dir: str | Path, *, taxonomy: Any, label_probs: np.ndarray, truth: np.ndarray,
                  metrics: dict[str, Any], samples: Any = None, meta: dict[str, Any] | None = None,
                  metrics_path: str | Path | None = None) -> Path:
    """Write an evaluation folder (each file atomically; eval.json last). Returns the folder.

    ``metrics_path`` overrides where metrics.json goes (default: inside ``out_dir``).
    """
    from ..taxonomy import save as save_taxonomy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(label_probs)
    truth = np.asarray(truth, dtype=np.int64)
    if probs.ndim != 2 or probs.shape != (len(truth), taxonomy.n_labels):
        raise DataError(f"label_probs has shape {probs.shape}; expected ({len(truth)}, {taxonomy.n_labels})")
    if samples is not None and len(samples) != len(truth):
        raise DataError(f"the sample table has {len(samples)} rows but there are {len(truth)} truths")
    if metrics_path and Path(metrics_path).parent.resolve() == out.resolve() \
            and Path(metrics_path).name != FILES["metrics"] and Path(metrics_path).name in FILES.values():
        raise DataError(f"{metrics_path}: the evaluation folder writes its own {Path(metrics_path).name} there; "
                        f"name the metrics file something else (e.g. {FILES['metrics']})")
    atomic_write_json(Path(metrics_path) if metrics_path else out / FILES["metrics"], metrics)

    def write_npz(fh: Any) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, label_probs=probs.astype(np.float32), truth=truth,
                            label_ids=np.asarray(taxonomy.label_ids, dtype=np.int64),
                            taxonomy_fingerprint=np.array(taxonomy.fingerprint))
        fh.write(buf.getvalue())

    atomic_write(out / FILES["predictions"], write_npz)
    if samples is not None:
        samples.to_csv(out / FILES["samples"])
    save_taxonomy(taxonomy, out / FILES["taxonomy"])
    info = {"format": EVAL_FORMAT, "version": EVAL_VERSION, "n_samples": int(len(truth)),
            "taxonomy_fingerprint": taxonomy.fingerprint,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {})}
    if metrics_path:
        info["metrics_path"] = str(Path(metrics_path).resolve())
    atomic_write_json(out / FILES["meta"], info)
    return out


def is_eval_dir(path: Path) -> bool:
    return (path / FILES["predictions"]).is_file() and (path / FILES["taxonomy"]).is_file()


def find_eval_dir(path: str | Path) -> Path | None:
    """The evaluation folder for ``path``: the folder itself, ``<bundle>/eval``, ``<run>/bundle/eval``
    (where ``taxonomist evaluate`` writes by default), or, for a file (a metrics.json, or any file of
    an evaluation folder), the folder holding it.

    Returns None when ``path`` is a bundle or run folder without an evaluation
    (the caller may run one); raises :class:`DataError` when it is none of these.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        if is_eval_dir(p.parent):
            return p.parent
        raise DataError(f"{p} is a file, but its folder {p.parent} is not an evaluation folder (no "
                        f"{FILES['predictions']} and {FILES['taxonomy']} beside it): a report needs the "
                        "probabilities, not only the metrics. Pass the metrics.json that `taxonomist evaluate` "
                        "wrote (it keeps everything the report needs beside it), or run `taxonomist evaluate "
                        "BUNDLE --data DATA` first")
    for cand in (p, p / "eval", p / "bundle" / "eval"):
        if is_eval_dir(cand):
            return cand
    if (p / "bundle.json").is_file() or (p / "bundle" / "bundle.json").is_file():
        return None
    raise DataError(f"{p} is neither an evaluation folder (with {FILES['predictions']} and {FILES['taxonomy']}), "
                    "nor a bundle or run folder. Run `taxonomist evaluate BUNDLE --data DATA` first: it writes "
                    "<bundle>/eval/ with everything the report needs")


def read_metrics_file(path: str | Path) -> dict[str, Any]:
    """A metrics JSON file (a flat object, as compute_metrics writes), checked."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: cannot read it as a metrics JSON file ({exc})") from None
    if not isinstance(data, dict) or "n_samples" not in data:
        raise DataError(f"{p} is not a metrics file (a JSON object with 'n_samples', as `taxonomist evaluate` "
                        "writes); pass the evaluation folder or its metrics.json")
    return data


def load_eval_dir(path: str | Path) -> EvalRecord:
    """Read an evaluation folder (see the module docstring), checking that its files agree."""
    from ..data import SampleTable
    from ..taxonomy import load as load_taxonomy

    p = Path(path)
    if not is_eval_dir(p):
        raise DataError(f"{p}: not an evaluation folder ({FILES['predictions']} or {FILES['taxonomy']} missing)")
    tax = load_taxonomy(p / FILES["taxonomy"])
    meta: dict[str, Any] = {}
    if (p / FILES["meta"]).is_file():
        meta = json.loads((p / FILES["meta"]).read_text())
        if meta.get("format") != EVAL_FORMAT or int(meta.get("version", 0)) > EVAL_VERSION:
            raise DataError(f"{p / FILES['meta']}: unsupported evaluation format {meta.get('format')!r} "
                            f"v{meta.get('version')}; this taxonomist reads {EVAL_FORMAT} v{EVAL_VERSION}")
    with np.load(p / FILES["predictions"], allow_pickle=False) as z:
        missing = [k for k in ("label_probs", "truth") if k not in z.files]
        if missing:
            raise DataError(f"{p / FILES['predictions']}: missing array(s) {missing}")
        probs = z["label_probs"].astype(np.float64)
        truth = z["truth"].astype(np.int64)
        fp = str(z["taxonomy_fingerprint"]) if "taxonomy_fingerprint" in z.files else None
        label_ids = z["label_ids"] if "label_ids" in z.files else None
    for where, value in ((FILES["predictions"], fp), (FILES["meta"], meta.get("taxonomy_fingerprint"))):
        if value is not None and value != tax.fingerprint:
            raise DataError(f"{p / where} was made with taxonomy {value}, but {FILES['taxonomy']} is "
                            f"{tax.fingerprint}: the folder mixes two evaluations; run `taxonomist evaluate` again")
    if label_ids is not None and not np.array_equal(label_ids, tax.label_ids):
        raise DataError(f"{p / FILES['predictions']}: label_ids do not match the taxonomy's label nodes")
    if probs.shape != (len(truth), tax.n_labels):
        raise DataError(f"{p / FILES['predictions']}: label_probs has shape {probs.shape}; expected "
                        f"({len(truth)}, {tax.n_labels})")
    metrics_file = Path(meta.get("metrics_path") or p / FILES["metrics"])
    if not metrics_file.is_file():
        metrics_file = p / FILES["metrics"]
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    samples = None
    if (p / FILES["samples"]).is_file():
        samples = SampleTable.from_csv(p / FILES["samples"])
        if len(samples) != len(truth):
            raise DataError(f"{p / FILES['samples']} has {len(samples)} rows but {FILES['predictions']} "
                            f"has {len(truth)}; run `taxonomist evaluate` again")
    rec = EvalRecord(p, tax, probs, truth, metrics, meta, samples)
    rec.history = load_history(rec.run_dir)
    return rec


def load_history(run_dir: Path | None) -> Any:
    """The training run's per-epoch metrics.csv as a DataFrame (None when absent or unreadable)."""
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return None
    import pandas as pd

    try:
        df = pd.read_csv(run_dir / "metrics.csv")
    except (ValueError, pd.errors.ParserError):
        return None
    return df if "epoch" in df.columns and len(df) else None


def run_dir_of(bundle_dir: Path) -> Path | None:
    """The training run folder a bundle came from (``<run>/bundle``), if it is still there."""
    parent = bundle_dir.resolve().parent
    if bundle_dir.resolve().name == "bundle" and (parent / "config.yaml").is_file():
        return parent
    return None
