"""The C-HMCNN max constraint loss (``constraint="mcm"``) of the node multi-hot losses
(hier_bce, focal, asymmetric), against a slow reference written here with explicit loops over
nodes and descendant sets, on the real trees built by the real importer: NDSB plankton
(unranked, internal labels) and FathomNet 2025 (7 ranks, labels at mixed ranks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_models import fathomnet_tree, plankton_tree

from taxonomist.errors import ConfigError
from taxonomist.losses import create_loss
from taxonomist.losses.multilabel import softplus
from taxonomist.models.heads import create_head
from taxonomist.models.tree_tensors import DepthLevels
from taxonomist.taxonomy import Taxonomy

KINDS = ("hier_bce", "focal", "asymmetric")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plankton(shared_data) -> Taxonomy:
    return plankton_tree(shared_data)


@pytest.fixture(scope="module")
def fathomnet(shared_data) -> Taxonomy:
    return fathomnet_tree(shared_data)


class NodesHead(torch.nn.Module):
    """Stands in for any head with a 'nodes' output (raw node logits)."""

    registry_name = "nodes_stub"
    tasks = ("nodes",)

    def __init__(self, tax):
        super().__init__()
        self.taxonomy = tax


# ------------------------------------------------------------------ slow reference (plain Python)
def ancestors_or_self(tax: Taxonomy, v: int) -> list[int]:
    out = [int(v)]
    while tax.parent[out[-1]] >= 0:
        out.append(int(tax.parent[out[-1]]))
    return out


def descendant_sets(tax: Taxonomy) -> list[set[int]]:
    """D(v): v and every node below it, by walking each node's parent chain."""
    d: list[set[int]] = [set() for _ in range(tax.n_nodes)]
    for u in range(tax.n_nodes):
        for a in ancestors_or_self(tax, u):
            d[a].add(u)
    return d


def term(kind: str, y: float, p: float, kw: dict) -> float:
    """The per-node loss of one node with probability p and target y."""
    if kind == "hier_bce":
        return -(kw.get("pos_weight", 1.0) * math.log(p)) if y else -math.log(1 - p)
    if kind == "focal":
        g, a = kw.get("gamma", 2.0), kw.get("balance")
        pt = p if y else 1 - p
        w = 1.0 if a is None else (a if y else 1 - a)
        return -w * (1 - pt) ** g * math.log(pt)
    gp, gn, m = kw.get("gamma_pos", 0.0), kw.get("gamma_neg", 4.0), kw.get("clip", 0.05)
    if y:
        return -((1 - p) ** gp) * math.log(p)
    pm = max(p - m, 0.0)
    return -(pm ** gn) * math.log(1 - pm)


def slow_loss(tax: Taxonomy, z: np.ndarray, targets: list[int], kind: str, constraint: str,
              violation_weight: float = 0.0, **kw) -> float:
    """Mean over labelled samples of the sum over known non-root nodes of term(y_v, h_v)
    (+ the soft violation penalty on the raw probabilities)."""
    desc = descendant_sets(tax)
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue
        p = [1 / (1 + math.exp(-float(x))) for x in z[b]]
        pos = set(ancestors_or_self(tax, t))
        unknown = set() if tax.is_label[t] else desc[t] - {t}
        y = [1.0 if v in pos else 0.0 for v in range(tax.n_nodes)]
        total = 0.0
        for v in range(1, tax.n_nodes):
            if v in unknown:
                continue
            if constraint == "none":
                h = p[v]
            elif y[v]:                                    # best known-positive descendant
                h = max(p[u] for u in desc[v] if y[u] and u not in unknown)
            else:                                         # best descendant of any kind
                h = max(p[u] for u in desc[v])
            total += term(kind, y[v], h, kw)
        if violation_weight:
            for v in range(1, tax.n_nodes):
                par = int(tax.parent[v])
                if par > 0:
                    total += violation_weight * max(p[v] - p[par], 0.0)
        vals.append(total)
    return float(np.mean(vals)) if vals else 0.0


def mixed_targets(tax: Taxonomy, seed: int = 0) -> list[int]:
    """Leaf labels, internal labels, partial (non-label, covered) nodes, the root and -1."""
    rng = np.random.default_rng(seed)
    labels = tax.label_ids
    leaves = [int(v) for v in labels if tax.is_leaf[v]]
    internal = [int(v) for v in labels if not tax.is_leaf[v]]
    covered = tax.subtree_sum(tax.is_label.astype(np.float64)) > 0
    partial = [v for v in range(1, tax.n_nodes) if covered[v] and not tax.is_label[v]]
    return ([int(x) for x in rng.choice(leaves, 4, replace=False)] + internal[:3]
            + [int(x) for x in rng.choice(partial, 4, replace=False)] + [0, -1])


def loss_and_grad(loss, z: torch.Tensor, targets) -> tuple[float, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    v = loss({"nodes": z}, torch.as_tensor(targets))["nodes"]
    (g,) = torch.autograd.grad(v, z)
    return v.item(), g


# ------------------------------------------------------------------ (1) values against the slow reference
@pytest.mark.parametrize("kind,opts", [
    ("hier_bce", {"violation_weight": 0.0}), ("hier_bce", {"pos_weight": 3.0}),
    ("focal", {}), ("focal", {"gamma": 1.0, "balance": 0.25, "violation_weight": 0.5}),
    ("asymmetric", {}), ("asymmetric", {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.0})])
@pytest.mark.parametrize("constraint", ["mcm", "none"])
def test_matches_slow_reference_on_real_trees(plankton, fathomnet, kind, opts, constraint):
    for tax in (plankton, fathomnet):
        torch.manual_seed(11)
        targets = mixed_targets(tax)
        z = torch.randn(len(targets), tax.n_nodes) * 3
        got = create_loss(kind, tax, NodesHead(tax), constraint=constraint, **opts)(
            {"nodes": z}, torch.tensor(targets))["nodes"].item()
        ref = dict(opts)
        ref.setdefault("violation_weight", 1.0 if kind == "hier_bce" else 0.0)
        want = slow_loss(tax, z.double().numpy(), targets, kind, constraint, **ref)
        assert got == pytest.approx(want, rel=1e-4), (tax.n_nodes, kind, opts, constraint)


def test_mcm_changes_the_loss_and_only_through_the_max(plankton):
    """On logits that are already coherent along every subtree (each node above all its descendants)
    the max is the node itself, so mcm and none agree; on random logits they differ."""
    tax = plankton
    targets = mixed_targets(tax)
    depth = torch.as_tensor(tax.depth.astype(np.float32))
    z = -depth[None, :].expand(len(targets), -1) + 0.01 * torch.rand(len(targets), tax.n_nodes)
    for kind in KINDS:
        a = create_loss(kind, tax, NodesHead(tax), constraint="mcm")({"nodes": z}, torch.tensor(targets))["nodes"]
        b = create_loss(kind, tax, NodesHead(tax))({"nodes": z}, torch.tensor(targets))["nodes"]
        torch.testing.assert_close(a, b)
        zr = torch.randn_like(z) * 3
        a = create_loss(kind, tax, NodesHead(tax), constraint="mcm")({"nodes": zr}, torch.tensor(targets))["nodes"]
        b = create_loss(kind, tax, NodesHead(tax))({"nodes": zr}, torch.tensor(targets))["nodes"]
        assert abs(a.item() - b.item()) > 1e-3 * abs(b.item()), kind


def test_path_cummax_equals_masked_logit_subtree_max(fathomnet):
    """The positives' h, taken in the loss as a reverse cummax along the root path, equals the
    subtree max of the logits masked to the known positives (-inf elsewhere)."""
    tax = fathomnet
    loss = create_loss("hier_bce", tax, NodesHead(tax), constraint="mcm", violation_weight=0.0)
    levels = DepthLevels(tax)
    targets = torch.tensor([t for t in mixed_targets(tax) if t >= 0])
    torch.manual_seed(3)
    z = torch.randn(len(targets), tax.n_nodes) * 3
    y, known = loss.multi_hot(targets)
    masked = torch.where((y > 0) & known, z, torch.full_like(z, float("-inf")))
    h_pos = levels.subtree_max(masked)
    h_neg = levels.subtree_max(z)
    h = torch.where(y > 0, h_pos, h_neg)
    dense = torch.where(known, F.binary_cross_entropy_with_logits(h, y, reduction="none"), torch.zeros_like(z))
    want = dense.sum(-1).mean()
    got = loss({"nodes": z}, targets)["nodes"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ (2) the gradient goes to the max
def test_gradient_reaches_the_node_attaining_the_max_and_not_the_others(plankton):
    tax = plankton
    head = NodesHead(tax)
    loss = create_loss("hier_bce", tax, head, constraint="mcm", violation_weight=0.0)
    desc = descendant_sets(tax)
    # a negative node v whose children are all leaves (>= 2 of them), and a target in another branch
    v = next(u for u in range(1, tax.n_nodes)
             if len(desc[u]) >= 3 and all(tax.is_leaf[c] for c in desc[u] - {u}))
    c1, c2 = sorted(desc[v] - {v})[:2]
    top = ancestors_or_self(tax, v)[-2]
    t = next(int(x) for x in tax.label_ids if top not in ancestors_or_self(tax, int(x)) and tax.is_leaf[x])
    z = torch.full((1, tax.n_nodes), -8.0)
    z[0, v], z[0, c1], z[0, c2] = 0.0, 2.0, 1.0
    path = ancestors_or_self(tax, t)[:-1]                      # t ... depth 1 (root left out)
    z[0, t] = 3.0
    for k, a in enumerate(path[1:], start=1):                 # ancestors below the best positive t
        z[0, a] = -1.0 - k
    _, g = loss_and_grad(loss, z, [t])
    sig = torch.sigmoid
    negatives_over_c1 = [a for a in ancestors_or_self(tax, c1)[:-1]]   # c1, v, ..., top: all negatives
    # c1 is the max of its own subtree, of v's and of every ancestor's: one BCE term each
    assert g[0, c1].item() == pytest.approx(len(negatives_over_c1) * sig(torch.tensor(2.0)).item(), rel=1e-5)
    assert g[0, v].item() == 0.0                               # v is not the max of its own subtree
    assert g[0, c2].item() == pytest.approx(sig(torch.tensor(1.0)).item(), rel=1e-5)   # its own term only
    # the positives: every path node's h is the best positive below it, t
    assert g[0, t].item() == pytest.approx(-len(path) * sig(torch.tensor(-3.0)).item(), rel=1e-5)
    assert all(g[0, a].item() == 0.0 for a in path[1:])       # pushed up only through t
    assert g[0, 0].item() == 0.0
    # without the constraint every node gets its own BCE gradient
    _, g0 = loss_and_grad(create_loss("hier_bce", tax, head, violation_weight=0.0), z, [t])
    assert g0[0, v].item() == pytest.approx(0.5, rel=1e-6)
    assert all(g0[0, a].item() < 0 for a in path)


def test_partial_target_under_mcm_masks_below_and_ignores_unknown_maxima(plankton):
    """A partial target: the unknown nodes below t get no gradient even when one of them is the
    highest logit of t's subtree (it is no known positive, and no negative term covers it)."""
    tax = plankton
    desc = descendant_sets(tax)
    t = next(v for v in range(1, tax.n_nodes) if not tax.is_label[v] and len(desc[v]) >= 3)
    below = sorted(desc[t] - {t})
    z = torch.zeros(2, tax.n_nodes)
    z[0, below[0]] = 10.0
    for kind in KINDS:
        loss = create_loss(kind, tax, NodesHead(tax), constraint="mcm", violation_weight=0.0)
        _, g = loss_and_grad(loss, z, [t, -1])
        assert torch.equal(g[0, below], torch.zeros(len(below))), kind
        assert g[0, t] < 0, kind                              # t is its own best known positive
        assert torch.equal(g[1], torch.zeros(tax.n_nodes)), kind


# ------------------------------------------------------------------ (3) constraint "none" is unchanged
def dense_reference(loss, kind: str, z: torch.Tensor, targets: torch.Tensor, opts: dict) -> torch.Tensor:
    """The dense form the losses used before the mcm option: per-node terms on p over a [B, n_nodes]
    multi-hot and known mask, plus the soft violation penalty."""
    y, known = loss.multi_hot(targets.clamp(min=0))
    p = torch.sigmoid(z)
    if kind == "hier_bce":
        pw = opts.get("pos_weight")
        per = F.binary_cross_entropy_with_logits(z, y, reduction="none",
                                                 pos_weight=None if pw is None else torch.tensor(pw))
    elif kind == "focal":
        nll = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        pt = y * p + (1 - y) * (1 - p)
        per = (1 - pt).pow(opts.get("gamma", 2.0)) * nll
    else:
        pm = (p - opts.get("clip", 0.05)).clamp(min=0)
        per = (y * (1 - p).pow(opts.get("gamma_pos", 0.0)) * -F.logsigmoid(z)
               + (1 - y) * pm.pow(opts.get("gamma_neg", 4.0)) * -torch.log1p(-pm))
    per = torch.where(known, per, torch.zeros_like(per)).sum(-1)
    vw = opts.get("violation_weight", 1.0 if kind == "hier_bce" else 0.0)
    if vw:
        kids = torch.as_tensor(np.flatnonzero(loss.taxonomy.parent > 0))
        par = torch.as_tensor(loss.taxonomy.parent[kids.numpy()])
        per = per + vw * torch.relu(p[:, kids] - p[:, par]).sum(-1)
    valid = targets >= 0
    return torch.where(valid, per, torch.zeros_like(per)).sum() / valid.sum().clamp(min=1)


@pytest.mark.parametrize("kind,opts", [
    ("hier_bce", {}), ("hier_bce", {"pos_weight": 2.0, "violation_weight": 0.3}),
    ("focal", {}), ("focal", {"gamma": 3.0, "violation_weight": 1.0}),
    ("asymmetric", {}), ("asymmetric", {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.1})])
def test_constraint_none_is_the_default_and_unchanged(plankton, fathomnet, kind, opts):
    for tax in (plankton, fathomnet):
        torch.manual_seed(5)
        targets = torch.tensor(mixed_targets(tax))
        z = torch.randn(len(targets), tax.n_nodes) * 4
        default = create_loss(kind, tax, NodesHead(tax), **opts)
        explicit = create_loss(kind, tax, NodesHead(tax), constraint="none", **opts)
        v1, g1 = loss_and_grad(default, z, targets)
        v2, g2 = loss_and_grad(explicit, z, targets)
        assert v1 == v2 and torch.equal(g1, g2)
        zz = z.clone().requires_grad_(True)
        want = dense_reference(default, kind, zz, targets, opts)
        (gw,) = torch.autograd.grad(want, zz)
        assert v1 == pytest.approx(want.item(), rel=1e-5), (kind, opts)
        torch.testing.assert_close(g1, gw, rtol=1e-4, atol=1e-6)


def test_unknown_constraint_is_a_config_error_naming_the_key_and_values(plankton):
    head = create_head("multilabel", plankton, 8)
    for kind in KINDS:
        with pytest.raises(ConfigError, match=r"loss\.constraint='max'.*'none', 'mcm'"):
            create_loss(kind, plankton, head, constraint="max")
    with pytest.raises(ConfigError, match="constraint"):
        create_loss("hier_bce", plankton, head, constraint=None)


def test_softplus_matches_torch_on_extreme_logits():
    x = torch.tensor([-300.0, -90.0, -30.0, -1.0, 0.0, 1e-4, 2.0, 25.0, 69.5, 88.0, 120.0, 1e4],
                     requires_grad=True)
    got = softplus(x)
    torch.testing.assert_close(got, F.softplus(x.detach().double()).float(), rtol=1e-6, atol=2e-7)
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(x.detach()))


def test_mcm_is_finite_with_huge_logits_and_every_kind(fathomnet):
    tax = fathomnet
    targets = mixed_targets(tax)
    z = torch.randn(len(targets), tax.n_nodes) * 200
    for kind in KINDS:
        for opts in ({}, {"violation_weight": 1.0, "distance_weight": 0.5}):
            v, g = loss_and_grad(create_loss(kind, tax, NodesHead(tax), constraint="mcm", **opts), z, targets)
            assert math.isfinite(v) and torch.isfinite(g).all(), (kind, opts)


# ------------------------------------------------------------------ (4) a short training run
def test_short_training_run_with_mcm_learns_coherent_scores(fathomnet):
    tax = fathomnet
    torch.manual_seed(0)
    labels = torch.as_tensor(tax.label_ids[:12])
    means = torch.randn(len(labels), 16) * 2
    y = torch.arange(len(labels)).repeat(8)
    x = means[y] + 0.3 * torch.randn(len(y), 16)
    targets = labels[y]
    head = create_head("multilabel", tax, 16, scale=10.0)
    loss = create_loss("hier_bce", tax, head, constraint="mcm")
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(40):
        head.train()
        value = loss(head(x, targets=targets), targets)["nodes"]
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = head(x)
        probs = head.node_probs(out)
        pred = head.label_log_probs(out).argmax(-1)
    assert value.item() < 0.5 * first
    assert (torch.as_tensor(tax.label_ids)[pred] == targets).float().mean() > 0.9
    parent = torch.as_tensor(np.maximum(tax.parent, 0))
    assert (probs[:, 1:] <= probs[:, parent[1:]] + 1e-6).all()          # coherent: child <= parent
