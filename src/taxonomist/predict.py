"""Turn a bundle's probabilities into prediction rows and write them (CSV or JSON).

One row per image: the chosen node, its rank/depth, its probability (the summed
probability of its subtree), the full lineage (also one column per rank), the
top-k labels with scores, and how the node was chosen (``label``,
``backoff_to_genus``, ``crm``, ...). Higher-rank scores are sums of the scores
below them, the convention pybioclip and iNaturalist users know.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .decide import decide
from .utils.io import atomic_write_text


def prediction_rows(taxonomy, table, label_probs: np.ndarray, *, method: str = "threshold",
                    top_k: int = 5, **decision_options: Any) -> list[dict[str, Any]]:
    dec = decide(taxonomy, label_probs, method=method, **decision_options)
    k = min(top_k, taxonomy.n_labels)
    top = np.argsort(-label_probs, axis=1, kind="stable")[:, :k]
    levels = taxonomy.level_names()
    view = taxonomy.rank_view()
    df = table.df
    rows = []
    for i in range(len(label_probs)):
        node = int(dec.node[i])
        row: dict[str, Any] = {"image": str(df["path"].iloc[i])}
        if "box_x" in df.columns and not np.isnan(df["box_x"].iloc[i]):
            row["box"] = [float(df[c].iloc[i]) for c in ("box_x", "box_y", "box_w", "box_h")]
        row.update({
            "prediction": str(taxonomy.names[node]),
            "prediction_id": str(taxonomy.keys[node]),
            "rank": str(taxonomy.ranks[node]) or None,
            "depth": int(taxonomy.depth[node]),
            "probability": round(float(dec.prob[i]), 6),
            "how": dec.how[i],
            "lineage": taxonomy.lineage(node, sep=None),
        })
        for j, lv in enumerate(levels):
            a = int(view[node, j])
            row[lv] = str(taxonomy.names[a]) if a >= 0 else ""
        row["top_k"] = [{"name": str(taxonomy.names[taxonomy.label_ids[t]]), "score": round(float(label_probs[i, t]), 6)}
                        for t in top[i]]
        truth = int(df["node"].iloc[i]) if "node" in df.columns else -1
        if truth >= 0:
            row["truth"] = str(taxonomy.names[truth])
        rows.append(row)
    return rows


def write_predictions(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """CSV (flat: lineage joined with ' > ', top-k as name/score column pairs) or JSON, by extension."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if k not in ("top_k", "lineage", "box")}
        if "box" in r:
            f["box"] = " ".join(f"{v:g}" for v in r["box"])
        f["lineage"] = " > ".join(r["lineage"])
        for j, t in enumerate(r["top_k"], 1):
            f[f"top{j}_name"] = t["name"]
            f[f"top{j}_score"] = t["score"]
        flat.append(f)
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    w.writeheader()
    w.writerows(flat)
    return atomic_write_text(path, buf.getvalue())
