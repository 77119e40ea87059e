"""Benchmark: taxonomist's vectorised metrics and decisions against naive reference implementations.

    .venv/bin/python bench/bench_metrics.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_metrics.py --quick    # 10x smaller, for a smoke test

Every naive reference runs in the same process on the same inputs, and every
value is checked for identity (exact node ids; floats to 1e-9) before a time is
printed. Inputs:

* metrics: the real FathomNet 2025 tree (7 ranks, 81 mixed-rank labels),
  100,000 synthetic samples: peaked softmax outputs with the truth drawn from
  the predicted distribution (calibrated), 25 % of truths cut back to a random
  ancestor (partial labels), 2 % unknown;
* CRM and the second metrics row: a 1,010-species tree with the 7 standard
  ranks sampled from the real NCBI taxonomy (like iNat19's 1,010 classes),
  2,000 random probability rows (for the metrics, drawn as above, with truths).

Naive references: pure-Python loops over samples with explicit ancestor sets
(the way hierarchical metrics are usually written) computing every key that
``compute_metrics`` returns, the exact hAURC among them (its events collected
per sample and sorted in Python), HiClass's hP/hR/hF when installed, hAURC
by looping over thresholds (as the reference code of Goren et al. does), CRM via a label x node distance matrix built with Python loops (as
published CRM/Making-Better-Mistakes code does) or with numpy, then p @ D.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from taxonomist.decide import FATHOMNET_THRESHOLDS, decide, expected_distances
from taxonomist.metrics import compute_metrics, haurc, hierarchical_prf, risk_coverage_curve
from taxonomist.taxonomy import Taxonomy, load

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data"
RANKS7 = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


# ------------------------------------------------------------------ inputs
def synthetic(tax: Taxonomy, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, tax.n_labels)) * 2.0
    z[np.arange(n), rng.integers(0, tax.n_labels, n)] += 4.0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    cum = p.cumsum(axis=1)
    idx = np.minimum((cum < rng.random(n)[:, None] * cum[:, -1:]).sum(axis=1), tax.n_labels - 1)
    truth = tax.label_ids[idx]
    d = tax.depth[truth]
    cut = (rng.random(n) < 0.25) & (d > 1)
    up = rng.integers(1, np.maximum(d, 2))
    truth = np.where(cut, tax.ancestor_at_depth(truth, up), truth)
    truth[rng.random(n) < 0.02] = -1
    return p, truth


def ncbi_species_tree(n_species: int, seed: int) -> Taxonomy:
    """``n_species`` species with all 7 standard ranks, sampled from the NCBI taxonomy dump."""
    import pandas as pd

    path = SHARED / "taxonomies" / "ncbi_taxonomy_2024-09-07.tsv.gz"
    with gzip.open(path, "rt") as fh:
        df = pd.read_csv(fh, sep="\t", dtype={"tax_id": np.int64, "parent_tax_id": np.int64, "rank": str,
                                              "scientific_name": str}, keep_default_na=False)
    parent = dict(zip(df["tax_id"].to_numpy(), df["parent_tax_id"].to_numpy()))
    rank = dict(zip(df["tax_id"].to_numpy(), df["rank"].to_numpy()))
    name = dict(zip(df["tax_id"].to_numpy(), df["scientific_name"].to_numpy()))
    species = df["tax_id"].to_numpy()[df["rank"].to_numpy() == "species"]
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    for sp in rng.permutation(species):
        lineage, v = {}, int(sp)
        while True:
            r = rank[v]
            if r in RANKS7 and r not in lineage:
                lineage[r] = v
            if parent[v] == v:
                break
            v = int(parent[v])
        if len(lineage) == 7:
            rows.append([lineage[r] for r in RANKS7])
            if len(rows) == n_species:
                break
    ids: dict[int, int] = {}
    par, names, ranks, keys = [-1], ["root"], [""], ["root"]
    for row in rows:
        prev = 0
        for r, tid in zip(RANKS7, row):
            if tid not in ids:
                ids[tid] = len(par)
                par.append(prev), names.append(name[tid]), ranks.append(r), keys.append(str(tid))
            prev = ids[tid]
    return Taxonomy.from_parents(par, names, ranks=ranks, keys=keys, rank_order=RANKS7)


# ------------------------------------------------------------------ naive references
class NaiveTree:
    """Tree facts as Python lists and sets, computed with loops from the parent array."""

    def __init__(self, tax: Taxonomy):
        self.tax = tax
        self.parent = tax.parent.tolist()
        self.n = len(self.parent)
        self.path = []  # ancestors-or-self, root excluded, root-first
        for v in range(self.n):
            p, u = [], v
            while u > 0:
                p.append(u)
                u = self.parent[u]
            self.path.append(p[::-1])
        self.anc = [set(p) for p in self.path]
        kids = [[] for _ in range(self.n)]
        for v in range(1, self.n):
            kids[self.parent[v]].append(v)
        self.height = [0] * self.n
        self.leaves_under = [0] * self.n
        for v in range(self.n):
            if not kids[v]:
                u, h = v, 0
                while u >= 0:
                    self.height[u] = max(self.height[u], h)
                    self.leaves_under[u] += 1
                    u, h = self.parent[u], h + 1
        self.n_leaves = sum(1 for k in kids if not k)
        self.labels = tax.label_ids.tolist()
        self.rank = [str(r) for r in tax.ranks]

    def lca_depth(self, a: int, b: int) -> int:
        return len(self.anc[a] & self.anc[b])

    def lca(self, a: int, b: int) -> int:
        pa, pb = self.path[a], self.path[b]
        k = 0
        while k < len(pa) and k < len(pb) and pa[k] == pb[k]:
            k += 1
        return pa[k - 1] if k else 0

    def d_h(self, a: int, b: int) -> int:
        return 0 if a == b else self.height[self.lca(a, b)]

    def rank_steps(self, a: int, b: int, ranks: set[str]) -> int:
        return sum(1 for v in self.anc[a] ^ self.anc[b] if self.rank[v] in ranks)


def naive_metrics(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, k: int = 5) -> dict[str, float]:
    t = NaiveTree(tax)
    levels = list(tax.rank_order)
    level_nodes = {r: [v for v in range(t.n) if t.rank[v] == r] for r in levels}
    rankset = set(levels)
    out: dict[str, float] = {}
    n_lab = top1 = topk = 0
    sev, hd1, hdk, conf, corr = [], [], [], [], []
    inter = sa = sb = 0
    ps, rs, fs, paths, rsteps = [], [], [], [], []
    lvl = {r: {"n": 0, "h1": 0, "hk": 0, "tp": {}, "sup": {}, "np": {}, "conf": [], "corr": []} for r in levels}
    viol = 0
    n_unknown = n_partial = 0
    cov = [1 - math.log2(u) / math.log2(t.n_leaves) for u in t.leaves_under] if t.n_leaves > 1 else None
    events = []  # (threshold, coverage change, correctness change) of the climbing rule, per known sample
    for row, tr in zip(probs.tolist(), truth.tolist()):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        top = t.labels[order[0]]
        # node probabilities by walking up from every label
        npb = [0.0] * t.n
        for i, lab in enumerate(t.labels):
            pv = row[i]
            npb[0] += pv
            for v in t.path[lab]:
                npb[v] += pv
        if tr <= 0:
            n_unknown += 1
        elif not tax.is_label[tr]:
            n_partial += 1
        if tr > 0 and cov is not None:
            # climbing from the top label: masses along its lineage, made non-increasing towards the leaf
            line = [0] + t.path[top]
            mass = [npb[v] for v in line]
            for d in range(len(mass) - 2, -1, -1):
                mass[d] = max(mass[d], mass[d + 1])
            ok = [v == 0 or v in t.anc[tr] for v in line]
            for d in range(1, len(line)):
                events.append((mass[d], cov[line[d]] - cov[line[d - 1]], int(ok[d]) - int(ok[d - 1])))
        preds_by_level = []
        for r in levels:
            nodes = sorted(level_nodes[r], key=lambda v: (-npb[v], v))
            preds_by_level.append(nodes[0] if nodes else -1)
            if tr <= 0:
                continue
            tl = next((v for v in ([0] + t.path[tr]) if t.rank[v] == r), -1)
            if tl < 0 or not nodes:
                continue
            s = lvl[r]
            s["n"] += 1
            s["h1"] += nodes[0] == tl
            s["hk"] += tl in nodes[:k]
            s["sup"][tl] = s["sup"].get(tl, 0) + 1
            s["np"][nodes[0]] = s["np"].get(nodes[0], 0) + 1
            if nodes[0] == tl:
                s["tp"][tl] = s["tp"].get(tl, 0) + 1
            s["conf"].append(npb[nodes[0]])
            s["corr"].append(nodes[0] == tl)
        chain = [v for v in preds_by_level if v >= 0]
        viol += any(not (a == 0 or a in t.anc[b]) for a, b in zip(chain, chain[1:]))
        if tr <= 0:
            continue
        a, b = t.anc[top], t.anc[tr]
        i = len(a & b)
        inter, sa, sb = inter + i, sa + len(a), sb + len(b)
        pi, ri = (i / len(a) if a else 1.0), i / len(b)
        ps.append(pi), rs.append(ri), fs.append(2 * pi * ri / (pi + ri) if pi + ri else 0.0)
        paths.append(len(a ^ b))
        rsteps.append(t.rank_steps(top, tr, rankset))
        if tax.is_label[tr]:
            preds = [t.labels[j] for j in order[:k]]
            n_lab += 1
            top1 += preds[0] == tr
            topk += tr in preds
            if preds[0] != tr:
                sev.append(t.d_h(preds[0], tr))
            hd1.append(t.d_h(preds[0], tr))
            hdk.append(sum(t.d_h(p, tr) for p in preds) / len(preds))
            conf.append(row[order[0]])
            corr.append(preds[0] == tr)
    n_known = len(probs) - n_unknown
    out.update(n_samples=len(probs), n_unknown=n_unknown, n_label_truth=n_known - n_partial,
               n_partial_truth=n_partial)
    if cov is not None:  # exact hierarchical risk-coverage curve: events by threshold, ties pooled
        events.sort(key=lambda e: -e[0])
        x = y = area = c_cov = c_cor = 0.0
        for i, (theta, dc, dk) in enumerate(events):
            c_cov += dc
            c_cor += dk
            if i + 1 == len(events) or events[i + 1][0] != theta:
                nx, ny = c_cov / n_known, -c_cor / n_known
                area += (nx - x) * (y + ny) / 2
                x, y = nx, ny
        out["haurc"] = area
    out["top1_error"] = 1 - top1 / n_lab
    out[f"top{k}_error"] = 1 - topk / n_lab
    out["mistake_severity"] = sum(sev) / len(sev)
    out["hdist@1"] = sum(hd1) / len(hd1)
    out[f"hdist@{k}"] = sum(hdk) / len(hdk)
    out["ece"] = naive_ece(conf, corr)
    hp, hr = inter / sa, inter / sb
    out.update(hp=hp, hr=hr, hf=2 * hp * hr / (hp + hr), hp_macro=sum(ps) / len(ps), hr_macro=sum(rs) / len(rs),
               hf_macro=sum(fs) / len(fs), mean_path_distance=sum(paths) / len(paths),
               mean_rank_distance=sum(rsteps) / len(rsteps))
    for r in levels:
        s = lvl[r]
        out[f"{r}/n"] = s["n"]
        out[f"{r}/n_excluded"] = n_known - s["n"]
        out[f"{r}/top1"] = s["h1"] / s["n"]
        out[f"{r}/top{k}"] = s["hk"] / s["n"]
        out[f"{r}/balanced_accuracy"] = sum(s["tp"].get(c, 0) / m for c, m in s["sup"].items()) / len(s["sup"])
        classes = set(s["sup"]) | set(s["np"])
        out[f"{r}/macro_f1"] = sum(2 * s["tp"].get(c, 0) / (s["sup"].get(c, 0) + s["np"].get(c, 0))
                                   for c in classes) / len(classes)
        out[f"{r}/ece"] = naive_ece(s["conf"], s["corr"])
    out["rank_violation_rate"] = viol / len(probs)
    return out


def naive_ece(conf: list[float], corr: list[bool], n_bins: int = 15) -> float:
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]
    for c, k in zip(conf, corr):
        b = min(max(math.ceil(c * n_bins) - 1, 0), n_bins - 1)
        # (lo, hi] bins, guarding against c * n_bins rounding across an edge
        while b > 0 and c <= b / n_bins:
            b -= 1
        while b < n_bins - 1 and c > (b + 1) / n_bins:
            b += 1
        sums[b][0] += 1
        sums[b][1] += c
        sums[b][2] += k
    return sum(abs(s[2] - s[1]) for s in sums if s[0]) / len(conf)


def naive_threshold(tax: Taxonomy, probs: np.ndarray, thresholds: dict[str, float]) -> list[int]:
    t = NaiveTree(tax)
    out = []
    for row in probs.tolist():
        npb = [0.0] * t.n
        for i, lab in enumerate(t.labels):
            for v in t.path[lab]:
                npb[v] += row[i]
        v = t.labels[max(range(len(row)), key=lambda i: (row[i], -i))]
        while v > 0:
            u = v  # an unranked node uses its nearest ranked ancestor's threshold
            while not t.rank[u] and u > 0:
                u = t.parent[u]
            thr = thresholds.get(t.rank[u] or tax.rank_order[0])
            if thr is not None and npb[v] >= thr:
                break
            v = t.parent[v]
        out.append(v)
    return out


def naive_haurc_by_threshold_loop(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray) -> float:
    """Goren et al.'s procedure: for every threshold, climb every sample, score coverage and risk."""
    keep = truth > 0
    probs, truth = probs[keep], truth[keep]
    node_p = tax.node_probabilities(probs)
    start = tax.label_ids[probs.argmax(axis=1)]
    anc = tax.ancestor_matrix(start)
    masses = np.take_along_axis(node_p, np.maximum(anc, 0), axis=1)
    masses = np.where(anc >= 0, masses, -np.inf)
    masses = np.maximum.accumulate(masses[:, ::-1], axis=1)[:, ::-1]  # same monotone masses as taxonomist
    thetas = np.unique(masses[anc > 0])[::-1]
    cov_node = 1 - np.log2(tax.n_leaves_under) / math.log2(len(tax.leaves))
    rows = np.arange(len(truth))
    pts = [(0.0, 0.0)]
    for th in thetas:
        ok = (anc >= 0) & ((masses >= th) | (np.arange(anc.shape[1]) == 0))
        depth = anc.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
        node = anc[rows, depth]
        pts.append((cov_node[node].mean(), 1 - tax.is_ancestor(node, truth).mean()))
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def naive_crm(tax: Taxonomy, probs: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Label x node distance matrix with Python loops, then expected cost p @ D and argmin."""
    t = NaiveTree(tax)
    rankset = set(tax.rank_order)
    d = np.empty((len(t.labels), t.n))
    for i, lab in enumerate(t.labels):
        for c in range(t.n):
            if metric == "path":
                d[i, c] = len(t.path[lab]) + len(t.path[c]) - 2 * t.lca_depth(lab, c)
            elif metric == "lca_height":
                d[i, c] = t.d_h(lab, c)
            else:
                d[i, c] = t.rank_steps(lab, c, rankset)
    cost = probs @ d
    return cost.argmin(axis=1), cost


def numpy_matrix_crm(tax: Taxonomy, probs: np.ndarray, metric: str) -> np.ndarray:
    """Dense distance matrix over all nodes (numpy, level by level), then p @ D[labels] and argmin."""
    d = tax.distance_matrix(np.arange(tax.n_nodes), metric=metric)[tax.label_ids].astype(np.float64)
    return (probs @ d).argmin(axis=1)


# ------------------------------------------------------------------ driver
def timed(fn, *args, repeat: int = 1, **kw):
    """Result and (wall seconds, CPU seconds of this process), the best of ``repeat`` runs."""
    best, out = (math.inf, math.inf), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0), key=lambda x: x[1])
    return out, best


def close(a: float | None, b: float | None, tol: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def row(name: str, n: str, fast: tuple[float, float], slow: tuple[float, float], same: bool) -> None:
    print(f"| {name} | {n} | {fast[0]:.3f} / {fast[1]:.3f} | {slow[0]:.2f} / {slow[1]:.2f} | "
          f"{slow[1] / fast[1]:,.0f}x | {'yes' if same else 'NO'} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="samples for the metrics benchmark")
    ap.add_argument("--crm-n", type=int, default=2_000, help="samples for the CRM benchmark")
    ap.add_argument("--crm-species", type=int, default=1_010, help="species (labels) in the NCBI-derived tree")
    ap.add_argument("--haurc-n", type=int, default=5_000, help="samples for the threshold-loop hAURC reference")
    ap.add_argument("--quick", action="store_true", help="10x fewer samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.crm_n, args.haurc_n = args.n // 10, args.crm_n // 10, args.haurc_n // 10
    all_same = True
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cpu(s): {platform.processor() or platform.platform()}")
    print("\ntimes: wall / CPU seconds of this process (best of 2-3 runs for taxonomist, one run for the naive code);"
          " speed-up = naive CPU / taxonomist CPU")
    print("\n| what | samples | taxonomist wall / CPU (s) | naive wall / CPU (s) | speed-up | identical |")
    print("|---|---|---|---|---|---|")

    fn_tax = load(SHARED / "taxonomies" / "fathomnet2025_lineage.csv")
    probs, truth = synthetic(fn_tax, args.n, args.seed)
    n_txt = f"{args.n:,} x {fn_tax.n_labels} labels, 7 ranks"

    def metrics_row(tax: Taxonomy, p: np.ndarray, t: np.ndarray, n_txt: str, repeat: int) -> tuple:
        fast, t_fast = timed(compute_metrics, tax, p, t, repeat=repeat)
        slow, t_slow = timed(naive_metrics, tax, p, t)
        same = set(slow) == set(fast) and all(close(fast[k], v) for k, v in slow.items())
        for k, v in slow.items():
            if not close(fast.get(k), v):
                print(f"  mismatch {k}: taxonomist {fast.get(k)} naive {v}")
        row(f"compute_metrics, all {len(fast)} keys vs Python loops computing the same {len(slow)} (hAURC included)",
            n_txt, t_fast, t_slow, same)
        return fast, t_fast, same

    fast, t_fast, same = metrics_row(fn_tax, probs, truth, n_txt, repeat=5)
    all_same &= same

    tax_top = fn_tax.label_ids[probs.argmax(1)]
    _, t_prf = timed(hierarchical_prf, fn_tax, tax_top, truth, repeat=3)
    try:
        import hiclass.metrics as hc
    except ImportError:
        print("| hP/hR/hF vs HiClass | - | - | - | - | skipped: hiclass not installed |")
    else:
        keep = truth > 0
        tv = NaiveTree(fn_tax)

        def names(v: int) -> list[str]:
            return [str(fn_tax.names[u]) for u in tv.path[v]]
        yt = [names(v) for v in truth[keep].tolist()]
        yp = [names(v) for v in tax_top[keep].tolist()]

        def hiclass_all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return {"hp": hc.precision(yt, yp), "hr": hc.recall(yt, yp), "hf": hc.f1(yt, yp),
                        "hp_macro": hc.precision(yt, yp, "macro"), "hr_macro": hc.recall(yt, yp, "macro"),
                        "hf_macro": hc.f1(yt, yp, "macro")}
        ref, t_hc = timed(hiclass_all)
        ours = hierarchical_prf(fn_tax, tax_top, truth)
        same = all(close(ours[k], float(v)) for k, v in ref.items())
        all_same &= same
        row("hP/hR/hF micro+macro vs HiClass 5 (name paths; names unique here)", f"{int(keep.sum()):,}",
            t_prf, t_hc, same)

    sub = slice(0, args.haurc_n)
    fast_h, t_h = timed(haurc, fn_tax, probs[sub], truth[sub], repeat=3)
    slow_h, t_hs = timed(naive_haurc_by_threshold_loop, fn_tax, probs[sub], truth[sub])
    n_pts = len(risk_coverage_curve(fn_tax, probs[sub], truth[sub])["coverage"])
    same = close(fast_h, slow_h)
    all_same &= same
    row(f"hAURC, exact curve ({n_pts:,} thresholds) vs a loop over thresholds", f"{args.haurc_n:,}", t_h, t_hs, same)

    dec, t_d = timed(decide, fn_tax, probs, "threshold", threshold=FATHOMNET_THRESHOLDS, repeat=3)
    ref_nodes, t_ds = timed(naive_threshold, fn_tax, probs, FATHOMNET_THRESHOLDS)
    same = bool((dec.node == np.array(ref_nodes)).all())
    all_same &= same
    row("threshold back-off, FathomNet per-rank thresholds vs Python climb", f"{args.n:,}", t_d, t_ds, same)

    t0 = time.perf_counter()
    ncbi = ncbi_species_tree(args.crm_species, args.seed)
    t_build = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    z = rng.normal(size=(args.crm_n, ncbi.n_labels)) * 2.0
    cp = np.exp(z - z.max(axis=1, keepdims=True))
    cp /= cp.sum(axis=1, keepdims=True)
    c_txt = f"{args.crm_n:,} x {ncbi.n_labels:,} labels, {ncbi.n_nodes:,} candidate nodes"
    # every metric on the CRM-sized case: 2,000 rows over 1,010 species (truths as for FathomNet above)
    np_, nt_ = synthetic(ncbi, args.crm_n, args.seed + 2)
    _, t_big, same = metrics_row(ncbi, np_, nt_, f"{args.crm_n:,} x {ncbi.n_labels:,} labels, 7 ranks", repeat=3)
    all_same &= same
    for metric in ("path", "lca_height", "rank_steps"):
        d, t_c = timed(decide, ncbi, cp, "crm", metric=metric, repeat=3)
        (nodes, cost), t_cs = timed(naive_crm, ncbi, cp, metric)
        # identical choice, or an exact tie in expected cost
        rows = np.arange(len(cp))
        same = bool(np.all((d.node == nodes) | np.isclose(cost[rows, d.node], cost[rows, nodes], atol=1e-9)))
        same &= bool(np.allclose(expected_distances(ncbi, cp[:50], metric), cost[:50], atol=1e-9))
        all_same &= same
        row(f"CRM over all nodes, {metric} vs Python-loop distance matrix + p @ D", c_txt, t_c, t_cs, same)
        nodes_np, t_np = timed(numpy_matrix_crm, ncbi, cp, metric)
        same = bool(np.all((d.node == nodes_np) | np.isclose(cost[rows, d.node], cost[rows, nodes_np], atol=1e-9)))
        all_same &= same
        row(f"CRM over all nodes, {metric} vs numpy distance matrix + p @ D", c_txt, t_c, t_np, same)
    print(f"\nNCBI-derived tree: {ncbi} (sampled from the 2.6 M-taxon dump in {t_build:.1f} s, not timed above)")
    print(f"compute_metrics on {args.n:,} samples: {t_fast[0]:.3f} s wall, {t_fast[1]:.3f} s CPU; keys: {len(fast)}")
    print("all values identical" if all_same else "SOME VALUES DIFFER")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
