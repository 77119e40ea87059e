"""Taxonomy-aware losses against slow references written here (explicit parent walks and loops),
on the real trees built by the real importer: NDSB plankton (unranked, 18 internal labels),
FathomNet 2025 (7 ranks, labels at mixed ranks), CIFAR-100 5-level (balanced)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taxonomist.errors import ConfigError, DataError
from taxonomist.losses import (CompositeLoss, StaticWeighting, create_loss, list_losses, loss_options,
                               with_attribute_losses)
from taxonomist.losses.tree_ops import LabelDistance, NodeLogProbs, RootPaths
from taxonomist.models import create_model
from taxonomist.models.heads import create_head, list_heads
from taxonomist.taxonomy import Taxonomy, load

NEW_LOSSES = ("taxonomy_smoothing", "soft_labels", "hxe", "expected_distance")
MULTIHOT_LOSSES = ("hier_bce", "focal", "asymmetric")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plankton(shared_data) -> Taxonomy:
    return load(shared_data / "plankton" / "class_paths.tsv")


@pytest.fixture(scope="module")
def fathomnet(shared_data) -> Taxonomy:
    return load(shared_data / "taxonomies" / "fathomnet2025_lineage.csv")


@pytest.fixture(scope="module")
def cifar(shared_data) -> Taxonomy:
    return load(shared_data / "taxonomies" / "cifar100_5level.csv")


@pytest.fixture(scope="module")
def trees(plankton, fathomnet, cifar) -> list[Taxonomy]:
    return [plankton, fathomnet, cifar]


# ------------------------------------------------------------------ slow references (plain Python)
def path_up(tax: Taxonomy, v: int) -> list[int]:
    """v, parent(v), ..., root by walking the parent array."""
    out = [int(v)]
    while tax.parent[out[-1]] >= 0:
        out.append(int(tax.parent[out[-1]]))
    return out


def slow_height(tax: Taxonomy) -> list[int]:
    h = [0] * tax.n_nodes
    for v in range(tax.n_nodes):
        for k, a in enumerate(path_up(tax, v)):
            h[a] = max(h[a], k)
    return h


def slow_distance(tax: Taxonomy, a: int, b: int, metric: str, height: list[int]) -> int:
    pa, pb = path_up(tax, a), path_up(tax, b)
    common = next(x for x in pa if x in set(pb))
    if metric == "lca_height":
        return 0 if a == b else height[common]
    if metric == "path":
        return pa.index(common) + pb.index(common)
    ranked = [x for x in pa[:pa.index(common)] + pb[:pb.index(common)] if tax.ranks[x] in tax.rank_order]
    return len(ranked)


def under(tax: Taxonomy, t: int) -> list[int]:
    """Label indices in the subtree of t (t included)."""
    return [i for i, lab in enumerate(tax.label_ids) if t in path_up(tax, int(lab))]


def meant(tax: Taxonomy, t: int) -> list[int]:
    """Label indices a target stands for: itself if a label, else every label below."""
    return [int(tax.label_index[t])] if tax.is_label[t] else under(tax, t)


def some_targets(tax: Taxonomy, n_partial: int = 6) -> list[int]:
    """Leaf labels, internal labels, partial (non-label covered) nodes, the root and -1."""
    rng = np.random.default_rng(0)
    labels = tax.label_ids
    leaf_labels = [int(v) for v in labels if tax.is_leaf[v]]
    internal_labels = [int(v) for v in labels if not tax.is_leaf[v]]
    covered = [v for v in range(1, tax.n_nodes) if not tax.is_label[v] and under(tax, v)]
    partial = [int(v) for v in rng.choice(covered, size=min(n_partial, len(covered)), replace=False)]
    return [int(x) for x in rng.choice(leaf_labels, 4, replace=False)] + internal_labels[:3] + partial + [-1]


def logp_of(head, out) -> np.ndarray:
    return head.label_log_probs(out).detach().double().numpy()


def mean_valid(vals: list[float]) -> float:
    return float(np.mean(vals)) if vals else 0.0


# ------------------------------------------------------------------ registry, shared tree ops
def test_registry_lists_every_loss():
    assert set(NEW_LOSSES + MULTIHOT_LOSSES + ("ce", "per_rank_ce", "attribute_ce", "composite")) <= set(list_losses())
    assert loss_options("taxonomy_smoothing")["alpha"] == 0.1
    assert loss_options("hxe") == {"alpha": 0.1}


def test_node_log_probs_root_paths_and_label_distance_match_slow_walks(trees):
    for tax in trees:
        nodes = torch.arange(tax.n_nodes)
        for table_max in (RootPaths(tax).use_table and 1 << 24, 0):
            paths = RootPaths(tax, table_max=table_max)(nodes).numpy()
            for v in range(0, tax.n_nodes, 7):
                up = path_up(tax, v)[::-1]
                assert paths[v, :len(up)].tolist() == up and (paths[v, len(up):] == -1).all()
        torch.manual_seed(0)
        lp = torch.randn(3, tax.n_labels).mul(4).log_softmax(-1)
        got = NodeLogProbs(tax)(lp).double().numpy()
        p = lp.double().exp().numpy()
        for v in range(0, tax.n_nodes, 3):
            s = under(tax, v)
            if s:
                np.testing.assert_allclose(got[:, v], np.log(p[:, s].sum(1)), rtol=1e-5, atol=1e-5)
            else:                                     # no label below: log(tiny), no gradient
                assert (got[:, v] < -700).all()
        height = slow_height(tax)
        targets = [t for t in some_targets(tax) if t >= 0] + [0]
        for metric in ("path", "lca_height") + (("rank_steps",) if tax.has_ranks else ()):
            dense = LabelDistance(tax, metric)(torch.tensor(targets)).numpy()
            fly = LabelDistance(tax, metric, dense_max=0)(torch.tensor(targets)).numpy()
            want = np.array([[slow_distance(tax, int(lab), t, metric, height) for lab in tax.label_ids]
                             for t in targets])
            np.testing.assert_array_equal(dense, want)
            np.testing.assert_array_equal(fly, want)


# ------------------------------------------------------------------ taxonomy smoothing
def slow_smoothing(tax, logp, targets, alpha, beta, metric="path", max_distance=None, partial="marginal"):
    height = slow_height(tax)
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue
        s = meant(tax, t)
        others = [k for k in range(tax.n_labels) if k not in s]
        d = {k: slow_distance(tax, int(tax.label_ids[k]), t, metric, height) for k in others}
        rel = [k for k in others if max_distance is None or d[k] <= max_distance]
        if rel:
            m = min(d[k] for k in rel)
            w = {k: math.exp(-beta * (d[k] - m)) for k in rel}     # shift: same ratios, no underflow
        else:
            w = {k: 1.0 for k in others}
        z = sum(w.values())
        a = alpha if others else 0.0
        if partial == "marginal":
            inset = -math.log(sum(math.exp(logp[b, i]) for i in s))
        else:
            inset = -sum(logp[b, i] for i in s) / len(s)
        vals.append((1 - a) * inset - a * sum(w[k] / z * logp[b, k] for k in w))
    return mean_valid(vals)


@pytest.mark.parametrize("beta,metric,max_distance,partial", [
    (1.0, "path", None, "marginal"), (0.5, "lca_height", None, "uniform"), (2.0, "path", 3, "marginal"),
    (1.0, "rank_steps", None, "marginal")])
def test_taxonomy_smoothing_matches_slow_reference(trees, beta, metric, max_distance, partial):
    for tax in trees:
        if metric == "rank_steps" and not tax.has_ranks:
            continue
        torch.manual_seed(1)
        head = create_head("flat", tax, 8)
        targets = some_targets(tax)
        out = head(torch.randn(len(targets), 8))
        for dense_max in (10_000, 0):
            loss = create_loss("taxonomy_smoothing", tax, head, alpha=0.2, beta=beta, metric=metric,
                               max_distance=max_distance, partial=partial, dense_max=dense_max)
            got = loss(out, torch.tensor(targets))["labels"].item()
            want = slow_smoothing(tax, logp_of(head, out), targets, 0.2, beta, metric, max_distance, partial)
            assert got == pytest.approx(want, rel=1e-5), (tax, dense_max)


def test_taxonomy_smoothing_alpha_zero_is_ce_and_large_beta_keeps_nearest_relatives(plankton, fathomnet):
    for tax in (plankton, fathomnet):
        head = create_head("flat", tax, 8)
        targets = some_targets(tax)
        out = head(torch.randn(len(targets), 8))
        t = torch.tensor(targets)
        ce = create_loss("ce", tax, head)(out, t)["labels"]
        torch.testing.assert_close(create_loss("taxonomy_smoothing", tax, head, alpha=0.0)(out, t)["labels"], ce)
    # beta -> inf: alpha is shared equally by the nearest relatives only
    tax = plankton
    head = create_head("flat", tax, 8)
    y = int(tax.find("copepod_calanoid_large"))           # a leaf with siblings
    logits = torch.zeros(1, tax.n_labels, requires_grad=True)
    out = {"labels": logits}
    loss = create_loss("taxonomy_smoothing", tax, head, alpha=0.3, beta=1e4)(out, torch.tensor([y]))["labels"]
    (g,) = torch.autograd.grad(loss, logits)
    target = torch.softmax(logits.detach(), -1) - g      # d CE(T)/dz = p - T
    d = np.array([tax.distance(int(lab), y) for lab in tax.label_ids])
    d[tax.label_index[y]] = 10**6
    nearest = d == d.min()
    assert nearest.sum() >= 2
    np.testing.assert_allclose(target[0, torch.from_numpy(nearest)].numpy(), 0.3 / nearest.sum(), atol=1e-6)
    assert target[0, tax.label_index[y]].item() == pytest.approx(0.7, abs=1e-6)
    assert target[0].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_taxonomy_smoothing_without_relatives_falls_back_to_uniform(plankton):
    tax = plankton
    head = create_head("flat", tax, 4)
    logits = torch.zeros(1, tax.n_labels, requires_grad=True)
    y = int(tax.label_ids[0])
    # max_distance=0: no label is a relative -> uniform over the other labels
    loss = create_loss("taxonomy_smoothing", tax, head, alpha=0.5, beta=3.0, max_distance=0)
    (g,) = torch.autograd.grad(loss({"labels": logits}, torch.tensor([y]))["labels"], logits)
    target = (torch.softmax(logits.detach(), -1) - g)[0]
    others = torch.ones(tax.n_labels, dtype=torch.bool)
    others[0] = False
    torch.testing.assert_close(target[others], torch.full((tax.n_labels - 1,), 0.5 / (tax.n_labels - 1)))


# ------------------------------------------------------------------ soft labels
def slow_soft_labels(tax, logp, targets, beta, metric="lca_height", partial="marginal"):
    height = slow_height(tax)
    labs = [int(v) for v in tax.label_ids]
    dmax = max(slow_distance(tax, a, b, metric, height) for a in labs for b in labs)
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue
        d = np.array([slow_distance(tax, lab, t, metric, height) for lab in labs], dtype=float)
        e = np.exp(-beta * d / dmax)
        T = e / e.sum()
        s = meant(tax, t)
        m_s = T[s].sum()
        if partial == "marginal":
            inset = -math.log(sum(math.exp(logp[b, i]) for i in s))
        else:
            inset = -float(np.mean([logp[b, i] for i in s]))
        vals.append(m_s * inset - sum(T[k] * logp[b, k] for k in range(len(labs)) if k not in s))
    return mean_valid(vals)


@pytest.mark.parametrize("beta,metric,partial", [(10.0, "lca_height", "marginal"), (4.0, "path", "uniform")])
def test_soft_labels_match_slow_reference(trees, beta, metric, partial):
    for tax in trees:
        torch.manual_seed(2)
        head = create_head("flat", tax, 8)
        targets = some_targets(tax)
        out = head(torch.randn(len(targets), 8))
        got = create_loss("soft_labels", tax, head, beta=beta, metric=metric, partial=partial)(
            out, torch.tensor(targets))["labels"].item()
        assert got == pytest.approx(slow_soft_labels(tax, logp_of(head, out), targets, beta, metric, partial),
                                    rel=1e-5)


def test_soft_labels_large_beta_is_ce(plankton):
    head = create_head("flat", plankton, 8)
    y = torch.as_tensor(plankton.label_ids[[0, 7, 50]])
    out = head(torch.randn(3, 8))
    torch.testing.assert_close(create_loss("soft_labels", plankton, head, beta=1e4)(out, y)["labels"],
                               create_loss("ce", plankton, head)(out, y)["labels"])


# ------------------------------------------------------------------ HXE
def slow_hxe(tax, logp, targets, alpha):
    height = slow_height(tax)
    p = np.exp(logp)
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue

        def mass(v):
            return sum(p[b, i] for i in under(tax, v))

        path = path_up(tax, t)                       # t, parent, ..., root
        total = 0.0
        if tax.is_label[t]:                          # "t itself" as a leaf below t
            total += -math.log(p[b, tax.label_index[t]] / mass(t))
        for c, par in zip(path[:-1], path[1:]):
            total += math.exp(-alpha * height[c]) * -math.log(mass(c) / mass(par))
        vals.append(total)
    return mean_valid(vals)


@pytest.mark.parametrize("head_name", ["flat", "per_rank"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_hxe_matches_slow_reference(trees, head_name, alpha):
    for tax in trees:
        torch.manual_seed(3)
        head = create_head(head_name, tax, 8)
        targets = some_targets(tax)
        out = head(torch.randn(len(targets), 8))
        got = create_loss("hxe", tax, head, alpha=alpha)(out, torch.tensor(targets))["labels"].item()
        assert got == pytest.approx(slow_hxe(tax, logp_of(head, out), targets, alpha), rel=1e-5, abs=1e-6)


def test_hxe_alpha_zero_is_ce(trees):
    for tax in trees:
        head = create_head("flat", tax, 8)
        targets = torch.tensor(some_targets(tax))
        out = head(torch.randn(len(targets), 8))
        torch.testing.assert_close(create_loss("hxe", tax, head, alpha=0.0)(out, targets)["labels"],
                                   create_loss("ce", tax, head)(out, targets)["labels"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ expected distance
def slow_expected_distance(tax, logp, targets, weight, metric, partial="node"):
    height = slow_height(tax)
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue
        ce = -math.log(sum(math.exp(logp[b, i]) for i in meant(tax, t)))
        inside = set(under(tax, t)) if (partial == "zero_inside" and not tax.is_label[t]) else set()
        ed = sum(math.exp(logp[b, i]) * (0 if i in inside else slow_distance(tax, int(lab), t, metric, height))
                 for i, lab in enumerate(tax.label_ids))
        vals.append(ce + weight * ed)
    return mean_valid(vals)


@pytest.mark.parametrize("metric,partial", [("path", "node"), ("lca_height", "zero_inside"),
                                            ("rank_steps", "node")])
def test_expected_distance_matches_slow_reference(trees, metric, partial):
    for tax in trees:
        if metric == "rank_steps" and not tax.has_ranks:
            continue
        torch.manual_seed(4)
        head = create_head("flat", tax, 8)
        targets = some_targets(tax)
        out = head(torch.randn(len(targets), 8))
        for dense_max in (10_000, 0):
            got = create_loss("expected_distance", tax, head, weight=0.3, metric=metric, partial=partial,
                              dense_max=dense_max)(out, torch.tensor(targets))["labels"].item()
            assert got == pytest.approx(slow_expected_distance(tax, logp_of(head, out), targets, 0.3, metric,
                                                               partial), rel=1e-5)


def test_expected_distance_fathomnet_worked_example(fathomnet):
    """Rank-step distances of the competition's worked examples enter the loss as given."""
    tax = fathomnet
    head = create_head("flat", tax, 4)
    ast, lov = tax.find("Asteronyx"), tax.find("Asteronyx loveni")
    logits = torch.full((1, tax.n_labels), -30.0)
    logits[0, tax.label_index[ast]] = 30.0                  # all mass on the genus Asteronyx
    loss = create_loss("expected_distance", tax, head, weight=1.0, metric="rank_steps")
    got = loss({"labels": logits}, torch.tensor([lov]))["labels"].item()
    assert got == pytest.approx(60.0 + 1.0, abs=1e-3)        # CE ~ 60, distance 1


# ------------------------------------------------------------------ partial labels: no specific wrong leaf
@pytest.mark.parametrize("name,opts", [("ce", {}), ("ce", {"label_smoothing": 0.1}),
                                       ("taxonomy_smoothing", {}), ("soft_labels", {}), ("hxe", {"alpha": 0.4}),
                                       ("expected_distance", {"partial": "zero_inside"})])
def test_partial_labels_keep_relative_probabilities_inside_the_target(plankton, fathomnet, name, opts):
    """For a partial target t, the gradient on the logits of the labels under t is proportional to
    their current probabilities (so a gradient step keeps their ratios: no label under t is
    preferred), and its sum is negative (mass moves into t's subtree)."""
    for tax in (plankton, fathomnet):
        torch.manual_seed(5)
        head = create_head("flat", tax, 8)
        partial = [v for v in some_targets(tax) if v >= 0 and not tax.is_label[v] and len(under(tax, v)) >= 2]
        assert partial
        logits = torch.randn(len(partial), tax.n_labels)
        for b, t in enumerate(partial):      # little mass under t yet: every loss must move mass into it
            logits[b, under(tax, t)] -= 3.0
        logits.requires_grad_(True)
        loss = create_loss(name, tax, head, **opts)({"labels": logits}, torch.tensor(partial))["labels"]
        (g,) = torch.autograd.grad(loss, logits)
        p = torch.softmax(logits.detach(), -1)
        for b, t in enumerate(partial):
            s = under(tax, t)
            ratio = (g[b, s] / p[b, s]).numpy()
            if name == "ce" and opts:      # uniform smoothing adds eps/n_labels to every logit's gradient
                ratio = ((g[b, s] * len(partial) + opts["label_smoothing"] / tax.n_labels) / p[b, s]).numpy()
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3, atol=1e-5)
            assert g[b, s].sum().item() < 0


def test_expected_distance_on_a_partial_target_favours_no_leaf_at_equal_depth(fathomnet):
    tax = fathomnet
    head = create_head("flat", tax, 4)
    genus = [v for v in range(tax.n_nodes) if tax.ranks[v] == "genus" and not tax.is_label[v]
             and len(under(tax, v)) >= 2]
    t = genus[0]
    s = under(tax, t)
    assert len({int(tax.depth[tax.label_ids[i]]) for i in s}) == 1
    logits = torch.zeros(1, tax.n_labels, requires_grad=True)
    loss = create_loss("expected_distance", tax, head, weight=0.5)({"labels": logits}, torch.tensor([t]))["labels"]
    (g,) = torch.autograd.grad(loss, logits)
    np.testing.assert_allclose(g[0, s].numpy(), g[0, s[0]].item(), rtol=1e-6)   # uniform p: equal gradients
    assert g[0, s].sum() < 0


# ------------------------------------------------------------------ multi-hot losses
def slow_multihot(tax, z, targets, kind, violation_weight=0.0, violation="soft", distance_weight=0.0, **kw):
    vals = []
    height = slow_height(tax)
    for b, t in enumerate(targets):
        if t < 0:
            continue
        pos = set(path_up(tax, t))
        below = set(path_up_all_below(tax, t)) if not tax.is_label[t] else set()
        total = 0.0
        p = 1 / (1 + np.exp(-z[b]))
        for v in range(1, tax.n_nodes):
            if v in below:
                continue
            y = 1.0 if v in pos else 0.0
            pv = p[v]
            if kind == "hier_bce":
                term = -(y * math.log(pv) + (1 - y) * math.log(1 - pv))
            elif kind == "focal":
                pt = pv if y else 1 - pv
                term = -(1 - pt) ** kw.get("gamma", 2.0) * math.log(pt)
            else:
                gp, gn, m = kw.get("gamma_pos", 0.0), kw.get("gamma_neg", 4.0), kw.get("clip", 0.05)
                pm = max(pv - m, 0.0)
                term = -((1 - pv) ** gp * math.log(pv)) if y else -(pm ** gn * math.log(1 - pm))
            total += term
        if violation_weight:
            for v in range(1, tax.n_nodes):
                par = int(tax.parent[v])
                if par > 0:
                    if violation == "soft":
                        total += violation_weight * max(p[v] - p[par], 0.0)
                    else:
                        total += violation_weight * float(p[v] > 0.5 and p[par] <= 0.5)
        if distance_weight:
            cands = [v for v in range(1, tax.n_nodes) if p[v] > 0.5]
            best = max(cands, key=lambda v: (tax.depth[v], p[v])) if cands else 0
            if best not in pos and best not in below:
                total += distance_weight * slow_distance(tax, best, t, "path", height) * p[best]
        vals.append(total)
    return mean_valid(vals)


def path_up_all_below(tax: Taxonomy, t: int) -> list[int]:
    return [v for v in range(tax.n_nodes) if v != t and t in path_up(tax, v)]


class NodesHead(torch.nn.Module):
    """A minimal head with raw node logits (stands in for any head with a 'nodes' output)."""

    registry_name = "nodes_stub"
    tasks = ("nodes",)

    def __init__(self, tax):
        super().__init__()
        self.taxonomy = tax


@pytest.mark.parametrize("kind,opts", [
    ("hier_bce", {}), ("hier_bce", {"violation": "count", "violation_weight": 2.0}),
    ("hier_bce", {"violation_weight": 0.0, "distance_weight": 0.5}),
    ("focal", {"gamma": 2.0}), ("focal", {"gamma": 1.0, "violation_weight": 0.5}),
    ("asymmetric", {}), ("asymmetric", {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.0})])
def test_multihot_losses_match_slow_reference(plankton, fathomnet, kind, opts):
    for tax in (plankton, fathomnet):
        torch.manual_seed(6)
        head = NodesHead(tax)
        targets = some_targets(tax)
        z = torch.randn(len(targets), tax.n_nodes) * 3
        got = create_loss(kind, tax, head, **opts)({"nodes": z}, torch.tensor(targets))["nodes"].item()
        ref_opts = dict(opts)
        ref_opts.setdefault("violation_weight", 1.0 if kind == "hier_bce" else 0.0)
        want = slow_multihot(tax, z.double().numpy(), targets, kind, **ref_opts)
        assert got == pytest.approx(want, rel=1e-4), (tax, kind, opts)


def test_multihot_partial_label_masks_the_nodes_below(plankton):
    tax = plankton
    head = create_head("multilabel", tax, 8)
    t = next(v for v in range(1, tax.n_nodes) if not tax.is_label[v] and len(under(tax, v)) >= 2)
    below = path_up_all_below(tax, t)
    for kind in MULTIHOT_LOSSES:
        z = torch.randn(2, tax.n_nodes, requires_grad=True)
        loss = create_loss(kind, tax, head, violation_weight=0.0)({"nodes": z}, torch.tensor([t, -1]))["nodes"]
        (g,) = torch.autograd.grad(loss, z)
        assert torch.equal(g[0, below], torch.zeros(len(below))), kind      # unknown, not negative
        assert (g[0, path_up(tax, t)[:-1]] < 0).all(), kind                 # the known path goes up
        assert torch.equal(g[1], torch.zeros(tax.n_nodes))                  # unlabelled row
        assert g[0, 0] == 0                                                 # the root is not trained
    # an internal label target ("this node exactly") keeps its descendants as negatives
    lab = int(tax.find("copepod_calanoid"))
    z = torch.zeros(1, tax.n_nodes, requires_grad=True)
    loss = create_loss("hier_bce", tax, head, violation_weight=0.0)({"nodes": z}, torch.tensor([lab]))["nodes"]
    (g,) = torch.autograd.grad(loss, z)
    assert (g[0, path_up_all_below(tax, lab)] > 0).all()


def test_multihot_losses_need_a_nodes_output(plankton):
    with pytest.raises(ConfigError, match="needs a head with an output 'nodes'.*'flat'"):
        create_loss("hier_bce", plankton, create_head("flat", plankton, 4))
    head = create_head("multilabel", plankton, 8)
    with pytest.raises(ConfigError, match="violation"):
        create_loss("hier_bce", plankton, head, violation="hard")
    out = head(torch.randn(3, 8), targets=torch.as_tensor(plankton.label_ids[:3]))
    assert torch.isfinite(create_loss("asymmetric", plankton, head)(out, torch.as_tensor(plankton.label_ids[:3]))
                          ["nodes"])


# ------------------------------------------------------------------ per-rank null classes
def test_per_rank_ce_null_mode_and_scheduled_null_masking(fathomnet):
    tax = fathomnet
    torch.manual_seed(7)
    head = create_head("per_rank", tax, 8)
    classes = {lv: c.tolist() for lv, c in head.level_classes().items()}
    genus = next(v for v in range(tax.n_nodes) if tax.ranks[v] == "genus" and not tax.is_label[v]
                 and len(under(tax, v)) >= 2)
    targets = torch.tensor([genus, int(tax.label_ids[0]), -1])
    out = head(torch.randn(3, 8))
    ign = create_loss("per_rank_ce", tax, head)(out, targets)
    null = create_loss("per_rank_ce", tax, head, partial="null")(out, targets)
    # species level: ignored by default (only the label target counts), trained to none in null mode
    y_lab = head.level_targets(targets[1:2])["species"]
    torch.testing.assert_close(ign["species"], F.cross_entropy(out["species"][1:2], y_lab))
    none = classes["species"].index(-1)
    want = (F.cross_entropy(out["species"][0:1], torch.tensor([none]))
            + F.cross_entropy(out["species"][1:2], y_lab)) / 2
    torch.testing.assert_close(null["species"], want)
    for lv in ("kingdom", "phylum", "genus"):                # levels the target determines are unchanged
        torch.testing.assert_close(null[lv], ign[lv])
    # masking: probability 1 drops every none-class term, 0 keeps them; linear schedule between
    masked = create_loss("per_rank_ce", tax, head, partial="null", null_mask_start=1.0, null_mask_end=0.0,
                         null_mask_steps=10)
    assert masked.null_mask_probability() == 1.0
    out_m = masked(out, targets)
    if y_lab.item() != none:
        torch.testing.assert_close(out_m["species"], ign["species"])
    masked.set_step(5)
    assert masked.null_mask_probability() == pytest.approx(0.5)
    masked.set_step(20)
    torch.testing.assert_close(masked(out, targets)["species"], null["species"])
    assert masked.step == 21
    masked.eval()
    masked.set_step(0)
    torch.testing.assert_close(masked(out, targets)["species"], null["species"])   # no masking in eval
    with pytest.raises(ConfigError, match="partial"):
        create_loss("per_rank_ce", tax, head, partial="none")
    with pytest.raises(ConfigError, match="null_mask_start"):
        create_loss("per_rank_ce", tax, head, null_mask_start=2.0)


# ------------------------------------------------------------------ attributes and the composite loss
def test_attribute_ce_and_composite_loss(plankton):
    tax = plankton
    model = create_model(tax, in_features=8, head="flat", attributes={"stage": 3, "view": 2})
    x = torch.randn(5, 8)
    out = model(features=x)
    y = torch.as_tensor(tax.label_ids[[0, 1, 2, 3, 4]])
    extra = {"attr/stage": torch.tensor([0, 2, -1, 1, 1]), "attr/view": torch.tensor([-1, -1, -1, -1, -1])}
    names = model.attributes.n_classes
    loss = with_attribute_losses(create_loss("hxe", tax, model.head), names)
    assert isinstance(loss, CompositeLoss)
    assert loss.tasks == ("labels", "attr/stage", "attr/view")
    got = loss(out, y, extra)
    keep = extra["attr/stage"] >= 0
    torch.testing.assert_close(got["attr/stage"], F.cross_entropy(out["attr/stage"][keep], extra["attr/stage"][keep]))
    torch.testing.assert_close(got["labels"], create_loss("hxe", tax, model.head)(out, y)["labels"])
    assert got["attr/view"].item() == 0.0 and got["attr/view"].requires_grad      # no target: connected zero
    total = StaticWeighting(tasks=loss.tasks)(got)
    total.backward()
    assert all(p.grad is not None for p in model.attributes.parameters())
    assert with_attribute_losses(create_loss("ce", tax, model.head), None).registry_name == "ce"
    built = create_loss("composite", tax, model.head, main={"name": "taxonomy_smoothing", "alpha": 0.2},
                        attributes=["stage"], attribute_label_smoothing=0.1)
    assert built.tasks == ("labels", "attr/stage")
    with pytest.raises(DataError, match=r"extra_targets\['attr/stage'\]"):
        built(out, y)
    with pytest.raises(DataError, match="outside -1..2"):
        built(out, y, {"attr/stage": torch.tensor([0, 3, 0, 0, 0])})
    with pytest.raises(ConfigError, match="attribute names"):
        create_loss("attribute_ce", tax, model.head)
    with pytest.raises(ConfigError, match="expects the output 'attr/colour'"):
        create_loss("attribute_ce", tax, model.head, attributes=["colour"])(out, y, {"attr/colour": y})


# ------------------------------------------------------------------ every loss x every head: gradients, empty batches
def compatible(loss_name: str, head) -> bool:
    if loss_name in MULTIHOT_LOSSES:
        return "nodes" in head.tasks
    if loss_name == "per_rank_ce":
        return hasattr(head, "level_targets")
    return True


def test_every_loss_with_every_head_gives_finite_gradients_and_connected_zeros(fathomnet):
    tax = fathomnet
    targets = torch.tensor([t for t in some_targets(tax)])
    for head_name in list_heads():
        torch.manual_seed(8)
        head = create_head(head_name, tax, 8)
        for loss_name in NEW_LOSSES + MULTIHOT_LOSSES + ("ce", "per_rank_ce"):
            if not compatible(loss_name, head):
                continue
            loss = create_loss(loss_name, tax, head)
            x = torch.randn(len(targets), 8)
            out = head(x, targets=targets) if head.uses_targets else head(x)
            head.zero_grad()
            total = StaticWeighting()(loss(out, targets))
            assert torch.isfinite(total), (head_name, loss_name)
            total.backward()
            grads = [p.grad for p in head.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), (head_name, loss_name)
            assert any(g.abs().sum() > 0 for g in grads), (head_name, loss_name)
            head.zero_grad()
            none = torch.full((3,), -1)
            x = torch.randn(3, 8)
            out = head(x, targets=none) if head.uses_targets else head(x)
            total = StaticWeighting()(loss(out, none))
            assert total.item() == 0.0
            total.backward()
            assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad))
                       for p in head.parameters()), (head_name, loss_name)


def test_losses_are_float32_under_bf16_autocast_and_reject_bad_targets(plankton):
    head = create_head("flat", plankton, 8)
    y = torch.as_tensor(plankton.label_ids[:4])
    for name in NEW_LOSSES:
        loss = create_loss(name, plankton, head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = loss(head(torch.randn(4, 8)), y)["labels"]
        assert v.dtype == torch.float32 and torch.isfinite(v)
        with pytest.raises(DataError, match="not node ids"):
            loss(head(torch.randn(1, 8)), torch.tensor([plankton.n_nodes]))
    with pytest.raises(ConfigError, match="rank_steps needs a taxonomy with ranks"):
        create_loss("expected_distance", plankton, head, metric="rank_steps")
    with pytest.raises(ConfigError, match="alpha"):
        create_loss("taxonomy_smoothing", plankton, head, alpha=1.0)
    with pytest.raises(ConfigError, match="not a distance metric"):
        create_loss("soft_labels", plankton, head, metric="euclid")


def test_soft_labels_beta_inf_is_the_one_hot_limit_equal_to_ce(shared_data):
    """beta = inf used to give NaN (-inf * 0 in the softmax); it is the limit: ce, partial labels too."""
    from test_models import plankton_tree

    tax = plankton_tree(shared_data)
    torch.manual_seed(0)
    head = create_head("flat", tax, 8)
    partial = [int(v) for v in range(1, tax.n_nodes) if not tax.is_label[v]][:4]
    targets = torch.tensor([int(v) for v in tax.label_ids[::15]] + partial + [-1])
    out = head(torch.randn(len(targets), 8))
    got = create_loss("soft_labels", tax, head, beta=float("inf"))(out, targets)["labels"]
    want = create_loss("ce", tax, head)(out, targets)["labels"]
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
