"""Decision rules against slow references on the real trees, plus the properties users rely on:
batch independence, CRM optimality, thresholds that hold their accuracy on held-out data."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from test_metrics import Ref, ranked_labels
from test_metrics_trees import mixed_truth, random_probs, real_trees

from taxonomist.decide import (
    FATHOMNET_THRESHOLDS,
    decide,
    expected_distances,
    fit_darts_lambda,
    fit_temperature,
    fit_thresholds,
)
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def trees(shared_data):
    return real_trees(shared_data)


def hier_correct(tax: Taxonomy, nodes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return tax.is_ancestor(nodes, truth)


# ------------------------------------------------------------------ argmax
def test_argmax(trees):
    tax = trees["plankton"]
    rng = np.random.default_rng(0)
    probs = random_probs(rng, 50, tax.n_labels)
    d = decide(tax, probs, "argmax")
    assert (d.node == tax.label_ids[probs.argmax(1)]).all() and d.how == ["label"] * 50
    ref = Ref(tax)
    for i in range(50):
        assert d.prob[i] == pytest.approx(ref.node_probs(list(probs[i]))[d.node[i]])
    json.dumps(d.to_dict())


# ------------------------------------------------------------------ threshold
def climb_ref(tax: Taxonomy, ref: Ref, row, thr_of) -> tuple[int, float]:
    npb = ref.node_probs(list(row))
    v = ref.labels[ranked_labels(list(row))[0]]
    while v > 0:
        t = thr_of(v)
        if t is not None and npb[v] >= t:
            break
        v = ref.parent[v]
    return v, npb[v]


def ref_rank(tax: Taxonomy, ref: Ref, u: int) -> str:
    """The rank whose threshold node u uses: its own, else its nearest ranked ancestor's (root included),
    else the first rank (walking parents one by one)."""
    while not str(tax.ranks[u]) and u > 0:
        u = ref.parent[u]
    return str(tax.ranks[u]) or tax.rank_order[0]


@pytest.mark.parametrize("name", ["plankton", "fathomnet", "cifar"])
def test_threshold_global_matches_reference(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    rng = np.random.default_rng(1)
    probs = random_probs(rng, 200, tax.n_labels, sharp=3.0)
    for tau in (0.3, 0.6, 0.9):
        d = decide(tax, probs, "threshold", threshold=tau)
        for i in range(len(probs)):
            v, p = climb_ref(tax, ref, probs[i], lambda u: tau)
            assert d.node[i] == v and d.prob[i] == pytest.approx(p)
        start = tax.label_ids[probs.argmax(1)]
        assert ((d.node == start) == np.array([h == "label" for h in d.how])).all()
        assert (d.prob[d.node != 0] >= tau).all()


def test_threshold_per_rank_fathomnet_scaffold(trees):
    tax = trees["fathomnet"]
    ref = Ref(tax)
    rng = np.random.default_rng(2)
    probs = random_probs(rng, 300, tax.n_labels, sharp=4.0)
    d = decide(tax, probs, "threshold", threshold=FATHOMNET_THRESHOLDS)
    for i in range(len(probs)):
        v, _ = climb_ref(tax, ref, probs[i], lambda u: FATHOMNET_THRESHOLDS.get(ref_rank(tax, ref, u)))
        assert d.node[i] == v
    # how names the rank backed off to
    for v, h, s in zip(d.node, d.how, tax.label_ids[probs.argmax(1)]):
        assert h == ("label" if v == s else f"backoff_to_{tax.ranks[v]}" if tax.ranks[v]
                     else f"backoff_to_depth_{tax.depth[v]}")
    hows = set(d.how)
    assert "label" in hows and len({h for h in hows if h.startswith("backoff_to_")}) >= 2
    # a rank mapped to None (or missing) is walked past
    partial = {"species": 0.55, "genus": None, "family": 0.65}
    d2 = decide(tax, probs, "threshold", threshold=partial)
    assert not (tax.ranks[d2.node] == "genus").any()
    for i in range(len(probs)):
        v, _ = climb_ref(tax, ref, probs[i], lambda u: partial.get(ref_rank(tax, ref, u)))
        assert d2.node[i] == v
    # ... unless `default` gives them a threshold
    d3 = decide(tax, probs, "threshold", threshold=partial, default=0.9)
    for i in range(len(probs)):
        v, _ = climb_ref(tax, ref, probs[i], lambda u: partial.get(ref_rank(tax, ref, u)) or 0.9)
        assert d3.node[i] == v


UNRANKED = {"Tunicata": "phylum", "Caridea": "order", "Acanthascinae": "family"}


def test_threshold_answers_unranked_labels(trees):
    """FathomNet's Tunicata, Caridea and Acanthascinae have no rank: they use their nearest ranked
    ancestor's threshold, so a certain prediction on them is answered as it is."""
    tax = trees["fathomnet"]
    for name, rank in UNRANKED.items():
        v = tax.find(name)
        assert tax.is_label[v] and not tax.ranks[v]
        p = np.zeros((1, tax.n_labels))
        p[0, tax.label_index[v]] = 1.0
        d = decide(tax, p, "threshold", threshold=FATHOMNET_THRESHOLDS)
        assert d.names(tax) == [name] and d.how == ["label"], name
        assert tax.ranks[tax.parent[v]] == rank
    # Tunicata takes phylum's 0.80 (not class's 0.75): 0.78 on it, the rest on other chordates -> Chordata
    tun, chordata = tax.find("Tunicata"), tax.find("Chordata")
    others = [tax.label_index[u] for u in tax.label_ids if tax.is_ancestor(chordata, u) and u != tun]
    p = np.zeros((1, tax.n_labels))
    p[0, tax.label_index[tun]] = 0.78
    p[0, others] = 0.22 / len(others)
    assert decide(tax, p, "threshold", threshold=FATHOMNET_THRESHOLDS).names(tax) == ["Chordata"]
    assert decide(tax, p, "threshold", threshold={**FATHOMNET_THRESHOLDS, "phylum": 0.75}).names(tax) == ["Tunicata"]
    # a rank missing from the mapping takes `default`, for its unranked nodes too
    no_phylum = {k: v for k, v in FATHOMNET_THRESHOLDS.items() if k != "phylum"}
    assert decide(tax, p, "threshold", threshold=no_phylum, default=0.7).names(tax) == ["Tunicata"]
    assert decide(tax, p, "threshold", threshold=no_phylum).names(tax) == ["Animalia"]


def test_threshold_unranked_levels_and_how(trees):
    tax = trees["plankton"]
    probs = random_probs(np.random.default_rng(3), 200, tax.n_labels, sharp=2.0)
    d = decide(tax, probs, "threshold", threshold={"level2": 0.5, "level1": 0.7})
    depths = set(tax.depth[d.node].tolist())
    assert depths <= {0, 1, 2}
    assert all(h in ("backoff_to_depth_1", "backoff_to_depth_2", "backoff_to_root", "label") for h in d.how)
    with pytest.raises(ConfigError, match="not levels"):
        decide(tax, probs, "threshold", threshold={"genus": 0.5})


@pytest.mark.parametrize("method,opts", [("argmax", {}), ("threshold", {"threshold": 0.7}),
                                         ("threshold", {"threshold": FATHOMNET_THRESHOLDS}),
                                         ("crm", {"metric": "rank_steps"}), ("crm", {"metric": "lca_height"}),
                                         ("darts", {"lam": 1.5})])
def test_decision_does_not_depend_on_batch(trees, method, opts):
    tax = trees["fathomnet"]
    probs = random_probs(np.random.default_rng(4), 257, tax.n_labels, sharp=2.5)
    full = decide(tax, probs, method, **opts)
    perm = np.random.default_rng(5).permutation(257)
    shuffled = decide(tax, probs[perm], method, **opts)
    assert (shuffled.node == full.node[perm]).all()
    np.testing.assert_array_equal(shuffled.prob, full.prob[perm])
    for i in (0, 100, 256):
        one = decide(tax, probs[i:i + 1], method, **opts)
        assert one.node[0] == full.node[i] and one.how[0] == full.how[i]
        assert one.prob[0] == full.prob[i]


# ------------------------------------------------------------------ CRM
def distance_ref(ref: Ref, metric: str, ranks=None):
    if metric == "path":
        return ref.path
    if metric == "lca_height":
        return ref.d_h
    return lambda a, b: ref.rank_steps(a, b, set(ranks))


@pytest.mark.parametrize("name,metric", [("plankton", "path"), ("plankton", "lca_height"), ("cifar", "lca_height"),
                                         ("fathomnet", "rank_steps"), ("fathomnet", "path")])
def test_crm_expected_distances_match_explicit_matrix(trees, name, metric):
    tax = trees[name]
    ref = Ref(tax)
    ranks = list(tax.rank_order) if metric == "rank_steps" else None
    dist = distance_ref(ref, metric, ranks)
    d_mat = np.array([[dist(l, c) for c in range(ref.n)] for l in ref.labels], dtype=float)
    probs = random_probs(np.random.default_rng(6), 60, tax.n_labels, sharp=1.5)
    want = probs @ d_mat
    got = expected_distances(tax, probs, metric, ranks=ranks)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    d = decide(tax, probs, "crm", metric=metric, ranks=ranks)
    np.testing.assert_allclose(want[np.arange(60), d.node], want.min(axis=1), atol=1e-10)
    np.testing.assert_allclose(d.score, want.min(axis=1), atol=1e-10)
    # never worse than the top label, and labels-only CRM is the argmin over label columns
    top = tax.label_ids[probs.argmax(1)]
    assert (want[np.arange(60), d.node] <= want[np.arange(60), top] + 1e-12).all()
    dl = decide(tax, probs, "crm", metric=metric, ranks=ranks, candidates="labels")
    assert tax.is_label[dl.node].all()
    np.testing.assert_allclose(want[np.arange(60), dl.node], want[:, tax.label_ids].min(axis=1), atol=1e-10)


def test_crm_rank_steps_subset_of_ranks(trees):
    tax = trees["fathomnet"]
    ref = Ref(tax)
    ranks = ["class", "family", "species"]
    dist = distance_ref(ref, "rank_steps", ranks)
    d_mat = np.array([[dist(l, c) for c in range(ref.n)] for l in ref.labels], dtype=float)
    probs = random_probs(np.random.default_rng(7), 40, tax.n_labels)
    np.testing.assert_allclose(expected_distances(tax, probs, "rank_steps", ranks=ranks), probs @ d_mat, atol=1e-10)


def test_crm_picks_internal_node_on_fathomnet(trees):
    tax = trees["fathomnet"]
    genus = next(v for v in range(tax.n_nodes)
                 if tax.ranks[v] == "genus" and not tax.is_label[v] and tax.n_children[v] >= 2)
    a, b = tax.children(genus)[:2]
    probs = np.full((1, tax.n_labels), 0.1 / (tax.n_labels - 2))
    probs[0, tax.label_index[a]] = probs[0, tax.label_index[b]] = 0.45
    d = decide(tax, probs, "crm", metric="rank_steps")
    assert d.node[0] == genus and not tax.is_label[d.node[0]] and d.how == ["crm"]
    assert d.prob[0] == pytest.approx(0.9)
    # its expected FathomNet distance beats both species answers
    r = expected_distances(tax, probs, "rank_steps")[0]
    assert r[genus] < r[a] and r[genus] < r[b]
    # over the labels only, CRM must pick a species
    assert decide(tax, probs, "crm", metric="rank_steps", candidates="labels").node[0] in (a, b)


def test_crm_never_increases_expected_distance_on_real_tree(trees):
    tax = trees["fathomnet"]
    probs = random_probs(np.random.default_rng(8), 2000, tax.n_labels, sharp=2.0)
    r = expected_distances(tax, probs, "rank_steps")
    d = decide(tax, probs, "crm", metric="rank_steps")
    top = tax.label_ids[probs.argmax(1)]
    rows = np.arange(2000)
    assert (r[rows, d.node] <= r[rows, top] + 1e-12).all()
    assert r[rows, d.node].mean() < r[rows, top].mean()
    assert (~tax.is_label[d.node]).any()


def synthetic_tree(branching: tuple[int, ...]) -> Taxonomy:
    parent, level = [-1], [0]
    for b in branching:
        new = []
        for p in level:
            for _ in range(b):
                parent.append(p)
                new.append(len(parent) - 1)
        level = new
    return Taxonomy.from_parents(parent, [f"n{i}" for i in range(len(parent))])


def test_crm_scales_to_ten_thousand_labels():
    tax = synthetic_tree((10, 10, 10, 10))  # 10,000 leaf labels, 11,111 nodes
    probs = random_probs(np.random.default_rng(9), 300, tax.n_labels, sharp=3.0)
    t0 = time.perf_counter()
    d = decide(tax, probs, "crm", metric="lca_height", chunk_elems=1 << 22)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, elapsed
    # spot-check 3 rows against the distance definition (explicit expected cost of a few nodes)
    lab = tax.label_ids
    for i in (0, 1, 2):
        cands = np.r_[d.node[i], lab[probs[i].argmax()], tax.parent[d.node[i]]]
        costs = [float(probs[i] @ tax.distance(lab, c, metric="lca_height")) for c in cands]
        assert costs[0] <= min(costs) + 1e-9


# ------------------------------------------------------------------ DARTS
def test_darts_matches_reference_and_fit(trees):
    tax = trees["plankton"]
    ref = Ref(tax)
    rng = np.random.default_rng(10)
    probs = random_probs(rng, 150, tax.n_labels, sharp=2.5)
    r = [math.log2(ref.n_leaves) - math.log2(ref.leaves_under[v]) for v in range(ref.n)]
    for lam in (0.0, 0.7, 5.0):
        d = decide(tax, probs, "darts", lam=lam)
        for i in range(len(probs)):
            npb = ref.node_probs(list(probs[i]))
            assert d.node[i] == max(range(ref.n), key=lambda v: ((r[v] + lam) * npb[v], -v))
    truth = mixed_truth(rng, tax, probs, p_partial=0.2, p_unknown=0.0)
    lam = fit_darts_lambda(tax, probs, truth, target_accuracy=0.85)
    acc = hier_correct(tax, decide(tax, probs, "darts", lam=lam).node, truth).mean()
    assert acc >= 0.85
    if lam > 0:  # smallest such lambda: a little less misses the target
        assert hier_correct(tax, decide(tax, probs, "darts", lam=lam * 0.9).node, truth).mean() < 0.85 + 0.02


# ------------------------------------------------------------------ fitting
def calibrated_split(tax: Taxonomy, seed: int, n: int, sharp: float):
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, n, tax.n_labels, sharp=sharp)
    # calibrated by construction: the true label is drawn from the predicted distribution
    truth = mixed_truth(rng, tax, probs, p_partial=0.0, p_unknown=0.0, calibrated=True)
    return probs, truth


@pytest.mark.parametrize("name,per_rank", [("fathomnet", False), ("fathomnet", True),
                                           ("plankton", False), ("plankton", True), ("cifar", True)])
def test_fitted_thresholds_hold_accuracy_on_held_out_data(trees, name, per_rank):
    tax = trees[name]
    target, n = 0.9, 4000
    val_p, val_t = calibrated_split(tax, 20, n, sharp=3.5)
    test_p, test_t = calibrated_split(tax, 21, n, sharp=3.5)
    thr = fit_thresholds(tax, val_p, val_t, target_accuracy=target, per_rank=per_rank)
    json.dumps(thr)
    val_acc = hier_correct(tax, decide(tax, val_p, "threshold", threshold=thr).node, val_t).mean()
    assert val_acc >= target
    d = decide(tax, test_p, "threshold", threshold=thr)
    test_acc = hier_correct(tax, d.node, test_t).mean()
    se = math.sqrt(target * (1 - target) / n)
    # val accuracy sits at the target by construction; test accuracy differs by sampling error
    # (two samples of n, plus the selection of the boundary on validation data)
    assert test_acc >= target - 4 * se, (thr, test_acc)
    assert abs(test_acc - val_acc) < 5 * se
    # not the trivial solution (everything at the root): many answers stay at the top label
    assert (d.node == tax.label_ids[test_p.argmax(1)]).mean() > 0.15
    if not per_rank:  # as deep as possible: the next lower path mass misses the target on validation
        start = tax.label_ids[val_p.argmax(1)]
        anc = tax.ancestor_matrix(start)
        masses = np.take_along_axis(tax.node_probabilities(val_p), np.maximum(anc, 0), axis=1)[anc > 0]
        below = masses[masses < thr].max()
        lower = decide(tax, val_p, "threshold", threshold=below).node
        assert hier_correct(tax, lower, val_t).mean() < target


def test_fit_thresholds_per_rank_reaches_unranked_labels(trees):
    """Per-rank fitting on FathomNet data where the unranked labels are common and mostly right:
    the fitted thresholds answer them (an unranked node shares its ranked ancestor's threshold),
    and the accuracy holds on the fitting data and on held-out data."""
    tax = trees["fathomnet"]
    unranked = np.array([tax.label_index[tax.find(x)] for x in UNRANKED])

    def split(seed, n=4000):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(n, tax.n_labels)) * 3.0
        boost = rng.random(n) < 0.4
        z[np.flatnonzero(boost), rng.choice(unranked, int(boost.sum()))] += 9.0
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p, mixed_truth(rng, tax, p, p_partial=0.0, p_unknown=0.0, calibrated=True)

    val_p, val_t = split(50)
    test_p, test_t = split(51)
    thr = fit_thresholds(tax, val_p, val_t, target_accuracy=0.9, per_rank=True)
    assert thr["phylum"] is not None and thr["order"] is not None and thr["family"] is not None
    d = decide(tax, val_p, "threshold", threshold=thr)
    assert hier_correct(tax, d.node, val_t).mean() >= 0.9
    answered = {str(tax.names[v]) for v in d.node}
    assert set(UNRANKED) <= answered, answered
    for name in UNRANKED:  # most confident, correct predictions of them keep the label
        v = tax.find(name)
        sure = (val_p[:, tax.label_index[v]] > 0.99) & (val_t == v)
        assert sure.sum() > 50 and (d.node[sure] == v).mean() > 0.9, name
    test_acc = hier_correct(tax, decide(tax, test_p, "threshold", threshold=thr).node, test_t).mean()
    assert test_acc >= 0.9 - 4 * math.sqrt(0.9 * 0.1 / 4000)


def test_fit_thresholds_per_rank_answers_as_deep_as_global(trees):
    from taxonomist.metrics import node_coverage
    for name in ("fathomnet", "plankton"):
        tax = trees[name]
        probs, truth = calibrated_split(tax, 30, 3000, sharp=3.5)
        per = fit_thresholds(tax, probs, truth, target_accuracy=0.8, per_rank=True)
        assert list(per) == list(tax.rank_order if tax.has_ranks else tax.level_names())
        assert all(v is None or 0 <= v <= 1 + 1e-9 for v in per.values())
        glob = fit_thresholds(tax, probs, truth, target_accuracy=0.8)
        d_per = decide(tax, probs, "threshold", threshold=per).node
        d_glob = decide(tax, probs, "threshold", threshold=glob).node
        assert hier_correct(tax, d_per, truth).mean() >= 0.8
        # one threshold per rank is at least as flexible as one for all: it should not answer shallower
        cov = node_coverage(tax)
        assert cov[d_per].mean() >= 0.97 * cov[d_glob].mean(), name


def test_fit_temperature_recovers_scale(trees):
    tax = trees["fathomnet"]
    rng = np.random.default_rng(40)
    z0 = rng.normal(size=(3000, tax.n_labels)) * 2.0
    p0 = np.exp(z0 - z0.max(1, keepdims=True))
    p0 /= p0.sum(1, keepdims=True)
    truth = mixed_truth(rng, tax, p0, p_partial=0.3, p_unknown=0.05)
    t = fit_temperature(tax, 2.0 * z0, truth)
    assert t == pytest.approx(2.0, rel=0.08)
    # log-probabilities give the same answer (softmax ignores a per-row shift)
    logp = 2.0 * z0 - np.log(np.exp(2.0 * z0).sum(1, keepdims=True))
    assert fit_temperature(tax, logp, truth) == pytest.approx(t, rel=1e-5)
    # log(0) from underflowed probabilities is accepted (that label then carries no probability)
    logp[:, 0] = -np.inf
    assert fit_temperature(tax, logp, truth) == pytest.approx(t, rel=0.05)

    # the fitted T minimises the partial-label NLL: compare with a grid of a slow reference
    ref = Ref(tax)
    sub = np.flatnonzero(truth > 0)[:300]

    under = {i: [j for j, l in enumerate(ref.labels) if l == truth[i] or truth[i] in ref.anc[l]] for i in sub}

    def nll(temp):
        total = 0.0
        for i in sub:
            s = 2.0 * z0[i] / temp
            lse = np.log(np.exp(s - s.max()).sum()) + s.max()
            su = s[under[i]]
            total += lse - (np.log(np.exp(su - su.max()).sum()) + su.max())
        return total / len(sub)
    t_sub = fit_temperature(tax, 2.0 * z0[sub], truth[sub])
    grid = np.linspace(0.5 * t_sub, 1.5 * t_sub, 41)
    assert nll(t_sub) <= min(nll(g) for g in grid) + 1e-9


# ------------------------------------------------------------------ errors
def test_decide_errors_name_the_fix(trees):
    tax = trees["cifar"]
    probs = random_probs(np.random.default_rng(0), 3, tax.n_labels)
    with pytest.raises(ConfigError, match="choose one of argmax, threshold, crm, darts"):
        decide(tax, probs, "vote")
    with pytest.raises(ConfigError, match="its options are threshold, default"):
        decide(tax, probs, "threshold", tau=0.5)
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        decide(tax, probs, "threshold", threshold=1.5)
    plankton = trees["plankton"]
    with pytest.raises(ConfigError, match="needs a taxonomy with ranks"):
        decide(plankton, random_probs(np.random.default_rng(0), 3, plankton.n_labels), "crm", metric="rank_steps")
    with pytest.raises(ConfigError, match="unknown CRM metric"):
        decide(tax, probs, "crm", metric="cosine")
    with pytest.raises(ConfigError, match="lam"):
        decide(tax, probs, "darts", lam=-1)
    with pytest.raises(DataError, match="not logits"):
        decide(tax, np.log(probs), "argmax")
    with pytest.raises(DataError, match="do not sum to 1"):
        decide(tax, probs * 0.5, "argmax")
    with pytest.raises(DataError, match="target_accuracy"):
        fit_thresholds(tax, probs, [1, 2, 3], target_accuracy=1.5)


# ------------------------------------------------------------------ the predict command's options
def test_predict_cli_exposes_decide_options(trees):
    """Every option of decide() that predict offers reaches decide: --threshold-default, --crm-ranks,
    --crm-candidates (and misplaced ones are refused, naming the option)."""
    from types import SimpleNamespace

    from taxonomist.cli.main import build_parser
    from taxonomist.cli.predict_cmd import decision_options

    tax = trees["fathomnet"]
    bundle = SimpleNamespace(calibration={}, meta={"threshold": 0.8})
    parse = build_parser().parse_args

    def options(*extra):
        return decision_options(parse(["predict", "b", "x.jpg", *extra]), bundle)

    probs = random_probs(np.random.default_rng(60), 300, tax.n_labels, sharp=2.0)
    # threshold: a rank left out of --rank-thresholds takes --threshold-default
    opt = options("--rank-thresholds", '{"species": 0.55}', "--threshold-default", "0.7")
    assert opt == {"threshold": {"species": 0.55}, "default": 0.7}
    d = decide(tax, probs, "threshold", **opt)
    assert (decide(tax, probs, "threshold", threshold={r: 0.7 for r in tax.rank_order} | {"species": 0.55}).node
            == d.node).all()
    # CRM over labels only, and the rank-step distance over some ranks
    opt = options("--decision", "crm", "--crm-candidates", "labels")
    assert tax.is_label[decide(tax, probs, "crm", **opt).node].all()
    opt = options("--decision", "crm", "--crm-metric", "rank_steps", "--crm-ranks", "family,species")
    assert opt["ranks"] == ["family", "species"]
    want = expected_distances(tax, probs, "rank_steps", ranks=["family", "species"]).argmin(axis=1)
    assert (decide(tax, probs, "crm", **opt).node == want).all()
    for bad, msg in ((["--decision", "crm", "--threshold-default", "0.5"], "--threshold-default"),
                     (["--crm-ranks", "genus"], "--crm-ranks"),
                     (["--decision", "crm", "--crm-ranks", "genus"], "rank_steps"),
                     (["--rank-thresholds", "0.5"], "JSON object")):
        with pytest.raises(ConfigError, match=msg):
            options(*bad)
