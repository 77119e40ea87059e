"""The evaluation report: one self-contained HTML page (figures and thumbnails embedded as data URIs).

``build_report(record)`` returns the page as a string; ``write_report(eval_dir)``
writes ``report.html``. The page loads nothing from outside (no scripts, fonts
or images from the network; one tiny inline script sorts the class table), so it
can be mailed, archived or opened offline. Sections, top to bottom: headline
numbers, accuracy per rank, learning curves (when the training run is found),
the confusion matrix at a readable rank, the decision rules compared,
risk–coverage, accuracy vs specificity, calibration, the worst hierarchical
mistakes with their images, and the per-class table (worst first).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import compute_metrics, reliability_diagram, risk_coverage_curve
from ..metrics._common import known_mask, resolve_levels
from ..metrics.selective import area_under_curve, info_gain
from ..taxonomy import Taxonomy
from ..utils.io import atomic_write_text
from . import analysis, plots
from .evaldir import FILES, EvalRecord, load_eval_dir

#: section id -> title, in page order (tests check that every title is on the page)
SECTIONS: dict[str, str] = {
    "headline": "Headline numbers",
    "ranks": "Accuracy per rank",
    "training": "Learning curves",
    "confusion": "Confusion matrix",
    "decisions": "Decision rules compared",
    "risk": "Risk–coverage",
    "specificity": "Accuracy vs specificity",
    "calibration": "Calibration",
    "mistakes": "Worst hierarchical mistakes",
    "classes": "Per-class results",
}
THUMB_PX = 160
MAX_CLASS_ROWS = 500

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1240px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:0 0 6px;border-bottom:2px solid #2f6db5;padding-bottom:4px}
section{background:#fff;border-radius:8px;padding:18px 22px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.sub{color:#5b6270;font-size:13px;margin:2px 0 10px}.note{color:#5b6270;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{border:1px solid #dde1e8;border-radius:8px;padding:12px 14px;background:#fafbfc}
.card .v{font-size:28px;font-weight:650;color:#1f4f8a}.card .k{font-size:14px;font-weight:600;margin-top:2px}
.card .h{font-size:12px;color:#5b6270;margin-top:4px}
img.fig{max-width:100%;height:auto;display:block;margin:8px auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #e6e8ec;text-align:left}
th{background:#eef1f5;position:sticky;top:0;cursor:pointer;user-select:none}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr:hover td{background:#f6f8fb}.bad{color:#b3261e;font-weight:600}.good{color:#2c7a3b}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.mistake{border:1px solid #e1d3d1;border-radius:8px;padding:10px;background:#fffdfc;display:flex;gap:12px}
.mistake img{width:128px;height:128px;object-fit:contain;background:#fff;border:1px solid #d9dce2;border-radius:4px;
flex:none}
.mistake .noimg{width:128px;height:128px;background:#e8eaee;border-radius:4px;flex:none;display:flex;align-items:center;
justify-content:center;font-size:11px;color:#666;text-align:center}
.mistake .txt{font-size:12.5px;line-height:1.4;overflow-wrap:anywhere;min-width:0}
.mistake .row{margin-top:5px}.lab{display:inline-block;font-size:11px;font-weight:700;border-radius:3px;padding:0 5px;
margin-right:4px;color:#fff}.lab.t{background:#2c7a3b}.lab.p{background:#b3261e}
.lin .shared{color:#8a8f98}.lin .diff{font-weight:650}
.tag{display:inline-block;background:#5b6270;color:#fff;border-radius:10px;padding:1px 8px;font-size:11px}
.meta{font-size:13px;color:#3c4350}.meta td{border:none;padding:1px 10px 1px 0}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
var tb=th.closest('table').tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;var nx=parseFloat(x),ny=parseFloat(y);
var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));return asc?c:-c;});
rows.forEach(function(r){tb.appendChild(r);});});});
"""


# ------------------------------------------------------------------ small helpers
def _e(x: object) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.{digits}f}%"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def thumbnail_uri(path: str, box: np.ndarray | None = None, size: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the (cropped) image scaled to ``size`` px on its long side; None if unreadable."""
    from PIL import Image

    from ..data import load_rgb
    from ..errors import DataError

    try:
        img = load_rgb(path, box)
    except DataError:
        return None
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _lineage_html(tax: Taxonomy, node: int, lca: int) -> str:
    """Names root-side first (the root left out); the part shared with the other lineage greyed."""
    ids = tax.ancestors(node)[1:]
    shared_depth = int(tax.depth[lca])
    parts = [f'<span class="{"shared" if tax.depth[v] <= shared_depth else "diff"}">{_e(tax.names[v])}</span>'
             for v in ids]
    return '<span class="lin">' + (" › ".join(parts) or f'<span class="shared">{_e(tax.names[0])}</span>') + "</span>"


def _section(key: str, body: str, sub: str = "") -> str:
    return (f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>' + (f'<p class="sub">{sub}</p>' if sub else "")
            + body + "</section>")


# ------------------------------------------------------------------ the page
def build_report(rec: EvalRecord, group_rank: str | None = None, max_groups: int = 30, n_worst: int = 24,
                 title: str | None = None) -> str:
    """The HTML page for one evaluation (see the module docstring)."""
    tax: Taxonomy = rec.taxonomy
    probs, truth = rec.label_probs, rec.truth
    ranks = rec.ranks
    levels = resolve_levels(tax, ranks)
    m = rec.metrics
    if not m or m.get("n_samples") != len(truth) or "top1_error" not in m:
        m = compute_metrics(tax, probs, truth, ranks=ranks)
    known = known_mask(truth)
    if not known.any():
        from ..errors import DataError

        raise DataError(f"{rec.path}: no sample has a known truth; a report needs labelled samples")
    k = next((int(key[3:-6]) for key in m if key.startswith("top") and key.endswith("_error") and key != "top1_error"),
             None)
    meta = rec.meta
    options = analysis.decision_options(tax, meta.get("calibration"), float(meta.get("threshold") or 0.8))
    distance_ranks = list(ranks) if ranks and tax.has_ranks else None
    dec_rows = analysis.decision_summary(tax, probs, truth, options, distance_ranks)
    if group_rank is None:
        gj = analysis.choose_group_level(tax, truth, levels, max_groups)
        group_rank = levels.names[gj]
    elif group_rank not in levels.names:
        from ..errors import ConfigError

        raise ConfigError(f"--group-rank {group_rank!r} is not a level of this evaluation; use one of "
                          f"{', '.join(levels.names)}")

    parts = [_header(rec, title, m)]
    parts.append(_headline(tax, m, dec_rows, group_rank, k))
    parts.append(_ranks(levels.names, m, k))
    if rec.history is not None:
        fig = plots.learning_curves(rec.history)
        if fig is not None:
            parts.append(_section("training", _img(plots.to_png(fig), "learning curves"),
                                  f"From the training run's metrics.csv ({_e(rec.run_dir)})."))
    parts.append(_confusion(tax, probs, truth, group_rank, ranks, max_groups))
    parts.append(_decisions(tax, dec_rows))
    parts.append(_risk(tax, probs, truth, dec_rows))
    parts.append(_specificity(tax, probs, truth, dec_rows))
    parts.append(_calibration(tax, probs, truth, m, meta))
    parts.append(_mistakes(rec, n_worst))
    parts.append(_classes(tax, probs, truth))
    page_title = title or f"taxonomist report: {Path(str(meta.get('bundle') or rec.path)).parent.name}"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(page_title)}</title><meta name=\"viewport\" content=\"width=device-width\">"
            f"<style>{CSS}</style></head><body><main>" + "".join(parts)
            + f"<p class=\"note\">Made by taxonomist from {_e(rec.path)}. Definitions: docs/metrics.md and "
              "docs/report.md.</p></main>"
            f"<script>{SORT_JS}</script></body></html>")


def _header(rec: EvalRecord, title: str | None, m: dict[str, Any]) -> str:
    tax = rec.taxonomy
    meta = rec.meta
    rows = []
    for label, value in (("bundle", meta.get("bundle")), ("data", meta.get("data")),
                         ("evaluated", meta.get("created")),
                         ("samples", f"{m.get('n_samples')} ({m.get('n_label_truth')} with a label truth, "
                                     f"{m.get('n_partial_truth')} partial, {m.get('n_unknown')} unknown)"),
                         ("taxonomy", f"{tax.n_nodes} nodes, {tax.n_labels} labels, depth {tax.max_depth}, "
                                      f"{'ranks ' + ', '.join(tax.rank_order) if tax.has_ranks else 'unranked'} "
                                      f"({tax.fingerprint})")):
        if value:
            rows.append(f"<tr><td><b>{_e(label)}</b></td><td>{_e(value)}</td></tr>")
    cal = meta.get("calibration") or {}
    if cal.get("temperature"):
        thr = _params({"thresholds": cal.get("thresholds")})
        rows.append(f"<tr><td><b>calibration</b></td><td>temperature {cal['temperature']:.3f}, {_e(thr)} "
                    f"(fitted on {cal.get('n_samples', '?')} samples for accuracy "
                    f"{cal.get('target_accuracy', '?')})</td></tr>")
    if not title and meta.get("bundle"):
        b = Path(str(meta["bundle"]))
        title = f"Evaluation of {b.parent.name}/{b.name}"
    return (f"<h1>{_e(title or 'Evaluation report')}</h1>"
            f"<table class=\"meta\">{''.join(rows)}</table>")


def _card(value: str, key: str, hint: str) -> str:
    return (f'<div class="card"><div class="v">{value}</div><div class="k">{_e(key)}</div>'
            f'<div class="h">{hint}</div></div>')


def _headline(tax: Taxonomy, m: dict[str, Any], dec_rows: list[dict[str, Any]], group_rank: str, k: int | None
              ) -> str:
    cards = []
    if m.get("top1_error") is not None:
        cards.append(_card(_pct(1 - m["top1_error"]), "top-1 accuracy (label)",
                           f"most probable label is the truth; {m.get('n_label_truth')} samples"))
    if k and m.get(f"top{k}_error") is not None:
        cards.append(_card(_pct(1 - m[f"top{k}_error"]), f"top-{k} accuracy",
                           f"truth among the {k} most probable labels"))
    if m.get(f"{group_rank}/top1") is not None:
        cards.append(_card(_pct(m[f"{group_rank}/top1"]), f"accuracy at {group_rank}",
                           f"most probable {group_rank} is right ({m.get(f'{group_rank}/n')} samples)"))
    if m.get("mistake_severity") is not None:
        cards.append(_card(_num(m["mistake_severity"], 2), "mistake severity",
                           "mean height of the common ancestor of wrong answers and truth (lower is better)"))
    if m.get("mean_rank_distance") is not None:
        cards.append(_card(_num(m["mean_rank_distance"], 2), "mean rank distance",
                           "rank steps between top label and truth (FathomNet 2025 score, 0 best)"))
    if m.get("mean_path_distance") is not None:
        cards.append(_card(_num(m["mean_path_distance"], 2), "mean path distance", "edges between top label and truth"))
    if m.get("hf") is not None:
        cards.append(_card(_num(m["hf"]), "hierarchical F1", f"hP {_num(m.get('hp'))}, hR {_num(m.get('hr'))}"))
    thr = next((r for r in dec_rows if r["name"] == "threshold"), None)
    if thr is not None and thr.get("accuracy") is not None:
        cards.append(_card(_pct(thr["accuracy"]), "back-off accuracy",
                           f"threshold rule ({_e(_params(thr['params']))}): answers at mean depth "
                           f"{_num(thr['mean_depth'], 2)}, {_pct(thr['at_label'], 0)} at a label"))
    if m.get("ece") is not None:
        cards.append(_card(_num(m["ece"]), "calibration error (ECE)", "top label, 15 bins (lower is better)"))
    if m.get("haurc") is not None:
        cards.append(_card(_num(m["haurc"]), "hAURC", "area under the risk–coverage curve (lower is better)"))
    return _section("headline", f'<div class="cards">{"".join(cards)}</div>',
                    "The most probable label unless stated otherwise; every metric is in metrics.json.")


def _params(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{a}: {fmt(b)}" for a, b in v.items() if b is not None) + "}"
        return str(v)
    return ", ".join(f"{a}={fmt(b)}" for a, b in params.items() if a != "candidates") or "–"


def _ranks(names: Sequence[str], m: dict[str, Any], k: int | None) -> str:
    top1 = [m.get(f"{n}/top1") for n in names]
    topk = [m.get(f"{n}/top{k}") for n in names] if k else None
    counts = [int(m.get(f"{n}/n") or 0) for n in names]
    fig = plots.per_level_accuracy(list(names), top1, topk, k or 1, counts)
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td class=n>{counts[i]}</td><td class=n>{_pct(top1[i])}</td>"
        f"<td class=n>{_pct(topk[i]) if topk else '–'}</td><td class=n>{_pct(m.get(f'{n}/balanced_accuracy'))}</td>"
        f"<td class=n>{_num(m.get(f'{n}/macro_f1'))}</td><td class=n>{_num(m.get(f'{n}/ece'))}</td></tr>"
        for i, n in enumerate(names))
    table = (f"<table><thead><tr><th>level</th><th class=n>samples</th><th class=n>top-1</th>"
             f"<th class=n>top-{k or 1}</th><th class=n>balanced acc.</th><th class=n>macro F1</th>"
             f"<th class=n>ECE</th></tr></thead><tbody>{rows}</tbody></table>")
    return _section("ranks", _img(plots.to_png(fig), "accuracy per rank") + table,
                    "At each rank the prediction is the most probable node there (summed probability of its "
                    "subtree); samples whose truth stops above a rank are not counted at it.")


def _confusion(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, level: str, ranks: Sequence[str] | None,
               max_groups: int) -> str:
    cm = analysis.grouped_confusion(tax, probs, truth, level, ranks, max_groups)
    if cm.matrix.shape[0] < 2:
        return _section("confusion", "<p class=note>Only one group at this level: nothing to confuse.</p>")
    fig = plots.confusion_matrix(cm.matrix, cm.names, level)
    diag = np.trace(cm.matrix) / max(cm.matrix.sum(), 1)
    sub = (f"Grouped at <b>{_e(level)}</b> ({cm.matrix.shape[0]} groups; {_pct(diag)} on the diagonal). "
           "Choose another level with <code>--group-rank</code>.")
    if cm.n_excluded:
        sub += f" {cm.n_excluded} samples whose truth stops above {_e(level)} are not shown."
    return _section("confusion", _img(plots.to_png(fig), f"confusion matrix at {level}"), sub)


def _decisions(tax: Taxonomy, rows: list[dict[str, Any]]) -> str:
    has_rank = tax.has_ranks
    head = ("<tr><th>rule</th><th>settings</th><th class=n>accuracy</th><th class=n>at a label</th>"
            "<th class=n>mean depth</th><th class=n>coverage</th><th class=n>path distance</th>"
            + ("<th class=n>rank distance</th>" if has_rank else "") + "<th class=n>hF</th></tr>")
    body = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{_e(_params(r['params']))}</td><td class=n>{_pct(r['accuracy'])}</td>"
        f"<td class=n>{_pct(r['at_label'])}</td><td class=n>{_num(r['mean_depth'], 2)}</td>"
        f"<td class=n>{_num(r['coverage'])}</td><td class=n>{_num(r['mean_path_distance'], 2)}</td>"
        + (f"<td class=n>{_num(r.get('mean_rank_distance'), 2)}</td>" if has_rank else "")
        + f"<td class=n>{_num(r['hf'])}</td></tr>" for r in rows)
    return _section("decisions", f"<table><thead>{head}</thead><tbody>{body}</tbody></table>",
                    "Accuracy here is hierarchical: an answer is right when it is the truth or one of its "
                    "ancestors, so a cautious answer higher up the tree can be right. argmax always answers a "
                    "label; threshold backs off up the lineage; CRM minimises the expected tree distance; DARTS "
                    "trades information gain for accuracy. Settings come from the bundle's calibration when "
                    "`taxonomist calibrate` was run.")


def _points(tax: Taxonomy, rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float, float]]:
    """name -> (coverage, info gain, depth, accuracy) of each decision rule."""
    rmax = float(info_gain(tax).max()) if len(tax.leaves) > 1 else 1.0
    out = {}
    for r in rows:
        if r.get("coverage") is None or r.get("accuracy") is None:
            continue
        out[r["name"]] = (r["coverage"], r["coverage"] * rmax, r["mean_depth"], r["accuracy"])
    return out


def _risk(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, rows: list[dict[str, Any]]) -> str:
    if len(tax.leaves) < 2:
        return _section("risk", "<p class=note>The tree has a single leaf: no coverage to trade.</p>")
    curve = risk_coverage_curve(tax, probs, truth)
    pts = {n: (c, 1 - a) for n, (c, _, _, a) in _points(tax, rows).items()}
    fig = plots.risk_coverage(curve, area_under_curve(curve), pts)
    return _section("risk", _img(plots.to_png(fig), "risk-coverage curve"),
                    "Each point of the curve is one back-off threshold: answers climb from the top label to the "
                    "first ancestor whose probability reaches it. Coverage counts how specific the answers are "
                    "(1 − log₂ leaves under the answer / log₂ all leaves; Goren et al., NeurIPS 2024).")


def _specificity(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, rows: list[dict[str, Any]]) -> str:
    sw = analysis.decision_sweeps(tax, probs, truth)
    pts = {n: (g, d, a) for n, (_, g, d, a) in _points(tax, rows).items() if n in ("threshold", "darts", "crm")}
    fig = plots.accuracy_specificity(sw, pts)
    n = sw["threshold"]["n"]
    sub = ("How accuracy grows as answers get less specific, for a sweep of the back-off threshold and of "
           "DARTS' λ (Deng et al., CVPR 2012). Information gain is log₂(all leaves) − log₂(leaves under the "
           "answer): 0 at the root.")
    if n < int(known_mask(truth).sum()):
        sub += f" Curves computed on a random subset of {n} samples."
    return _section("specificity", _img(plots.to_png(fig), "accuracy vs specificity"), sub)


def _calibration(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, m: dict[str, Any], meta: dict[str, Any]
                 ) -> str:
    t = np.maximum(truth, 0)
    inc = known_mask(truth) & tax.is_label[t]
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(top)), top][inc]
    correct = tax.label_ids[top][inc] == t[inc]
    diag = reliability_diagram(conf, correct)
    fig = plots.reliability(diag, m.get("ece"), "Reliability of the top label")
    cal = meta.get("calibration") or {}
    sub = ("Bars below the diagonal mean over-confidence (the model is right less often than it claims). ")
    if cal.get("temperature"):
        sub += (f"Probabilities include the bundle's temperature {cal['temperature']:.3f} (ECE on the calibration "
                f"data: {_num(cal.get('ece_before'))} before, {_num(cal.get('ece_after'))} after).")
    else:
        sub += "Not calibrated: <code>taxonomist calibrate</code> fits a temperature and back-off thresholds."
    return _section("calibration", _img(plots.to_png(fig), "reliability diagram"), sub)


def _mistakes(rec: EvalRecord, n_worst: int) -> str:
    tax = rec.taxonomy
    items = analysis.worst_mistakes(tax, rec.label_probs, rec.truth, n_worst)
    if not items:
        return _section("mistakes", "<p class=note>No mistakes: every top label is right.</p>")
    paths = rec.samples.paths() if rec.samples is not None else None
    boxes = rec.samples.boxes() if rec.samples is not None else None
    cells = []
    for it in items:
        i = it["index"]
        uri = thumbnail_uri(str(paths[i]), boxes[i]) if paths is not None else None
        name = Path(str(paths[i])).name if paths is not None else f"row {i}"
        pic = (f'<img alt="{_e(name)}" src="{uri}">' if uri
               else f'<div class="noimg">image not available<br>{_e(name)}</div>')
        dist = f"LCA height {it['lca_height']}, path {it['path_distance']}"
        if "rank_distance" in it:
            dist += f", rank steps {it['rank_distance']}"
        cells.append(
            f'<div class="mistake">{pic}<div class="txt"><div><span class="tag">{_e(dist)}</span></div>'
            f"<div class=row><span class='lab t'>TRUE</span>{_lineage_html(tax, it['truth'], it['lca'])}</div>"
            f"<div class=row><span class='lab p'>PREDICTED {_pct(it['confidence'], 0)}</span>"
            f"{_lineage_html(tax, it['pred'], it['lca'])}</div>"
            f"<div class='row note'>common ancestor: {_e(tax.names[it['lca']])} · {_e(name)}</div></div></div>")
    return _section("mistakes", f'<div class="gallery">{"".join(cells)}</div>',
                    f"The {len(items)} top-label mistakes whose common ancestor with the truth is highest in the "
                    "tree (then longest path, then most confident). Grey: the part of the lineage both share.")


def _classes(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray) -> str:
    rows = analysis.label_table(tax, probs, truth)
    shown = rows[:MAX_CLASS_ROWS]

    def cell(v: Any, kind: str) -> str:
        if v is None:
            return '<td class=n data-v="-1">–</td>'
        if kind == "pct":
            cls = " bad" if v < 0.5 else (" good" if v >= 0.9 else "")
            return f'<td class="n{cls}" data-v="{v:.6f}">{_pct(v)}</td>'
        if kind == "f":
            return f'<td class=n data-v="{v:.6f}">{_num(v, 2)}</td>'
        return f'<td class=n data-v="{v}">{v}</td>'

    def row(r: dict[str, Any]) -> str:
        confused = _e(r["confused_with"] or "–") + (f" ({r['confused_count']})" if r["confused_count"] else "")
        return (f'<tr><td data-v="{_e(r["name"])}">{_e(r["name"])}</td>{cell(r["support"], "i")}'
                f'{cell(r["n_pred"], "i")}{cell(r["precision"], "pct")}{cell(r["recall"], "pct")}'
                f'{cell(r["f1"], "pct")}<td data-v="{_e(r["confused_with"] or "")}">{confused}</td>'
                f'{cell(r["mistake_severity"], "f")}</tr>')

    body = "".join(row(r) for r in shown)
    head = ("<tr><th>label</th><th class=n>support</th><th class=n>predicted</th><th class=n>precision</th>"
            "<th class=n>recall</th><th class=n>F1</th><th>most often mistaken for</th>"
            "<th class=n>mistake severity</th></tr>")
    sub = ("Top label against label truths, worst F1 first; click a column title to sort. Mistake severity: mean "
           "height of the common ancestor of the class's wrong answers.")
    if len(rows) > len(shown):
        sub += f" The {len(shown)} worst of {len(rows)} classes are shown."
    return _section("classes", f'<table class="sortable"><thead>{head}</thead><tbody>{body}</tbody></table>', sub)


def write_report(source: str | Path | EvalRecord, out: str | Path | None = None, **options: Any) -> Path:
    """Build the report of an evaluation folder (or a loaded record) and write it (default
    ``<eval dir>/report.html``). ``options`` go to :func:`build_report`."""
    rec = source if isinstance(source, EvalRecord) else load_eval_dir(source)
    path = Path(out) if out else rec.path / FILES["report"]
    return atomic_write_text(path, build_report(rec, **options))


__all__ = ["SECTIONS", "build_report", "write_report", "thumbnail_uri"]
