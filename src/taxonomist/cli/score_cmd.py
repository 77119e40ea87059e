"""`taxonomist score PREDICTIONS --truth TRUTH --taxonomy TREE [--ranks ...] [--out metrics.json]`

Writes ``metrics.json`` beside the predictions file unless ``--out`` says
where (and prints the path). In an evaluation folder written by
``taxonomist evaluate`` (with ``eval.json``) the ``metrics.json`` there is
evaluate's, so the default becomes ``score_metrics.json`` beside it.

Scores saved predictions of any model against truths, on a taxonomy:

* a CSV/TSV of names (a competition submission such as FathomNet 2025's
  ``annotation_id,concept_name``; any rank is a legal answer): the metrics of
  hard predictions (:func:`taxonomist.metrics.hard.hard_metrics`). A name that
  is not in the taxonomy scores the worst value (FathomNet rule);
* an ``.npz`` of probabilities over label nodes (``label_probs``, optional
  ``label_names`` or ``label_ids`` + ``taxonomy_fingerprint`` to align the
  columns, optional ``ids`` to join with the truth, optional ``truth``): every
  metric of :func:`taxonomist.metrics.compute_metrics`.

Truth: a CSV/TSV of sample ids and names (names, keys or ``A > B > C`` lineages).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

ID_COLUMNS = ("annotation_id", "id", "image_id", "image", "path", "file", "filename", "sample", "sample_id")
NAME_COLUMNS = ("concept_name", "name", "label", "prediction", "taxon", "category", "category_name", "class",
                "scientific_name", "truth")
LINEAGE_SEPARATORS = (" > ", ">", ";", "|")
SUMMARY = ("n_samples", "n_scored", "n_unknown_predictions", "accuracy", "exact_accuracy", "top1_error",
           "mean_rank_distance", "mean_path_distance", "mistake_severity", "hdist@1", "hp", "hr", "hf", "coverage",
           "mean_depth", "ece", "haurc")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score saved predictions (names CSV or probabilities .npz) against truths",
                       description="Score predictions of any model on a taxonomy: a CSV of predicted names (e.g. a "
                                   "FathomNet 2025 submission `annotation_id,concept_name`, any rank allowed) or an "
                                   ".npz of label probabilities, against a CSV of ids and true names.")
    p.add_argument("predictions", help="predictions: .csv/.tsv of ids and names, or .npz of label_probs")
    p.add_argument("--truth", default=None, help="CSV/TSV of sample ids and true names (optional for an .npz "
                                                 "that holds `truth` node ids and the taxonomy fingerprint)")
    p.add_argument("--taxonomy", required=True, help="taxonomy file (any supported format)")
    p.add_argument("--taxonomy-format", default=None, help="taxonomy format instead of auto-detection")
    p.add_argument("--taxonomy-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="taxonomy reader option, e.g. on_conflict=split (repeatable; see `taxonomist taxonomy`)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated ranks for per-rank keys and the rank distance (default: all ranks)")
    p.add_argument("--id-column", default=None, help="id column of both tables (default: annotation_id, id, ...)")
    p.add_argument("--name-column", default=None,
                   help="name column of both tables (default: concept_name, name, label, ...)")
    p.add_argument("--missing", choices=["error", "unknown"], default="error",
                   help="truth ids without a prediction: an error (default), or scored as an unknown name")
    p.add_argument("--out", default=None,
                   help="write the metrics here (JSON; default: metrics.json beside PREDICTIONS, or "
                        "score_metrics.json there when the folder is an evaluation folder of `taxonomist evaluate`)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ tables
def read_table(path: str | Path, what: str, id_column: str | None, name_column: str | None):
    """(ids, names) columns of a CSV/TSV as string arrays; names may be empty."""
    import pandas as pd

    from ..errors import DataError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the {what} table: {exc}") from None
    cols = list(df.columns)
    lower = {c.strip().lower(): c for c in cols}

    def pick(given: str | None, choices: tuple[str, ...], kind: str, fallback: int) -> str:
        if given:
            if given not in cols:
                raise DataError(f"{path}: no column {given!r} (columns: {cols})")
            return given
        for c in choices:
            if c in lower:
                return lower[c]
        if len(cols) == 2:
            return cols[fallback]
        raise DataError(f"{path}: cannot tell which column holds the {kind} (columns: {cols}); name it with "
                        f"--{kind}-column")

    idc = pick(id_column, ID_COLUMNS, "id", 0)
    namec = pick(name_column, NAME_COLUMNS, "name", 1)
    if idc == namec:
        raise DataError(f"{path}: the id and name columns are both {idc!r}; set --id-column / --name-column")
    ids = df[idc].str.strip().to_numpy(dtype=object)
    dup = pd.Index(ids).duplicated(keep=False)
    if dup.any():
        shown = sorted(set(ids[dup].tolist()))[:5]
        raise DataError(f"{path}: {int(dup.sum())} rows share an id in column {idc!r} (e.g. {shown}); every "
                        "sample needs one row")
    return ids, df[namec].str.strip().to_numpy(dtype=object)


def _resolve_lineage(tax, text: str) -> int:
    """``A > B > C``: the node C whose ancestors carry the names A and B (in that order)."""
    from ..taxonomy import AmbiguousNameError, UnknownNameError

    sep = next(s for s in LINEAGE_SEPARATORS if s in text)
    parts = [x.strip() for x in text.split(sep) if x.strip()]
    cands = tax.find_all(parts[-1])
    if not cands:               # a key (find accepts keys), else unknown
        try:
            cands = [tax.find(parts[-1])]
        except UnknownNameError as exc:
            raise UnknownNameError(text, exc.suggestions) from None
    fits = []
    for c in cands:
        names = [str(tax.names[a]) for a in tax.ancestors(c)[:-1]]
        it = iter(names)
        if all(any(n == want for n in it) for want in parts[:-1]):   # an ordered sub-sequence
            fits.append(c)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise UnknownNameError(text, [tax.lineage(c) for c in cands[:3]])
    raise AmbiguousNameError(text, [(c, tax.lineage(c), str(tax.ranks[c]), str(tax.keys[c])) for c in fits])


def resolve_names(tax, names: np.ndarray, source: str, unknown: str) -> tuple[np.ndarray, dict[str, int]]:
    """Node id of every name (``""`` -> -1). ``unknown="mark"``: names not in the tree -> -1 and
    returned with their counts; ``"raise"``: a DataError listing them. Ambiguous names always raise,
    listing every candidate lineage."""
    from ..errors import DataError
    from ..taxonomy import AmbiguousNameError, UnknownNameError

    distinct, inverse, counts = np.unique(names.astype(str), return_inverse=True, return_counts=True)
    ids = np.full(len(distinct), -1, dtype=np.int64)
    unknowns: dict[str, int] = {}
    problems: list[str] = []
    for i, name in enumerate(distinct.tolist()):
        if not name:
            continue
        try:
            if tax.find_all(name) or not any(s in name for s in LINEAGE_SEPARATORS):
                ids[i] = tax.find(name)
            else:
                ids[i] = _resolve_lineage(tax, name)
        except AmbiguousNameError as exc:
            problems.append(str(exc))
        except UnknownNameError as exc:
            if unknown == "mark":
                unknowns[name] = int(counts[i])
            else:
                problems.append(f"{exc} ({int(counts[i])} row(s))")
    if problems:
        shown = "\n".join(problems[:10]) + (f"\n... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{source}: {len(problems)} name(s) cannot be resolved in the taxonomy:\n{shown}\n"
                        "Write an ambiguous name as a lineage ('Animalia > Chordata > Name') or use its node key.")
    return ids[inverse], unknowns


def align_truth(pred_ids: np.ndarray, truth_ids: np.ndarray, source: str, missing: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row of each truth id in the predictions (-1: missing), the missing ids, the unused prediction rows."""
    import pandas as pd

    from ..errors import DataError

    pos = pd.Index(pred_ids).get_indexer(truth_ids)
    miss = truth_ids[pos < 0]
    if len(miss) and missing == "error":
        raise DataError(f"{source}: no prediction for {len(miss)} of the {len(truth_ids)} truth ids (e.g. "
                        f"{miss[:5].tolist()}); pass --missing unknown to score them as unknown answers")
    used = np.zeros(len(pred_ids), dtype=bool)
    used[pos[pos >= 0]] = True
    return pos, miss, np.flatnonzero(~used)


# ------------------------------------------------------------------ the two kinds of input
def score_names(tax, args: argparse.Namespace, ranks: list[str] | None) -> dict[str, Any]:
    from ..metrics.hard import hard_metrics, worst_distances

    if not args.truth:
        from ..errors import ConfigError

        raise ConfigError("scoring a table of names needs --truth (a CSV of ids and true names)")
    p_ids, p_names = read_table(args.predictions, "predictions", args.id_column, args.name_column)
    t_ids, t_names = read_table(args.truth, "truth", args.id_column, args.name_column)
    truth, _ = resolve_names(tax, t_names, args.truth, unknown="raise")
    pos, miss, extra = align_truth(p_ids, t_ids, args.predictions, args.missing)
    pred_all, unknown_names = resolve_names(tax, p_names, args.predictions, unknown="mark")
    pred = np.where(pos >= 0, pred_all[np.maximum(pos, 0)], -1)
    m: dict[str, Any] = {"input": "names"}
    m.update(hard_metrics(tax, pred, truth, ranks=ranks, distance_ranks=ranks))
    m["n_missing_predictions"] = int(len(miss))
    m["n_extra_predictions"] = int(len(extra))
    m["unknown_names"] = dict(sorted(unknown_names.items(), key=lambda kv: -kv[1])[:50])
    m["worst_distances"] = worst_distances(tax, ranks)
    if len(extra):
        print(f"note: {len(extra)} prediction row(s) have ids that are not in the truth and are not scored "
              f"(e.g. {p_ids[extra[:3]].tolist()})")
    if unknown_names:
        print(f"note: {sum(unknown_names.values())} prediction(s) name {len(unknown_names)} taxa that are not in the "
              f"taxonomy (scored as the worst answer), e.g. {list(unknown_names)[:3]}")
    return m


def _npz_columns(tax, z, source: str):
    """(taxonomy to score on, column permutation into its label order) for an npz's label columns."""
    from ..errors import DataError

    probs_cols = z["label_probs"].shape[1]
    if "label_ids" in z.files and "label_names" not in z.files:
        fp = str(z["taxonomy_fingerprint"]) if "taxonomy_fingerprint" in z.files else None
        if fp != tax.fingerprint:
            raise DataError(f"{source}: label_ids are node ids of taxonomy {fp}, but --taxonomy is {tax.fingerprint}; "
                            "store label_names (names or keys) to align columns with another tree")
        nodes = z["label_ids"].astype(np.int64)
    elif "label_names" in z.files:
        names = np.asarray(z["label_names"]).astype(str)
        nodes, _ = resolve_names(tax, names, f"{source} (label_names)", unknown="raise")
        if (nodes < 0).any():
            raise DataError(f"{source}: label_names has {int((nodes < 0).sum())} empty name(s)")
    else:
        if probs_cols != tax.n_labels:
            raise DataError(f"{source}: label_probs has {probs_cols} columns but the taxonomy has {tax.n_labels} "
                            "labels; store label_names (one per column) so the columns can be matched")
        print(f"note: {source} has no label_names/label_ids: columns are taken in the taxonomy's label order")
        return tax, np.arange(probs_cols)
    if len(nodes) != probs_cols:
        raise DataError(f"{source}: {len(nodes)} label names/ids for {probs_cols} probability columns")
    if len(np.unique(nodes)) != len(nodes):
        raise DataError(f"{source}: two columns name the same taxon; each column must be one label node")
    if not np.array_equal(np.sort(nodes), tax.label_ids):
        print(f"note: the {len(nodes)} columns of {source} become the label nodes of the taxonomy "
              f"(it had {tax.n_labels})")
        tax = tax.with_labels(nodes)
    return tax, np.argsort(tax.label_index[nodes])


def score_probabilities(tax, args: argparse.Namespace, ranks: list[str] | None) -> dict[str, Any]:
    from ..errors import DataError
    from ..metrics import compute_metrics

    src = args.predictions
    with np.load(src, allow_pickle=False) as z:
        if "label_probs" not in z.files:
            raise DataError(f"{src}: no 'label_probs' array (found {z.files})")
        tax, perm = _npz_columns(tax, z, src)
        probs = z["label_probs"][:, perm].astype(np.float64)
        ids = np.asarray(z["ids"]).astype(str) if "ids" in z.files else None
        own_truth = z["truth"].astype(np.int64) if "truth" in z.files else None
        fp = str(z["taxonomy_fingerprint"]) if "taxonomy_fingerprint" in z.files else None
    m: dict[str, Any] = {"input": "probabilities"}
    if args.truth:
        t_ids, t_names = read_table(args.truth, "truth", args.id_column, args.name_column)
        truth, _ = resolve_names(tax, t_names, args.truth, unknown="raise")
        if ids is not None:
            pos, miss, extra = align_truth(ids, t_ids.astype(str), src, "error")
            probs = probs[pos]
            m["n_extra_predictions"] = int(len(extra))
        elif len(probs) != len(truth):
            raise DataError(f"{src} has {len(probs)} rows and no 'ids' array, but {args.truth} has {len(truth)} rows; "
                            "store the sample ids as 'ids' to join them")
        else:
            print(f"note: {src} has no 'ids': rows are matched to the truth table by position")
    elif own_truth is not None:
        if fp != tax.fingerprint:
            raise DataError(f"{src}: its 'truth' node ids belong to taxonomy {fp}, not {tax.fingerprint}; pass --truth")
        truth = own_truth
    else:
        from ..errors import ConfigError

        raise ConfigError(f"{src} holds no 'truth' array: pass --truth (a CSV of ids and true names)")
    m.update(compute_metrics(tax, probs, truth, ranks=ranks))
    return m


def run(args: argparse.Namespace) -> int:
    from ..taxonomy import load as load_taxonomy
    from ..utils.io import atomic_write_json

    from .taxonomy_cmd import parse_options

    tax = load_taxonomy(args.taxonomy, format=args.taxonomy_format, **parse_options(args.taxonomy_option))
    ranks = [r.strip() for r in args.ranks.split(",") if r.strip()] if args.ranks else None
    if Path(args.predictions).suffix.lower() == ".npz":
        m = score_probabilities(tax, args, ranks)
    else:
        m = score_names(tax, args, ranks)
    print(f"\nscore of {args.predictions}")
    width = max(len(k) for k in SUMMARY)
    for k in SUMMARY:
        if k in m and m[k] is not None:
            v = m[k]
            print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    per = [k for k in m if k.endswith("/top1")]
    for k in per:
        if m[k] is not None:
            print(f"  {k:<{width}}  {m[k]:.4f}")
    out = atomic_write_json(args.out or default_out(args.predictions), m)
    print(f"\nmetrics written to {out}")
    return 0


def default_out(predictions: str | Path) -> Path:
    """``metrics.json`` beside the predictions; ``score_metrics.json`` in an evaluation folder, whose
    metrics.json belongs to ``taxonomist evaluate`` (it is never overwritten without ``--out``)."""
    from ..report.evaldir import FILES

    folder = Path(predictions).resolve().parent
    return folder / ("score_metrics.json" if (folder / FILES["meta"]).is_file() else FILES["metrics"])
