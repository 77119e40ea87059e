"""Metrics against slow, independent references (loops over samples, explicit ancestor sets)
on the real trees: NDSB plankton (unranked, internal labels), FathomNet 2025 (7 ranks,
mixed-rank labels) and CIFAR-100 (5 balanced levels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_metrics_trees import RANKS7, mixed_truth, random_probs, real_trees

from taxonomist.errors import DataError
from taxonomist.metrics import (
    compute_metrics,
    darts_curve,
    expected_calibration_error,
    haurc,
    hierarchical_distance_at_k,
    hierarchical_prf,
    mean_rank_distance,
    mistake_severity,
    path_violations,
    per_class_report,
    ranked_distances,
    reliability_by_level,
    reliability_diagram,
    risk_coverage_curve,
)
from taxonomist.taxonomy import Taxonomy

N = 300


# ----------------------------------------------------------------- slow reference
class Ref:
    """Tree facts recomputed with plain Python loops from the parent array only."""

    def __init__(self, tax: Taxonomy):
        self.tax = tax
        self.parent = [int(x) for x in tax.parent]
        self.n = len(self.parent)
        self.anc = []  # ancestors-or-self, root excluded
        for v in range(self.n):
            s, u = [], v
            while u > 0:
                s.append(u)
                u = self.parent[u]
            self.anc.append(set(s))
        children = [[] for _ in range(self.n)]
        for v in range(1, self.n):
            children[self.parent[v]].append(v)
        self.height = [0] * self.n
        for v in range(self.n):  # walk up from every leaf
            if not children[v]:
                u, h = v, 0
                while u >= 0:
                    self.height[u] = max(self.height[u], h)
                    u, h = self.parent[u], h + 1
        self.leaves_under = [0] * self.n
        for v in range(self.n):
            if not children[v]:
                u = v
                while u >= 0:
                    self.leaves_under[u] += 1
                    u = self.parent[u]
        self.n_leaves = sum(1 for v in range(self.n) if not children[v])
        self.labels = [int(x) for x in tax.label_ids]

    def lca(self, a: int, b: int) -> int:
        common = self.anc[a] & self.anc[b]
        return max(common, key=lambda v: len(self.anc[v])) if common else 0

    def d_h(self, a: int, b: int) -> int:
        return 0 if a == b else self.height[self.lca(a, b)]

    def path(self, a: int, b: int) -> int:
        return len(self.anc[a] ^ self.anc[b])

    def rank_steps(self, a: int, b: int, ranks) -> int:
        return sum(1 for v in self.anc[a] ^ self.anc[b] if self.tax.ranks[v] in ranks)

    def node_probs(self, p_row) -> list[float]:
        out = [0.0] * self.n
        for i, l in enumerate(self.labels):
            out[0] += p_row[i]
            for v in self.anc[l]:
                out[v] += p_row[i]
        return out

    def level_of(self, v: int, level) -> int:
        """Ancestor-or-self of v at a level: a rank name, or an int depth for unranked trees.

        The root counts when it carries the rank (FathomNet's single kingdom is the root)."""
        for u in self.anc[v] | {0}:
            if (self.tax.ranks[u] == level) if isinstance(level, str) else (len(self.anc[u]) == level):
                return u
        return -1

    def coverage(self, v: int) -> float:
        return 1 - math.log2(self.leaves_under[v]) / math.log2(self.n_leaves)


def levels_of(tax: Taxonomy):
    if tax.has_ranks:
        return list(tax.rank_order), list(tax.rank_order)
    return tax.level_names(), list(range(1, tax.max_depth + 1))


def ranked_labels(row) -> list[int]:
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def ece_ref(conf, corr, n_bins=15):
    bins = [[] for _ in range(n_bins)]
    for c, k in zip(conf, corr):
        b = 0
        while b < n_bins - 1 and not (c <= (b + 1) / n_bins):
            b += 1
        bins[b].append((c, k))
    total = 0.0
    for b in bins:
        if b:
            total += len(b) / len(conf) * abs(sum(k for _, k in b) / len(b) - sum(c for c, _ in b) / len(b))
    return total


def reference_metrics(tax: Taxonomy, probs: np.ndarray, truth: np.ndarray, k: int = 5) -> dict:
    ref = Ref(tax)
    names, levels = levels_of(tax)
    out: dict = {}
    lab = ref.labels
    # label level
    top1 = topk = n_lab = 0
    sev, hd1, hdk, conf, corr = [], [], [], [], []
    for row, t in zip(probs, truth):
        t = int(t)
        if t <= 0 or not tax.is_label[t]:
            continue
        order = ranked_labels(list(row))
        preds = [lab[i] for i in order[:k]]
        n_lab += 1
        top1 += preds[0] == t
        topk += t in preds
        if preds[0] != t:
            sev.append(ref.d_h(preds[0], t))
        hd1.append(ref.d_h(preds[0], t))
        hdk.append(sum(ref.d_h(p, t) for p in preds) / len(preds))
        conf.append(float(row[order[0]]))
        corr.append(preds[0] == t)
    out["top1_error"] = 1 - top1 / n_lab
    out[f"top{k}_error"] = 1 - topk / n_lab
    out["mistake_severity"] = sum(sev) / len(sev)
    out["hdist@1"] = sum(hd1) / len(hd1)
    out[f"hdist@{k}"] = sum(hdk) / len(hdk)
    out["ece"] = ece_ref(conf, corr)
    # node level: top label vs truth at any depth
    inter = sa = sb = 0
    ps, rs, fs, paths, rsteps = [], [], [], [], []
    for row, t in zip(probs, truth):
        t = int(t)
        if t <= 0:
            continue
        p = lab[ranked_labels(list(row))[0]]
        a, b = ref.anc[p], ref.anc[t]
        i = len(a & b)
        inter, sa, sb = inter + i, sa + len(a), sb + len(b)
        pi, ri = i / len(a), i / len(b)
        ps.append(pi), rs.append(ri), fs.append(2 * pi * ri / (pi + ri) if pi + ri else 0.0)
        paths.append(ref.path(p, t))
        if tax.has_ranks:
            rsteps.append(ref.rank_steps(p, t, set(tax.rank_order)))
    hp, hr = inter / sa, inter / sb
    out.update(hp=hp, hr=hr, hf=2 * hp * hr / (hp + hr), hp_macro=np.mean(ps), hr_macro=np.mean(rs),
               hf_macro=np.mean(fs), mean_path_distance=np.mean(paths))
    if tax.has_ranks:
        out["mean_rank_distance"] = np.mean(rsteps)
    # per level
    node_probs = [ref.node_probs(list(row)) for row in probs]
    level_preds = []
    for name, level in zip(names, levels):
        nodes = [v for v in range(ref.n) if ((tax.ranks[v] == level) if isinstance(level, str)
                                              else len(ref.anc[v]) == level)]
        preds_here = []
        hits1 = hitsk = 0
        tp, sup, npred = {}, {}, {}
        lconf, lcorr = [], []
        for npb, t in zip(node_probs, truth):
            order = sorted(nodes, key=lambda v: (-npb[v], v))
            preds_here.append(order[0] if order else -1)
            t = int(t)
            if t <= 0:
                continue
            tl = ref.level_of(t, level)
            if tl < 0:
                continue
            hits1 += order[0] == tl
            hitsk += tl in order[:k]
            sup[tl] = sup.get(tl, 0) + 1
            npred[order[0]] = npred.get(order[0], 0) + 1
            if order[0] == tl:
                tp[tl] = tp.get(tl, 0) + 1
            lconf.append(npb[order[0]])
            lcorr.append(order[0] == tl)
        level_preds.append(preds_here)
        n_in = len(lconf)
        out[f"{name}/n"] = n_in
        out[f"{name}/top1"] = hits1 / n_in
        out[f"{name}/top{k}"] = hitsk / n_in
        out[f"{name}/balanced_accuracy"] = np.mean([tp.get(c, 0) / s for c, s in sup.items()])
        classes = set(sup) | set(npred)
        out[f"{name}/macro_f1"] = np.mean([2 * tp.get(c, 0) / (sup.get(c, 0) + npred.get(c, 0)) for c in classes])
        out[f"{name}/ece"] = ece_ref(lconf, lcorr)
    # violations: consecutive per-level argmax nodes must be ancestor/descendant
    bad = 0
    for s in range(len(probs)):
        chain = [lp[s] for lp in level_preds if lp[s] >= 0]
        bad += any(not (a == 0 or a in ref.anc[b]) for a, b in zip(chain, chain[1:]))
    out["rank_violation_rate"] = bad / len(probs)
    return out


@pytest.fixture(scope="module")
def trees(shared_data):
    return real_trees(shared_data)


@pytest.fixture(scope="module", params=["plankton", "fathomnet", "cifar"])
def case(request, trees):
    tax = trees[request.param]
    rng = np.random.default_rng(hash(request.param) % 2**32)
    probs = random_probs(rng, N, tax.n_labels, sharp=2.5)
    truth = mixed_truth(rng, tax, probs, p_partial=0.3, p_unknown=0.05)
    return request.param, tax, probs, truth


# ------------------------------------------------------------------------- tests
def test_compute_metrics_matches_reference(case):
    name, tax, probs, truth = case
    got = compute_metrics(tax, probs, truth)
    want = reference_metrics(tax, probs, truth)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), f"{name}: {key}"
    # the counts add up and the output is plain JSON
    assert got["n_samples"] == N
    assert got["n_unknown"] + got["n_label_truth"] + got["n_partial_truth"] == N
    assert got["n_partial_truth"] > 0 and got["n_unknown"] > 0
    json.loads(json.dumps(got, allow_nan=False))
    assert all(type(v) in (int, float) or v is None for v in got.values())
    # every known sample reaching a level is counted there, the others excluded
    for lv in levels_of(tax)[0]:
        assert got[f"{lv}/n"] + got[f"{lv}/n_excluded"] == N - got["n_unknown"]


def test_ties_follow_stable_order(case):
    # probabilities in multiples of 1/8 (exact in binary): many ties, broken by the lower label / node id
    name, tax, _, truth = case
    rng = np.random.default_rng(17)
    probs = rng.multinomial(8, np.full(tax.n_labels, 1 / tax.n_labels), size=N) / 8.0
    got = compute_metrics(tax, probs, truth)
    want = reference_metrics(tax, probs, truth)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), f"{name}: {key}"


def test_reliability_by_level_agrees_with_ece(case):
    _, tax, probs, truth = case
    m = compute_metrics(tax, probs, truth)
    diagrams = reliability_by_level(tax, probs, truth)
    for key, d in diagrams.items():
        n = sum(d["count"])
        ece = sum(c * abs(a - f) for c, a, f in zip(d["count"], d["accuracy"], d["confidence"]) if c) / n
        assert ece == pytest.approx(m["ece" if key == "label" else f"{key}/ece"]), key
        assert n == (m["n_label_truth"] if key == "label" else m[f"{key}/n"])


def test_stable_keys(case):
    _, tax, probs, truth = case
    got = compute_metrics(tax, probs, truth)
    required = ["top1_error", "top5_error", "mistake_severity", "hdist@1", "hdist@5", "mean_path_distance",
                "hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro", "ece", "haurc", "n_samples",
                "rank_violation_rate"]
    if tax.has_ranks:
        required.append("mean_rank_distance")
    for lv in levels_of(tax)[0]:
        required += [f"{lv}/top1", f"{lv}/top5", f"{lv}/balanced_accuracy", f"{lv}/macro_f1", f"{lv}/ece"]
    missing = [k for k in required if k not in got]
    assert not missing
    assert got["hdist@1"] == pytest.approx(got["top1_error"] * got["mistake_severity"])


def test_public_label_level_functions_equal_compute_metrics(case):
    """One definition: the public mistake_severity / hierarchical_distance_at_k give compute_metrics'
    values on the same data (partial truths included in the input), and both leave partial truths out."""
    name, tax, probs, truth = case
    ref = Ref(tax)
    m = compute_metrics(tax, probs, truth)
    ranked = tax.label_ids[np.argsort(-probs, axis=1, kind="stable")[:, :5]]
    assert m["n_partial_truth"] > 0
    assert mistake_severity(tax, ranked[:, 0], truth) == pytest.approx(m["mistake_severity"], rel=1e-12)
    assert hierarchical_distance_at_k(tax, ranked[:, :1], truth) == pytest.approx(m["hdist@1"], rel=1e-12)
    assert hierarchical_distance_at_k(tax, ranked, truth) == pytest.approx(m["hdist@5"], rel=1e-12)
    # the definition, by hand: label truths only
    lab = [i for i, t in enumerate(truth) if t > 0 and tax.is_label[t]]
    sev = [ref.d_h(int(ranked[i, 0]), int(truth[i])) for i in lab if ranked[i, 0] != truth[i]]
    assert m["mistake_severity"] == pytest.approx(np.mean(sev), rel=1e-12)
    # truths that are all partial: no label-level value (and the public functions agree)
    partial = np.array([t if t > 0 and not tax.is_label[t] else -1 for t in truth])
    assert math.isnan(mistake_severity(tax, ranked[:, 0], partial))
    assert math.isnan(hierarchical_distance_at_k(tax, ranked, partial))
    mp = compute_metrics(tax, probs, partial)
    assert mp["mistake_severity"] is None and mp["hdist@5"] is None and mp["top1_error"] is None
    assert ranked_distances(tax, ranked, truth).shape == (m["n_label_truth"], 5)


def test_contract_keys_whatever_k(case):
    """top1/top5 keys are always there: k=1 or k=3 add nothing and drop nothing of the contract."""
    name, tax, probs, truth = case
    base = compute_metrics(tax, probs, truth)
    for k in (1, 3):
        m = compute_metrics(tax, probs, truth, k=k)
        for key in ("top1_error", "top5_error", "hdist@1", "hdist@5", "mistake_severity", "ece", "haurc"):
            assert m[key] == base[key], (k, key)
        for lv in levels_of(tax)[0]:
            assert m[f"{lv}/top1"] == base[f"{lv}/top1"] and m[f"{lv}/top5"] == base[f"{lv}/top5"]
    m3 = compute_metrics(tax, probs, truth, k=3)
    want = reference_metrics(tax, probs, truth, k=3)
    for key in ("top3_error", "hdist@3"):
        assert m3[key] == pytest.approx(want[key], rel=1e-9), key


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_per_class_report_matches_sklearn(case):
    sk = pytest.importorskip("sklearn.metrics")
    _, tax, probs, truth = case
    ref = Ref(tax)
    names, levels = levels_of(tax)
    rep = per_class_report(tax, probs, truth)
    for name, level in zip(names[-2:], levels[-2:]):
        node_probs = [ref.node_probs(list(r)) for r in probs]
        nodes = rep[name].node.tolist()
        yt, yp = [], []
        for npb, t in zip(node_probs, truth):
            tl = ref.level_of(int(t), level) if t > 0 else -1
            if tl < 0:
                continue
            yt.append(tl)
            yp.append(max(nodes, key=lambda v: (npb[v], -v)))
        assert rep[name].balanced_accuracy() == pytest.approx(sk.balanced_accuracy_score(yt, yp))
        assert rep[name].macro_f1() == pytest.approx(sk.f1_score(yt, yp, average="macro", zero_division=0))
        present = rep[name].support > 0
        rec = sk.recall_score(yt, yp, labels=rep[name].node[present], average=None, zero_division=0)
        np.testing.assert_allclose(rep[name].recall[present], rec)
        json.dumps(rep[name].to_dict())


def test_label_level_excludes_partial_truths(trees):
    tax = trees["fathomnet"]
    genus = next(v for v in range(tax.n_nodes) if tax.ranks[v] == "genus" and not tax.is_label[v])
    species = tax.children(genus)
    probs = np.zeros((2, tax.n_labels))
    probs[:, tax.label_index[species[0]]] = 1.0
    # sample 0 labelled to the species it is predicted as; sample 1 only to its genus
    m = compute_metrics(tax, probs, np.array([species[0], genus]))
    assert m["n_label_truth"] == 1 and m["n_partial_truth"] == 1
    assert m["top1_error"] == 0.0 and m["mistake_severity"] is None
    # node level: the species answer for a genus truth claims one level too many
    d = int(tax.depth[species[0]])
    assert m["hr"] == 1.0 and m["hp"] == pytest.approx((d + d - 1) / (2 * d))
    assert m["genus/top1"] == 1.0 and m["species/n"] == 1 and m["species/n_excluded"] == 1


def test_fathomnet_worked_examples(trees):
    tax = trees["fathomnet"]
    ast = tax.find("Asteronyx", rank="genus")
    lov = tax.find("Asteronyx loveni")
    oph = tax.find("Ophiacanthidae")
    assert mean_rank_distance(tax, [ast], [lov]) == 1.0
    assert mean_rank_distance(tax, [oph], [lov]) == 6.0
    assert mean_rank_distance(tax, [oph, ast], [lov, lov], ranks=RANKS7) == 3.5
    # worst case: two species sharing only the kingdom
    sp = [v for v in tax.label_ids if tax.ranks[v] == "species"]
    worst = max(Ref(tax).rank_steps(a, b, set(RANKS7)) for a in sp for b in sp)
    assert worst == 12


def test_rank_distance_skips_unlisted_ranks(trees):
    tax = trees["fathomnet"]
    ref = Ref(tax)
    rng = np.random.default_rng(3)
    a = rng.integers(1, tax.n_nodes, 500)
    b = rng.integers(1, tax.n_nodes, 500)
    ranks = ["phylum", "family", "species"]
    want = np.mean([ref.rank_steps(int(x), int(y), set(ranks)) for x, y in zip(a, b)])
    assert mean_rank_distance(tax, a, b, ranks=ranks) == pytest.approx(want)


# ---------------------------------------------------------------- hP / hR / hF
def test_hierarchical_prf_matches_hiclass(trees):
    hc = pytest.importorskip("hiclass.metrics", reason="hiclass not installed (pip install hiclass)")
    import warnings
    for name in ("fathomnet", "cifar", "plankton"):
        tax = trees[name]
        ref = Ref(tax)
        rng = np.random.default_rng(11)
        pred = rng.integers(1, tax.n_nodes, 400)
        truth = rng.integers(1, tax.n_nodes, 400)

        def path_names(v):
            return [str(tax.names[u]) for u in sorted(ref.anc[v], key=lambda u: len(ref.anc[u]))]
        # HiClass compares names; this is valid only where names along paths are unique
        assert all(len(set(path_names(v))) == len(path_names(v)) for v in range(1, tax.n_nodes))
        yt = [path_names(int(v)) for v in truth]
        yp = [path_names(int(v)) for v in pred]
        got = hierarchical_prf(tax, pred, truth)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert got["hp"] == pytest.approx(hc.precision(yt, yp, average="micro"))
            assert got["hr"] == pytest.approx(hc.recall(yt, yp, average="micro"))
            assert got["hf"] == pytest.approx(hc.f1(yt, yp, average="micro"))
            assert got["hp_macro"] == pytest.approx(hc.precision(yt, yp, average="macro"))
            assert got["hr_macro"] == pytest.approx(hc.recall(yt, yp, average="macro"))
            assert got["hf_macro"] == pytest.approx(hc.f1(yt, yp, average="macro"))


def repeated_name_tree() -> Taxonomy:
    # "Alpha" is both a level-1 group and a leaf two levels below it
    parent = [-1, 0, 1, 2, 2, 0, 5]
    names = ["root", "Alpha", "Beta", "Alpha", "Gamma", "Delta", "Eps"]
    return Taxonomy.from_parents(parent, names, keys=[f"k{i}" for i in range(7)])


def test_hierarchical_prf_repeated_names_by_node_id():
    tax = repeated_name_tree()
    leaf_alpha = next(v for v in tax.find_all("Alpha") if tax.depth[v] == 3)
    gamma = tax.find("Gamma")
    got = hierarchical_prf(tax, [gamma], [leaf_alpha])
    # A = {Alpha1, Beta, Gamma}, B = {Alpha1, Beta, Alpha3}: |A n B| = 2 of 3 each
    assert got["hp"] == pytest.approx(2 / 3) and got["hr"] == pytest.approx(2 / 3)
    hc = pytest.importorskip("hiclass.metrics", reason="hiclass not installed (pip install hiclass)")
    # HiClass compares names, so the truth's two "Alpha" collapse and its recall is wrong (1.0)
    assert hc.recall([["Alpha", "Beta", "Alpha"]], [["Alpha", "Beta", "Gamma"]]) == pytest.approx(1.0)


def test_hierarchical_prf_root_prediction_convention():
    tax = repeated_name_tree()
    got = hierarchical_prf(tax, [0, tax.find("Gamma")], [tax.find("Gamma"), tax.find("Gamma")])
    # sample 0 predicts the root: precision 1 (nothing claimed), recall 0, F1 0
    assert got["hp_macro"] == pytest.approx(1.0)
    assert got["hr_macro"] == pytest.approx(0.5)
    assert got["hf_macro"] == pytest.approx(0.5)
    assert got["hp"] == pytest.approx(1.0) and got["hr"] == pytest.approx(3 / 6)


# ------------------------------------------------------------------ calibration
def test_ece_and_reliability_diagram():
    rng = np.random.default_rng(0)
    conf = np.r_[rng.random(500), [0.0, 1.0, 1 / 15, 0.2]]
    corr = rng.random(len(conf)) < conf
    assert expected_calibration_error(conf, corr) == pytest.approx(ece_ref(conf, corr))
    rd = reliability_diagram(conf, corr)
    assert sum(rd["count"]) == len(conf)
    # bins are (lo, hi]: 0.2 = 3/15 sits in bin 2, 1/15 in bin 0
    assert rd["bin_upper"][2] == pytest.approx(0.2)
    json.dumps(rd)
    # perfectly calibrated in expectation -> small ECE; always-wrong at confidence 1 -> ECE 1
    assert expected_calibration_error(np.ones(10), np.zeros(10)) == 1.0


# ------------------------------------------------------------------ selective
def climb_ref(ref: Ref, npb, start: int, theta: float) -> int:
    v = start
    while v > 0 and not npb[v] >= theta:
        v = ref.parent[v]
    return v


@pytest.mark.parametrize("name", ["plankton", "fathomnet"])
def test_risk_coverage_curve_matches_threshold_sweep(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    rng = np.random.default_rng(5)
    probs = random_probs(rng, 120, tax.n_labels, sharp=2.0)
    truth = mixed_truth(rng, tax, probs, p_partial=0.3, p_unknown=0.05)
    curve = risk_coverage_curve(tax, probs, truth)
    keep = [i for i in range(len(truth)) if truth[i] > 0]
    nps = {i: ref.node_probs(list(probs[i])) for i in keep}
    starts = {i: ref.labels[ranked_labels(list(probs[i]))[0]] for i in keep}
    for theta, cov, risk in zip(curve["threshold"], curve["coverage"], curve["risk"]):
        nodes = {i: climb_ref(ref, nps[i], starts[i], theta) for i in keep}
        want_cov = np.mean([ref.coverage(v) for v in nodes.values()])
        want_risk = np.mean([not (v == 0 or v in ref.anc[int(truth[i])]) for i, v in nodes.items()])
        assert cov == pytest.approx(want_cov, abs=1e-12)
        assert risk == pytest.approx(want_risk, abs=1e-12)
    # endpoints: all at the root, then all at the top label
    assert curve["coverage"][0] == 0 and curve["risk"][0] == 0
    last = [starts[i] for i in keep]
    assert curve["coverage"][-1] == pytest.approx(np.mean([ref.coverage(v) for v in last]))
    # the area equals the trapezoid rule over the exact curve, and a perfect model scores 0
    area = haurc(tax, probs, truth)
    x, y = curve["coverage"], curve["risk"]
    assert area == pytest.approx(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))
    perfect = np.zeros_like(probs)
    lab = np.where(truth > 0, truth, tax.label_ids[0])
    lab = np.where(tax.is_label[lab], lab, tax.label_ids[0])
    perfect[np.arange(len(lab)), tax.label_index[lab]] = 1.0
    assert haurc(tax, perfect, lab) == 0.0


def test_darts_curve_trades_accuracy_for_information(trees):
    tax = trees["fathomnet"]
    ref = Ref(tax)
    rng = np.random.default_rng(9)
    probs = random_probs(rng, 100, tax.n_labels, sharp=2.0)
    truth = mixed_truth(rng, tax, probs, p_partial=0.2, p_unknown=0.0)
    lams = [0.0, 0.5, 2.0, 10.0, 1000.0]
    c = darts_curve(tax, probs, truth, lambdas=lams)
    r = [math.log2(ref.n_leaves) - math.log2(ref.leaves_under[v]) for v in range(ref.n)]
    for lam, acc, gain in zip(lams, c["accuracy"], c["info_gain"]):
        picks = []
        for row in probs:
            npb = ref.node_probs(list(row))
            picks.append(max(range(ref.n), key=lambda v: ((r[v] + lam) * npb[v], -v)))
        assert acc == pytest.approx(np.mean([v == 0 or v in ref.anc[int(t)] for v, t in zip(picks, truth)]))
        assert gain == pytest.approx(np.mean([r[v] for v in picks]))
    assert c["accuracy"][-1] >= c["accuracy"][0] and c["info_gain"][-1] <= c["info_gain"][0]


# ------------------------------------------------------------------- inputs
def test_bad_inputs_are_named(trees):
    tax = trees["cifar"]
    probs = random_probs(np.random.default_rng(0), 4, tax.n_labels)
    with pytest.raises(DataError, match="expected \\[n_samples, 100\\]"):
        compute_metrics(tax, probs[:, :50], [1, 2, 3, 4])
    with pytest.raises(DataError, match="do not sum to 1"):
        compute_metrics(tax, probs * 2, [1, 2, 3, 4])
    with pytest.raises(DataError, match="not node ids"):
        compute_metrics(tax, probs, [1, 2, 3, 10_000])
    with pytest.raises(DataError, match="4 samples"):
        compute_metrics(tax, probs, [1, 2, 3])
    with pytest.raises(DataError, match="unknown rank.*'genus'.*'coarse'"):
        compute_metrics(tax, probs, [1, 2, 3, 4], ranks=["genus"])
    plankton = trees["plankton"]
    pp = random_probs(np.random.default_rng(0), 4, plankton.n_labels)
    with pytest.raises(DataError, match="levels are the depths"):
        compute_metrics(plankton, pp, [1, 2, 3, 4], ranks=["genus"])
    assert "level3/top1" in compute_metrics(plankton, pp, [1, 2, 3, 4], ranks=["level3"])


def test_ranks_subset_and_decisions(trees):
    tax = trees["fathomnet"]
    rng = np.random.default_rng(2)
    probs = random_probs(rng, 200, tax.n_labels)
    truth = mixed_truth(rng, tax, probs)
    m = compute_metrics(tax, probs, truth, ranks=["family", "species"], k=3,
                        decisions={"top": tax.label_ids[probs.argmax(1)], "root": np.zeros(200, int)})
    assert "genus/top1" not in m and "family/top3" in m and "top3_error" in m and "hdist@3" in m
    assert m["top/mean_path_distance"] == m["mean_path_distance"]
    assert m["root/accuracy"] == 1.0 and m["root/coverage"] == 0.0 and m["root/hr"] == 0.0
    # a Decision is named after its method
    from taxonomist.decide import decide
    d = decide(tax, probs, "threshold", threshold=0.7)
    md = compute_metrics(tax, probs, truth, decisions=d)
    assert md["threshold/accuracy"] >= m["top/accuracy"] and md["threshold/coverage"] <= m["top/coverage"]
    # the rank distance counts only the ranks asked for
    want = mean_rank_distance(tax, tax.label_ids[probs.argmax(1)], truth, ranks=["family", "species"])
    assert m["mean_rank_distance"] == pytest.approx(want)
    # empty input: counts only, undefined values are None
    e = compute_metrics(tax, probs[:0], truth[:0])
    assert e["n_samples"] == 0 and e["top1_error"] is None and e["haurc"] is None


def test_path_violations_flags_incoherent_tuples(trees):
    tax = trees["fathomnet"]
    fam = [v for v in range(tax.n_nodes) if tax.ranks[v] == "family" and tax.n_children[v] > 0]
    a, b = fam[0], fam[1]
    child_a = tax.children(a)[0]
    preds = np.array([[a, child_a], [b, child_a], [a, -1]])
    assert path_violations(tax, preds).tolist() == [False, True, False]
