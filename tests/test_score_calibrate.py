"""`taxonomist score` (names and probabilities), hard-prediction metrics, and `taxonomist calibrate`.

Real data: the FathomNet 2025 lineage table (79 competition categories plus the
two taxa of its worked examples) and the NDSB plankton tree. The rank-step
reference below reads the lineage CSV directly, without the taxonomy code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.cli.main import main as cli
from taxonomist.metrics import compute_metrics
from taxonomist.metrics.hard import hard_metrics, worst_distances
from taxonomist.taxonomy import load

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


@pytest.fixture(scope="module")
def fn_csv(taxonomies_dir) -> Path:
    return taxonomies_dir / "fathomnet2025_lineage.csv"


@pytest.fixture(scope="module")
def fn_tax(fn_csv):
    return load(fn_csv)


@pytest.fixture(scope="module")
def lineages(fn_csv) -> dict[str, list[str]]:
    df = pd.read_csv(fn_csv, dtype=str, keep_default_na=False)
    return {row["name"]: [row[r] for r in RANKS if row[r]] for _, row in df.iterrows()}


def ref_rank_distance(lineages, pred: str, truth: str) -> int:
    """FathomNet 2025 by hand: rank steps from each side down from their deepest shared rank."""
    if pred not in lineages:
        return 12
    p, t = lineages[pred], lineages[truth]
    k = 0
    while k < min(len(p), len(t)) and p[k] == t[k]:
        k += 1
    return (len(p) - k) + (len(t) - k)


def _write(path: Path, rows: list[tuple[str, str]], header=("annotation_id", "concept_name")) -> Path:
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------ names (FathomNet style)
PAIRS = [  # (prediction, truth)
    ("Asteronyx", "Asteronyx loveni"),                     # worked example: 1
    ("Ophiacanthidae", "Asteronyx loveni"),                # worked example: 6
    ("Asteronyx loveni", "Asteronyx loveni"),              # exact: 0
    ("Sebastes", "Sebastes diploproa"),                    # genus for species: 1
    ("Sebastes diploproa", "Sebastes"),                    # too deep: 1
    ("Merluccius productus", "Sebastes diploproa"),        # two fish species
    ("Tunicata", "Pyrosoma atlanticum"),                   # an unranked label (Tunicata) under Chordata
    ("Caridea", "Asteronyx loveni"),                       # different phyla
    ("Some made-up fish", "Sebastes diploproa"),           # unknown name: the maximum, 12
]


def test_worked_examples(fn_tax):
    a, al, o = (fn_tax.find(x) for x in ("Asteronyx", "Asteronyx loveni", "Ophiacanthidae"))
    assert hard_metrics(fn_tax, [a], [al])["mean_rank_distance"] == 1.0
    assert hard_metrics(fn_tax, [o], [al])["mean_rank_distance"] == 6.0
    assert worst_distances(fn_tax)["rank_steps"] == 12


def test_score_fathomnet_submission(tmp_path, fn_csv, lineages):
    ids = [str(1000 + i) for i in range(len(PAIRS))]
    # rows of the submission in another order than the truth, plus one id that is not in the truth
    sub = _write(tmp_path / "submission.csv", [(i, p) for i, (p, _) in reversed(list(zip(ids, PAIRS)))]
                 + [("9999", "Asteronyx")])
    truth = _write(tmp_path / "truth.csv", [(i, t) for i, (_, t) in zip(ids, PAIRS)])
    out = tmp_path / "metrics.json"
    assert cli(["score", str(sub), "--truth", str(truth), "--taxonomy", str(fn_csv), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    expected = [ref_rank_distance(lineages, p, t) for p, t in PAIRS]
    assert expected[:3] == [1, 6, 0] and expected[-1] == 12
    assert m["mean_rank_distance"] == pytest.approx(np.mean(expected))
    assert m["mean_rank_distance"] == pytest.approx(43 / 9)       # 1+6+0+1+1+8+5+9+12, by hand
    assert m["input"] == "names"
    assert m["n_samples"] == 9 and m["n_unknown_predictions"] == 1 and m["n_extra_predictions"] == 1
    assert m["unknown_names"] == {"Some made-up fish": 1}
    # hierarchically correct: the prediction is the truth or an ancestor (rows 1, 3, 4)
    assert m["accuracy"] == pytest.approx(3 / 9)
    assert m["exact_accuracy"] == pytest.approx(1 / 9)
    # per rank, by hand from the lineage columns
    for j, r in enumerate(RANKS):
        inc = [(p, t) for p, t in PAIRS if len(lineages[t]) > j]
        right = [p in lineages and len(lineages[p]) > j and lineages[p][j] == lineages[t][j] for p, t in inc]
        assert m[f"{r}/n"] == len(inc)
        assert m[f"{r}/accuracy"] == pytest.approx(np.mean(right)), r
    # the metrics.json contract: top-1 error and <rank>/top1 of hard answers, the keys that need
    # probabilities or a ranking present as null
    assert m["n_label_truth"] == 9 and m["n_partial_truth"] == 0       # every truth here is a label
    assert m["top1_error"] == pytest.approx(1 - m["exact_accuracy"]) == pytest.approx(8 / 9)
    for r in RANKS:
        assert m[f"{r}/top1"] == m[f"{r}/accuracy"]
    for key in ("ece", "haurc", "hdist@5", "top5_error"):
        assert key in m and m[key] is None
    contract = ["top1_error", "mistake_severity", "hdist@1", "hdist@5", "mean_path_distance", "mean_rank_distance",
                "hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro", "ece", "haurc", "n_samples"]
    assert not [k for k in contract + [f"{r}/top1" for r in RANKS] if k not in m]
    # LCA heights by hand (heights from walking every leaf up the parent array); an unknown name: the root's
    tax = load(fn_csv)
    height = [0] * tax.n_nodes
    for leaf in range(tax.n_nodes):
        if not (tax.parent == leaf).any():
            u, h = leaf, 0
            while u >= 0:
                height[u] = max(height[u], h)
                u, h = int(tax.parent[u]), h + 1

    def path(v):
        out = [v]
        while out[-1] > 0:
            out.append(int(tax.parent[out[-1]]))
        return out[::-1]

    def d_h(p, t):
        if p not in lineages:
            return height[0]
        a, b = path(tax.find(p)), path(tax.find(t))
        if a == b:
            return 0
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return height[a[k - 1]]
    d = [d_h(p, t) for p, t in PAIRS]
    assert m["hdist@1"] == pytest.approx(np.mean(d))
    assert m["mistake_severity"] == pytest.approx(np.mean([x for x in d if x > 0]))


def test_score_writes_metrics_json_by_default(tmp_path, fn_csv, fn_tax):
    """Without --out, metrics.json goes beside the predictions (and the path is printed); an evaluation
    folder's own metrics.json is left alone (score_metrics.json instead)."""
    sub = _write(tmp_path / "submission.csv", [("1", "Sebastes"), ("2", "Asteronyx")])
    truth = _write(tmp_path / "truth.csv", [("1", "Sebastes diploproa"), ("2", "Asteronyx loveni")])
    args = ["score", str(sub), "--truth", str(truth), "--taxonomy", str(fn_csv)]
    assert cli(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["mean_rank_distance"] == 1.0 and m["input"] == "names"
    # an evaluation folder: probabilities with their own truth; evaluate's metrics.json is not touched
    from taxonomist.report import save_eval_dir

    rng = np.random.default_rng(6)
    t = rng.choice(fn_tax.label_ids, 40)
    p = rng.dirichlet(np.full(fn_tax.n_labels, 0.5), 40)
    ev = tmp_path / "eval"
    save_eval_dir(ev, taxonomy=fn_tax, label_probs=p, truth=t, metrics={"written_by": "evaluate"})
    assert cli(["score", str(ev / "predictions.npz"), "--taxonomy", str(fn_csv)]) == 0
    assert json.loads((ev / "metrics.json").read_text()) == {"written_by": "evaluate"}
    got = json.loads((ev / "score_metrics.json").read_text())
    assert got["input"] == "probabilities" and got["n_samples"] == 40
    assert got["top1_error"] == pytest.approx(np.mean(fn_tax.label_ids[p.argmax(1)] != t))


def test_hard_metrics_match_set_reference(fn_tax):
    """hP/hR/hF and path distance against root-path sets built by walking parents."""
    rng = np.random.default_rng(1)
    truth = rng.integers(1, fn_tax.n_nodes, 400)
    pred = rng.integers(0, fn_tax.n_nodes, 400)
    pred[::7] = -1                                          # unknown names
    pred[1::5] = truth[1::5]

    def path(v):
        out = set()
        while v > 0:
            out.add(int(v))
            v = fn_tax.parent[v]
        return out

    inter = a_size = b_size = 0
    dists = []
    for p, t in zip(pred, truth):
        b = path(t)
        a = path(p) if p >= 0 else set()
        inter += len(a & b)
        a_size += len(a) if p >= 0 else len(b)               # unknown: claims as many levels as the truth
        b_size += len(b)
        dists.append(len(a ^ b) if p >= 0 else 2 * fn_tax.max_depth)
    m = hard_metrics(fn_tax, pred, truth)
    assert m["hp"] == pytest.approx(inter / a_size)
    assert m["hr"] == pytest.approx(inter / b_size)
    assert m["mean_path_distance"] == pytest.approx(np.mean(dists))
    assert m["n_unknown_predictions"] == int((pred < 0).sum())


def test_ambiguous_names_list_lineages_and_resolve(tmp_path, fn_csv):
    """A real cross-kingdom homonym (the genus Morus: gannets and mulberries) added to the real table."""
    tree = tmp_path / "fn_morus.csv"
    shutil.copy(fn_csv, tree)
    with tree.open("a") as fh:
        fh.write("Morus bassanus,Animalia,Chordata,Aves,Suliformes,Sulidae,Morus,Morus bassanus\n")
        fh.write("Morus alba,Plantae,Tracheophyta,Magnoliopsida,Rosales,Moraceae,Morus,Morus alba\n")
    truth = _write(tmp_path / "t.csv", [("a", "Morus bassanus"), ("b", "Morus bassanus")])
    sub = _write(tmp_path / "s.csv", [("a", "Morus"), ("b", "Chordata > Morus")])
    args = ["score", str(sub), "--truth", str(truth), "--taxonomy", str(tree), "-O", "on_conflict=split"]
    from taxonomist.cli.main import build_parser
    from taxonomist.errors import DataError

    ns = build_parser().parse_args(args)
    with pytest.raises(DataError) as exc:                     # the error itself, not the CLI's one-line print
        ns.func(ns)
    msg = str(exc.value)
    assert "'Morus' is ambiguous" in msg
    assert "Sulidae > Morus" in msg and "Moraceae > Morus" in msg and "lineage" in msg
    assert cli(args) == 1                                     # the CLI prints it and fails
    _write(sub, [("a", "Animalia > Morus"), ("b", "Chordata > Morus")])
    out = tmp_path / "m.json"
    assert cli(args + ["--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["accuracy"] == 1.0 and m["mean_rank_distance"] == 1.0


def test_missing_predictions_and_unknown_truths(tmp_path, fn_csv):
    truth = _write(tmp_path / "t.csv", [("1", "Sebastes"), ("2", "Sebastes diploproa")])
    sub = _write(tmp_path / "s.csv", [("1", "Sebastes")])
    base = ["score", str(sub), "--truth", str(truth), "--taxonomy", str(fn_csv)]
    assert cli(base) == 1                                     # a missing prediction is an error by default
    out = tmp_path / "m.json"
    assert cli(base + ["--missing", "unknown", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["mean_rank_distance"] == pytest.approx((0 + 12) / 2)
    assert m["n_missing_predictions"] == 1
    bad_truth = _write(tmp_path / "t2.csv", [("1", "Sebastez")])
    from taxonomist.cli.score_cmd import resolve_names
    from taxonomist.errors import DataError

    with pytest.raises(DataError, match="Sebastez.*Did you mean.*Sebastes"):
        resolve_names(load(fn_csv), np.array(["Sebastez"], dtype=object), str(bad_truth), unknown="raise")


# ------------------------------------------------------------------ probabilities (.npz)
def test_score_npz_aligns_columns_and_rows(tmp_path, fn_csv, fn_tax):
    rng = np.random.default_rng(3)
    n = 60
    truth_nodes = rng.choice(fn_tax.label_ids, n)
    probs = rng.dirichlet(np.full(fn_tax.n_labels, 0.3), n)
    ids = np.array([f"img{i:03d}" for i in range(n)])
    # columns and rows stored in a shuffled order, labelled by name and id
    col = rng.permutation(fn_tax.n_labels)
    row = rng.permutation(n)
    np.savez(tmp_path / "p.npz", label_probs=probs[row][:, col], label_names=np.array(fn_tax.label_names)[col],
             ids=ids[row])
    truth = _write(tmp_path / "t.csv", [(i, fn_tax.names[v]) for i, v in zip(ids, truth_nodes)])
    out = tmp_path / "m.json"
    assert cli(["score", str(tmp_path / "p.npz"), "--truth", str(truth), "--taxonomy", str(fn_csv),
                "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    ref = compute_metrics(fn_tax, probs, truth_nodes)
    for key in ("top1_error", "top5_error", "mean_rank_distance", "hf", "ece", "haurc", "species/top1"):
        assert m[key] == pytest.approx(ref[key], abs=1e-9), key
    assert m["input"] == "probabilities"


def test_score_npz_subset_of_columns_becomes_label_set(tmp_path, fn_csv, fn_tax):
    """A model over genera only: its columns become the label nodes."""
    genera = np.flatnonzero(fn_tax.ranks == "genus")
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(len(genera)), 30)
    truth_nodes = rng.choice(genera, 30)
    np.savez(tmp_path / "g.npz", label_probs=probs, label_names=fn_tax.names[genera].astype(str))
    truth = _write(tmp_path / "t.csv", [(str(i), fn_tax.names[v]) for i, v in enumerate(truth_nodes)])
    out = tmp_path / "m.json"
    assert cli(["score", str(tmp_path / "g.npz"), "--truth", str(truth), "--taxonomy", str(fn_csv),
                "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    gtax = fn_tax.with_labels(genera)
    ref = compute_metrics(gtax, probs[:, np.argsort(gtax.label_index[genera])], truth_nodes)
    assert m["top1_error"] == pytest.approx(ref["top1_error"])
    assert m["top1_error"] == pytest.approx(np.mean(genera[probs.argmax(axis=1)] != truth_nodes))


# ------------------------------------------------------------------ calibration
def test_fit_calibration_recovers_temperature_and_reaches_target(plankton_dir):
    """Truths drawn from softmax(z); the model reports softmax(2 z) (over-confident): T ~ 2."""
    from taxonomist.cli.calibrate_cmd import fit_calibration
    from taxonomist.decide import decide

    tax = load(plankton_dir / "taxonomy.txt")
    rng = np.random.default_rng(0)
    n = 3000
    z = rng.normal(size=(n, tax.n_labels)) * 1.6
    z[np.arange(n), rng.integers(0, tax.n_labels, n)] += 4.0
    p_true = np.exp(z - z.max(axis=1, keepdims=True))
    p_true /= p_true.sum(axis=1, keepdims=True)
    truth = tax.label_ids[(p_true.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)]
    over = np.exp(2 * (z - z.max(axis=1, keepdims=True)))
    over /= over.sum(axis=1, keepdims=True)
    cal = fit_calibration(tax, over, truth, target_accuracy=0.9, per_rank=False)
    assert cal["temperature"] == pytest.approx(2.0, rel=0.1)
    assert cal["ece_after"] < cal["ece_before"] / 2
    assert cal["nll_after"] < cal["nll_before"]
    assert cal["n_samples"] == n
    # the thresholds reach the target on the data they were fitted on, and predict reproduces that
    assert cal["val_accuracy"] >= 0.9
    scaled = np.exp(np.log(over) / cal["temperature"])
    scaled /= scaled.sum(axis=1, keepdims=True)
    dec = decide(tax, scaled, "threshold", threshold=cal["thresholds"])
    assert np.mean(tax.is_ancestor(dec.node, truth)) == pytest.approx(cal["val_accuracy"])
    per = fit_calibration(tax, over, truth, target_accuracy=0.9, per_rank=True)
    assert set(per["thresholds"]) == set(tax.level_names()) and per["val_accuracy"] >= 0.9
    json.dumps(cal)                                            # JSON-ready for bundle.json


def test_calibrate_per_rank_keeps_unranked_labels_answerable(fn_tax):
    """`taxonomist calibrate --per-rank` on the FathomNet tree: its unranked labels (Tunicata, Caridea,
    Acanthascinae) share their nearest ranked ancestor's threshold, so the saved thresholds still
    answer them when the model is sure (before, they could never be chosen)."""
    from taxonomist.cli.calibrate_cmd import fit_calibration
    from taxonomist.decide import decide

    tax = fn_tax
    unranked = ["Tunicata", "Caridea", "Acanthascinae"]
    cols = np.array([tax.label_index[tax.find(x)] for x in unranked])
    rng = np.random.default_rng(8)
    n = 3000
    z = rng.normal(size=(n, tax.n_labels)) * 2.5
    boost = np.flatnonzero(rng.random(n) < 0.4)
    z[boost, rng.choice(cols, len(boost))] += 9.0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    truth = tax.label_ids[(p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)]
    over = np.exp(1.5 * np.log(p))                             # over-confident model
    over /= over.sum(axis=1, keepdims=True)
    cal = fit_calibration(tax, over, truth, target_accuracy=0.9, per_rank=True)
    json.dumps(cal)
    assert list(cal["thresholds"]) == list(tax.rank_order) and cal["val_accuracy"] >= 0.9
    scaled = np.exp(np.log(over) / cal["temperature"])
    scaled /= scaled.sum(axis=1, keepdims=True)
    d = decide(tax, scaled, "threshold", threshold=cal["thresholds"])
    for name in unranked:
        v = tax.find(name)
        sure = (scaled[:, tax.label_index[v]] > 0.99) & (truth == v)
        assert sure.sum() > 30 and (d.node[sure] == v).mean() > 0.9, name
