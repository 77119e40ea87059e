"""The evaluation folder and the HTML report (taxonomist.report), rendered in headless Chromium.

A small real case: the bundled NDSB demo images and official plankton tree, with
probabilities from a fixed-seed synthetic "model" (right most of the time, and
otherwise mostly wrong within the right group), so the test runs in seconds. The
slow test at the end trains a real tiny model and goes through train ->
calibrate -> evaluate (report) -> predict -> report -> evaluate --novel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.cli.main import main as cli
from taxonomist.data import load_samples
from taxonomist.errors import DataError
from taxonomist.metrics import compute_metrics
from taxonomist.metrics._common import resolve_levels
from taxonomist.report import SECTIONS, build_report, find_eval_dir, load_eval_dir, save_eval_dir
from taxonomist.report import analysis
from taxonomist.taxonomy import load

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo():
    from taxonomist.data.demo import demo_root

    return demo_root()


def synthetic_probs(tax, truth, seed=0, p_right=0.55):
    """Rows of label probabilities: the truth boosted with probability ``p_right``, otherwise a label
    that shares the truth's grandparent (a plausible mistake), sometimes a random label."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    z = rng.normal(size=(n, tax.n_labels))
    gp = tax.ancestor_at_depth(truth, np.maximum(tax.depth[truth] - 2, 1))
    target = tax.label_index[truth].copy()
    for i in np.flatnonzero(rng.random(n) > p_right):
        near = np.flatnonzero(tax.is_ancestor(gp[i], tax.label_ids) & (tax.label_ids != truth[i]))
        target[i] = rng.choice(near) if len(near) and rng.random() < 0.7 else rng.integers(tax.n_labels)
    z[np.arange(n), target] += rng.uniform(1.0, 6.0, n)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, demo):
    tax = load(demo / "class_paths.tsv")
    table = load_samples(demo / "val", tax)
    truth = table.nodes()
    probs = synthetic_probs(tax, truth)
    out = tmp_path_factory.mktemp("eval")
    save_eval_dir(out, taxonomy=tax, label_probs=probs, truth=truth, metrics=compute_metrics(tax, probs, truth),
                  samples=table, meta={"bundle": "synthetic/bundle", "data": str(demo / "val"), "ranks": None,
                                       "calibration": {}, "threshold": 0.8})
    return out


# ------------------------------------------------------------------ the folder
def test_eval_dir_round_trip(eval_dir):
    rec = load_eval_dir(eval_dir)
    assert rec.label_probs.shape == (len(rec.truth), rec.taxonomy.n_labels)
    assert len(rec.samples) == len(rec.truth) == rec.metrics["n_samples"]
    assert find_eval_dir(eval_dir) == eval_dir
    assert rec.history is None


def test_eval_dir_refuses_mixed_files(eval_dir, tmp_path, taxonomies_dir):
    bad = tmp_path / "bad"
    shutil.copytree(eval_dir, bad)
    from taxonomist.taxonomy import save

    save(load(taxonomies_dir / "fathomnet2025_lineage.csv"), bad / "taxonomy.json")
    with pytest.raises(DataError, match="mixes two evaluations"):
        load_eval_dir(bad)
    with pytest.raises(DataError, match="taxonomist evaluate"):
        find_eval_dir(tmp_path)


def test_report_accepts_eval_dir_metrics_file_and_run_folder(eval_dir, tmp_path):
    """`taxonomist report RUN_OR_METRICS`: an evaluation folder, a metrics file in one (its values are
    shown), a run folder and a bundle folder (their evaluation where `evaluate` writes it)."""
    m = json.loads((eval_dir / "metrics.json").read_text())

    def card(top1_error):  # the headline card of the top-1 accuracy
        return f'{100 * (1 - top1_error):.1f}%</div><div class="k">top-1 accuracy (label)'
    want = card(m["top1_error"])
    # the evaluation folder itself
    out = tmp_path / "a.html"
    assert cli(["report", str(eval_dir), "--out", str(out)]) == 0 and want in out.read_text()
    # its metrics.json: the same folder and values
    out = tmp_path / "b.html"
    assert cli(["report", str(eval_dir / "metrics.json"), "--out", str(out)]) == 0 and want in out.read_text()
    assert find_eval_dir(eval_dir / "metrics.json") == eval_dir
    # another metrics file in the folder (evaluate --out other.json): its values are the ones shown
    ev = tmp_path / "ev"
    shutil.copytree(eval_dir, ev)
    (ev / "other.json").write_text(json.dumps({**m, "top1_error": 0.0123}))
    out = tmp_path / "c.html"
    assert cli(["report", str(ev / "other.json"), "--out", str(out)]) == 0
    assert card(0.0123) in out.read_text() and want not in out.read_text()
    # a run folder and a bundle folder: <run>/bundle/eval, where `taxonomist evaluate` writes by default
    run = tmp_path / "run"
    shutil.copytree(eval_dir, run / "bundle" / "eval")
    (run / "bundle" / "bundle.json").write_text("{}")
    assert find_eval_dir(run) == run / "bundle" / "eval" and find_eval_dir(run / "bundle") == run / "bundle" / "eval"
    assert cli(["report", str(run)]) == 0
    assert want in (run / "bundle" / "eval" / "report.html").read_text()
    # a metrics file with no evaluation beside it (e.g. from `taxonomist score`): refused, saying why
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="not an evaluation folder.*taxonomist evaluate"):
        find_eval_dir(lone / "metrics.json")
    assert cli(["report", str(lone / "metrics.json")]) == 1
    with pytest.raises(DataError, match="not a metrics file"):
        from taxonomist.report.evaldir import read_metrics_file
        read_metrics_file(ev / "taxonomy.json")


# ------------------------------------------------------------------ the numbers
def test_group_level_and_confusion_match_reference(eval_dir):
    rec = load_eval_dir(eval_dir)
    tax, probs, truth = rec.taxonomy, rec.label_probs, rec.truth
    levels = resolve_levels(tax)
    j = analysis.choose_group_level(tax, truth, levels)
    assert levels.names[j] == "level2"                       # 15 groups, reached by every sample
    cm = analysis.grouped_confusion(tax, probs, truth, "level2")
    # reference: subtree masses of the level-2 nodes by explicit sums over labels
    nodes2 = np.flatnonzero(tax.depth == 2)
    mass = np.stack([[probs[i, tax.is_ancestor(v, tax.label_ids)].sum() for v in nodes2]
                     for i in range(len(truth))])
    pred = nodes2[mass.argmax(axis=1)]
    t2 = tax.ancestor_at_depth(truth, 2)
    ref = pd.crosstab(pd.Series(t2, name="t"), pd.Series(pred, name="p"))
    for a, row in zip(cm.nodes, cm.matrix):
        for b, c in zip(cm.nodes, row):
            expect = ref.loc[a, b] if a in ref.index and b in ref.columns else 0
            assert c == expect
    assert cm.matrix.sum() == len(truth)
    assert rec.metrics["level2/top1"] == pytest.approx(np.trace(cm.matrix) / cm.matrix.sum())


def test_worst_mistakes_and_class_table_match_reference(eval_dir):
    rec = load_eval_dir(eval_dir)
    tax, probs, truth = rec.taxonomy, rec.label_probs, rec.truth
    top = tax.label_ids[probs.argmax(axis=1)]
    conf = probs.max(axis=1)
    wrong = [i for i in range(len(truth)) if top[i] != truth[i]]
    key = {i: (-int(tax.height[tax.lca(top[i], truth[i])]),
               -int(tax.distance(top[i], truth[i], "path")), -conf[i], i) for i in wrong}
    ref = sorted(wrong, key=key.__getitem__)[:24]
    items = analysis.worst_mistakes(tax, probs, truth, 24)
    assert [it["index"] for it in items] == ref
    rows = {r["name"]: r for r in analysis.label_table(tax, probs, truth)}
    for name in ("copepod_calanoid", "chaetognath_sagitta", "artifacts"):
        v = tax.find(name)
        sup = int((truth == v).sum())
        npred = int((top == v).sum())
        tp = int(((truth == v) & (top == v)).sum())
        r = rows[name]
        assert (r["support"], r["n_pred"], r["tp"]) == (sup, npred, tp)
        assert r["f1"] == pytest.approx(2 * tp / (sup + npred))
        errs = pd.Series(top[(truth == v) & (top != v)]).value_counts()
        if len(errs):
            assert r["confused_count"] == errs.iloc[0]
    f1 = [r["f1"] for r in analysis.label_table(tax, probs, truth)]
    assert f1 == sorted(f1)                                   # worst first


def test_decision_sweeps_end_points(eval_dir):
    rec = load_eval_dir(eval_dir)
    tax, probs, truth = rec.taxonomy, rec.label_probs, rec.truth
    sw = analysis.decision_sweeps(tax, probs, truth)
    thr = sw["threshold"]
    # theta = 0: every answer is the top label; theta = 1: (nearly) every answer at the root, always right
    top = tax.label_ids[probs.argmax(axis=1)]
    assert thr["accuracy"][thr["threshold"] == 0.0][0] == pytest.approx(np.mean(tax.is_ancestor(top, truth)))
    assert thr["accuracy"][0] >= thr["accuracy"][-1]
    assert np.all(np.diff(thr["depth"]) >= -1e-12)            # lower thresholds answer deeper
    d = sw["darts"]
    assert d["accuracy"][0] <= d["accuracy"][-1]              # larger lambda, more accurate


# ------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def report_html(eval_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert cli(["report", str(eval_dir), "--out", str(out), "--n-worst", "12"]) == 0
    return out


def test_report_page_is_self_contained(report_html):
    page = report_html.read_text()
    for key, title in SECTIONS.items():
        if key != "training":                                 # only with a training run's metrics.csv
            assert f"<h2>{title}</h2>" in page.replace("&amp;", "&"), title
    imgs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert all(src.startswith("data:image/") for src in imgs)
    figures = [s for s in imgs if s.startswith("data:image/png")]
    thumbs = [s for s in imgs if s.startswith("data:image/jpeg")]
    assert len(figures) == 5 and len(thumbs) == 12         # no learning curves without a run
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<link" not in page
    assert "level2" in page and "copepod" in page


def test_report_ranked_tree_without_images(taxonomies_dir, tmp_path):
    """FathomNet tree (ranked), no samples.csv: rank distance headline, placeholders in the gallery."""
    tax = load(taxonomies_dir / "fathomnet2025_lineage.csv")
    rng = np.random.default_rng(5)
    truth = rng.choice(tax.label_ids, 200)
    probs = synthetic_probs(tax, truth, seed=5, p_right=0.6)
    save_eval_dir(tmp_path, taxonomy=tax, label_probs=probs, truth=truth,
                  metrics=compute_metrics(tax, probs, truth), meta={"ranks": list(tax.rank_order)})
    page = build_report(load_eval_dir(tmp_path), group_rank="phylum")
    assert "mean rank distance" in page and "image not available" in page
    assert "Grouped at <b>phylum</b>" in page


def test_metrics_file_may_not_take_the_name_of_another_eval_file(taxonomies_dir, tmp_path):
    """`evaluate --out <folder>/eval.json` would have its metrics overwritten by the folder's eval.json."""
    tax = load(taxonomies_dir / "fathomnet2025_lineage.csv")
    truth = np.asarray(tax.label_ids[:20])
    probs = synthetic_probs(tax, truth, seed=1, p_right=0.6)
    with pytest.raises(DataError, match="eval.json"):
        save_eval_dir(tmp_path, taxonomy=tax, label_probs=probs, truth=truth, metrics={"top1_error": 0.5},
                      metrics_path=tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()
    save_eval_dir(tmp_path, taxonomy=tax, label_probs=probs, truth=truth, metrics={"top1_error": 0.5},
                  metrics_path=tmp_path / "scores.json")
    assert json.loads((tmp_path / "scores.json").read_text()) == {"top1_error": 0.5}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the lead's CI "
                                             "installs it")
def test_report_renders_in_headless_chromium(report_html, tmp_path):
    from PIL import Image

    html = report_html
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,4000", f"--screenshot={shot}",
           html.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert shot.exists()
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape == (4000, 1400, 3)
    assert img.std() > 20                                     # not a blank page
    # the rendered page has structure from top to bottom: every 500 px band shows something
    bands = [img[y:y + 500].std() for y in range(0, 4000, 500)]
    assert min(bands) > 5, bands
    # the headline band holds dark text on the light background
    assert (img[:400].mean(axis=2) < 80).mean() > 0.002


# ------------------------------------------------------------------ end to end (real tiny model)
@pytest.mark.slow
def test_train_calibrate_evaluate_report_novel(tmp_path, demo):
    """A real tiny model trained without some classes; every command of issue 5 on it."""
    tax = load(demo / "class_paths.tsv")
    held = ["chaetognath_sagitta", "copepod_cyclopoid_oithona_eggs"]
    rows = {"train": [], "val": [], "novel": []}
    for cls in sorted(p.name for p in (demo / "train").iterdir() if p.is_dir()):
        for split, n in (("train", 3), ("val", 1)):
            for img in sorted((demo / split / cls).glob("*.jpg"))[:n]:
                rows["novel" if cls in held else split].append({"path": str(img), "label": cls})
    for split, r in rows.items():
        pd.DataFrame(r).to_csv(tmp_path / f"{split}.csv", index=False)
    cache = tmp_path / "cache"
    cfg = {"name": "r", "output_dir": str(tmp_path / "runs"), "seed": 1,
           "taxonomy": {"path": str(demo / "class_paths.tsv"), "label_nodes": "observed"},
           "data": {"train": str(tmp_path / "train.csv"), "val": str(tmp_path / "val.csv")},
           "model": {"backbone": {"name": "efficientnet_lite0", "image_size": 64}, "neck": {"hidden": [64]}},
           "train": {"epochs": 4, "batch_size": 32, "lr": 0.003, "cache_dir": str(cache), "progress": False}}
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "runs" / "r"
    common = ["--cache-dir", str(cache), "--no-progress"]

    # calibrate: stored in bundle.json, used by predict by default
    assert cli(["calibrate", str(run), "--data", str(tmp_path / "val.csv"), "--target-accuracy", "0.9",
                *common]) == 0
    cal = json.loads((run / "bundle" / "bundle.json").read_text())["calibration"]
    assert {"temperature", "thresholds", "target_accuracy", "n_samples", "ece_before", "ece_after"} <= set(cal)
    assert cal["val_accuracy"] >= 0.9
    from taxonomist.bundle import load_bundle
    from taxonomist.data import load_images

    b = load_bundle(run / "bundle")
    table = load_images([str(tmp_path / "val.csv")], b.taxonomy)
    raw = b.label_probs(table, cache_dir=cache, progress=False, calibrated=False)
    scaled = b.label_probs(table, cache_dir=cache, progress=False)
    ref = np.exp(np.log(raw) / cal["temperature"])
    np.testing.assert_allclose(scaled, ref / ref.sum(axis=1, keepdims=True), atol=1e-5)
    pj = tmp_path / "p.json"
    assert cli(["predict", str(run), str(tmp_path / "val.csv"), "-o", str(pj), *common]) == 0
    from taxonomist.decide import decide

    expected = decide(b.taxonomy, scaled, "threshold", threshold=cal["thresholds"])
    assert [r["prediction"] for r in json.loads(pj.read_text())] == expected.names(b.taxonomy)

    # evaluate: the folder the report needs, and the report itself (with the learning curves)
    assert cli(["evaluate", str(run), "--data", str(tmp_path / "val.csv"), *common]) == 0
    ev = run / "bundle" / "eval"
    for f in ("metrics.json", "predictions.npz", "samples.csv", "taxonomy.json", "eval.json", "report.html"):
        assert (ev / f).exists(), f
    page = (ev / "report.html").read_text()
    assert "<h2>Learning curves</h2>" in page and "temperature" in page
    # report on the run folder without an evaluation: evaluates the config's validation data first
    shutil.rmtree(ev)
    assert cli(["report", str(run), *common]) == 0
    assert (ev / "report.html").exists() and (ev / "predictions.npz").exists()

    # novel taxa: images of the two classes the model never saw; its tree was restricted to the observed
    # classes, so the full tree is given and matched by key
    out = tmp_path / "novel.json"
    assert cli(["evaluate", str(run), "--data", str(tmp_path / "novel.csv"), "--novel", "--out", str(out),
                "--full-taxonomy", str(demo / "class_paths.tsv"), *common]) == 0
    nv = json.loads(out.read_text())
    assert nv["argmax/n"] == len(rows["novel"]) and nv["n_held_out_leaves"] == 2
    assert nv["argmax/correct_ancestor"] == 0.0               # argmax always names a known class
    assert nv["threshold/correct_ancestor"] >= nv["argmax/correct_ancestor"]
    assert cli(["evaluate", str(run), "--data", str(tmp_path / "val.csv"), "--novel", *common]) == 1
