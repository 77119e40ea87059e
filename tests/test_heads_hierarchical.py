"""Hierarchical heads: hsoftmax, refined, conditional, arcface, arcface_per_rank, multilabel,
attribute heads, and the model's targets / shared-layer plumbing.

Every tree comes from the real importer (``taxonomist.taxonomy.load``) on real files:
NDSB plankton (121 labels, 18 internal label nodes, uneven depth), FathomNet 2025
(7 ranks, labels at mixed ranks, lineages that skip ranks), CIFAR-100 5-level. The
reference implementations here are slow and independent: explicit Python loops over
root paths, sibling lists and labels, written from the formulas, not from the heads' code.
A hierarchical head must not silently equal a flat head (the Linnaeus bug in FIELD_NOTES):
moving a real leaf to another parent in a copy of class_paths.tsv must change its predictions
for the same per-node weights, while the flat ArcFace control must not change.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from taxonomist.errors import ConfigError
from taxonomist.losses import create_loss
from taxonomist.models import create_head, create_model, list_heads
from taxonomist.models.heads import AttributeHeads, HierarchicalSoftmaxHead, arc_margin
from taxonomist.taxonomy import Taxonomy, load

HEADS = ["hsoftmax", "refined", "conditional", "arcface", "arcface_per_rank", "multilabel"]
SUBTREE_MASS_HEADS = ["hsoftmax", "refined", "conditional", "arcface", "arcface_per_rank"]
LEVEL_HEADS = ["refined", "conditional", "arcface_per_rank"]
D = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trees(shared_data) -> dict[str, Taxonomy]:
    return {"plankton": load(shared_data / "plankton" / "class_paths.tsv"),
            "fathomnet": load(shared_data / "taxonomies" / "fathomnet2025_lineage.csv"),
            "cifar": load(shared_data / "taxonomies" / "cifar100_5level.csv")}


@pytest.fixture(scope="module")
def plankton(trees) -> Taxonomy:
    return trees["plankton"]


def make(name: str, tax: Taxonomy, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    return create_head(name, tax, D, **cfg)


def run(head, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return head(x, targets=targets) if head.uses_targets else head(x)


def mixed_targets(tax: Taxonomy, n: int, seed: int = 0) -> torch.Tensor:
    """Label nodes, partial labels (internal non-label nodes with labels below) and -1."""
    rng = np.random.default_rng(seed)
    partial = np.flatnonzero(~tax.is_label & ~tax.is_leaf)
    partial = partial[partial > 0]
    t = rng.choice(tax.label_ids, n)
    t[: n // 4] = rng.choice(partial, n // 4)
    t[-1] = -1
    return torch.as_tensor(t, dtype=torch.long)


# ----------------------------------------------------------------- all heads, all real trees
def test_heads_are_registered():
    assert set(HEADS) <= set(list_heads())


@pytest.mark.parametrize("tree", ["plankton", "fathomnet", "cifar"])
@pytest.mark.parametrize("name", HEADS)
def test_distribution_sums_to_one_and_node_probs_are_coherent(trees, tree, name):
    tax = trees[tree]
    head = make(name, tax).train()
    x = torch.randn(6, D) * 3
    out = run(head, x, mixed_targets(tax, 6))
    lp = head.label_log_probs(out)
    assert lp.shape == (6, tax.n_labels) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    nodes = head.node_probs(out).detach().double().numpy()
    assert nodes.shape == (6, tax.n_nodes)
    np.testing.assert_allclose(nodes[:, 0], 1.0, atol=1e-5)
    child = np.arange(1, tax.n_nodes)
    assert (nodes[:, tax.parent[child]] >= nodes[:, child] - 1e-6).all(), "a child outscores its parent"
    if name in SUBTREE_MASS_HEADS:
        # slow reference: a node's probability = its own label mass + the sum of its children's
        lab = lp.exp().detach().double().numpy()
        for v in range(tax.n_nodes):
            own = lab[:, tax.label_index[v]] if tax.is_label[v] else 0.0
            kids = nodes[:, list(tax.children(v))].sum(axis=1)
            np.testing.assert_allclose(nodes[:, v], own + kids, atol=2e-5)


def test_buffers_are_not_in_the_state_dict(plankton):
    for name in HEADS:
        head = make(name, plankton)
        params = {k for k, _ in head.named_parameters()}
        assert set(head.state_dict()) == params, name


# ----------------------------------------------------------------- hsoftmax
def slow_hsoftmax(tax: Taxonomy, head: HierarchicalSoftmaxHead, z: np.ndarray) -> np.ndarray:
    """Explicit path products: for every label walk root -> label, softmax over the options of each node
    on the way (its children that have a label below them, plus 'stop' for an internal label)."""
    nodes = head.branch_nodes.numpy().tolist()
    stops = head.branch_is_stop.numpy().tolist()
    col = {(n, s): i for i, (n, s) in enumerate(zip(nodes, stops))}
    has_label_below = {v: bool(tax.descendants_mask(v)[tax.label_ids].any()) for v in range(tax.n_nodes)}

    def options(u: int) -> list[tuple[int, bool]]:
        opts = [(int(c), False) for c in tax.children(u) if has_label_below[int(c)]]
        if tax.is_label[u] and not tax.is_leaf[u]:
            opts.append((u, True))
        return opts

    def cond(b: int, u: int, option: tuple[int, bool]) -> float:
        opts = options(u)
        if len(opts) == 1:
            assert option not in col, "a single option needs no parameter"
            return 0.0
        logits = [z[b, col[o]] for o in opts]
        m = max(logits)
        return z[b, col[option]] - (m + math.log(sum(math.exp(v - m) for v in logits)))

    out = np.zeros((z.shape[0], tax.n_labels))
    for b in range(z.shape[0]):
        for i, label in enumerate(tax.label_ids):
            path = tax.ancestors(int(label))
            total = sum(cond(b, path[k - 1], (path[k], False)) for k in range(1, len(path)))
            if not tax.is_leaf[label]:
                total += cond(b, int(label), (int(label), True))
            out[b, i] = total
    return out


def test_hsoftmax_equals_slow_path_products_on_plankton(plankton):
    head = make("hsoftmax", plankton)
    # 150 non-root nodes + 18 internal-label stops, minus the only child of a non-label node (no choice there)
    lonely = (plankton.n_children == 1) & ~plankton.is_label
    assert head.n_branches == plankton.n_nodes - 1 + 18 - int(lonely.sum()) and lonely.sum() == 1
    out = head(torch.randn(3, D) * 2)
    ref = slow_hsoftmax(plankton, head, out["branches"].detach().double().numpy())
    np.testing.assert_allclose(head.label_log_probs(out).detach().numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(np.exp(ref).sum(1), 1.0, atol=1e-9)


def test_hsoftmax_with_unlabelled_nodes_and_single_child_groups(trees):
    """FathomNet keeps only some labels: nodes without labels get probability 0, nothing leaks."""
    fat = trees["fathomnet"]
    keep = fat.label_ids[::3]
    tax = fat.with_labels(keep)
    head = make("hsoftmax", tax)
    out = head(torch.randn(4, D) * 3)
    lp = head.label_log_probs(out)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    ref = slow_hsoftmax(tax, head, out["branches"].detach().double().numpy())
    np.testing.assert_allclose(lp.detach().numpy(), ref, atol=2e-5)
    covered = tax.subtree_sum(tax.is_label.astype(np.int64)) > 0
    nodes = head.node_probs(out).detach().numpy()
    assert (~covered).any() and np.all(nodes[:, ~covered] == 0)


def test_hsoftmax_conditionals_and_stops(plankton):
    head = make("hsoftmax", plankton)
    out = head(torch.randn(2, D))
    cond = head.conditional_log_probs(out).exp().detach().numpy()
    stop = head.stop_log_probs(out).exp().detach().numpy()
    internal_labels = plankton.label_ids[~plankton.is_leaf[plankton.label_ids]]
    stop_of = dict(zip(internal_labels.tolist(), range(len(internal_labels))))
    for u in plankton.internal_nodes:        # each sibling group (with the stop option) sums to 1
        total = cond[:, plankton.children(u)].sum(1) + (stop[:, stop_of[u]] if u in stop_of else 0)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


# ----------------------------------------------------------------- refined / conditional
def level_of_label(tax: Taxonomy, head, label: int) -> list[int]:
    """Slow: the class index of one label at every level of a per-level head (none class = its index)."""
    classes = [c.numpy().tolist() for c in head.level_classes().values()]
    anc = tax.ancestors(label)
    out = []
    for j, cls in enumerate(classes):
        if tax.has_ranks:
            hit = [a for a in anc if tax.ranks[a] == head.levels[j]]
        else:
            hit = [a for a in anc if tax.depth[a] == j + 1]
        out.append(cls.index(hit[0]) if hit else cls.index(-1))
    return out


def slow_refined(tax: Taxonomy, head, base: list[np.ndarray], eps: float) -> list[np.ndarray]:
    codes = [level_of_label(tax, head, int(label)) for label in tax.label_ids]
    out = [base[0]]
    for j in range(1, len(base)):
        h = np.zeros((base[j - 1].shape[1], base[j].shape[1]))
        for c in codes:
            h[c[j - 1], c[j]] = 1.0
        p = np.exp(out[-1] - out[-1].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        prior = np.log(p @ h + eps)
        prior[:, h.sum(0) == 0] = 0.0
        out.append(base[j] + prior)
    return out


@pytest.mark.parametrize("tree", ["plankton", "fathomnet"])
def test_refined_equals_the_design_formula(trees, tree):
    tax = trees[tree]
    head = make("refined", tax, eps=1e-4)
    x = torch.randn(3, D) * 3
    out = head(x)
    head.refine = False
    base = head(x)
    ref = slow_refined(tax, head, [base[lv].detach().double().numpy() for lv in head.levels], 1e-4)
    for lv, r in zip(head.levels, ref):
        np.testing.assert_allclose(out[lv].detach().numpy(), r, atol=1e-4, rtol=1e-5)
    # product of experts of the refined levels, renormalised over labels (slow)
    lps = [out[lv].detach().double().log_softmax(-1).numpy() for lv in head.levels]
    score = np.array([[sum(lps[j][b, c] for j, c in enumerate(level_of_label(tax, head, int(label))))
                       for label in tax.label_ids] for b in range(3)])
    score -= np.log(np.exp(score).sum(1, keepdims=True))
    np.testing.assert_allclose(head.label_log_probs(out).detach().numpy(), score, atol=1e-4)


def test_refinement_carries_the_lower_levels_gradient_to_the_upper_level(plankton):
    head = make("refined", plankton)
    sizes = head.sizes
    x = torch.randn(4, D)
    for refine, expect in ((True, True), (False, False)):
        head.zero_grad()
        head.refine = refine
        head(x)[head.levels[-1]].logsumexp(-1).sum().backward()
        g_top = head.linear.weight.grad[: sizes[0]].abs().sum().item()
        assert (g_top > 0) == expect


def test_level_heads_train_with_per_rank_ce_and_ce(trees):
    tax = trees["fathomnet"]
    # every label once (hsoftmax only updates the sibling groups on a target's path), partial labels, -1
    targets = torch.cat([torch.as_tensor(tax.label_ids), mixed_targets(tax, 12, seed=1)])
    for name in LEVEL_HEADS + ["hsoftmax", "arcface", "multilabel"]:
        head = make(name, tax).train()
        losses = ["ce"] + (["per_rank_ce"] if name in LEVEL_HEADS else [])
        for loss_name in losses:
            loss_fn = create_loss(loss_name, tax, head)
            head.zero_grad()
            total = sum(loss_fn(run(head, torch.randn(len(targets), D), targets), targets).values())
            assert torch.isfinite(total)
            total.backward()
            # every row (class / branch / node) learns, except the single class of a one-class level
            # (FathomNet's kingdom: a softmax over one class is constant)
            sizes = getattr(head, "sizes", [])
            fixed = torch.cat([torch.full((n,), n == 1) for n in sizes]) if sizes else torch.zeros(0, dtype=bool)
            for pname, p in head.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (name, loss_name, pname)
                learns = p.grad.abs().reshape(p.shape[0], -1).sum(1) > 0
                expect = ~fixed if len(fixed) == p.shape[0] else torch.ones_like(learns)
                assert torch.equal(learns, expect), (name, loss_name, pname)


def test_hard_routing_is_one_hot_and_inference_only(plankton):
    head = make("conditional", plankton, routing="hard").eval()
    x = torch.randn(5, D) * 3
    with torch.no_grad():
        routes = head.routing_probs(x)
        assert len(routes) == len(head.levels) - 1
        for p in routes.values():
            assert ((p == 0) | (p == 1)).all() and (p.sum(-1) == 1).all()
        out = head(x)
    torch.testing.assert_close(head.label_log_probs(out).exp().sum(-1), torch.ones(5))
    head.train()
    with pytest.raises(ConfigError, match="inference-only"):
        head(x)


def test_gumbel_is_noisy_in_training_and_deterministic_in_eval(plankton):
    soft = make("conditional", plankton, routing="soft", temperature=0.5)
    gumbel = make("conditional", plankton, routing="gumbel", temperature=0.5)
    gumbel.load_state_dict(soft.state_dict())
    x = torch.randn(4, D)

    def levels(head):
        out = head(x)
        return torch.cat([out[lv] for lv in head.levels], dim=1)

    soft.train(), gumbel.train()
    torch.manual_seed(1)
    a, b, s = levels(gumbel), levels(gumbel), levels(soft)
    assert (a - s).abs().max() > 0.1 and (a - b).abs().max() > 0.1
    soft.eval(), gumbel.eval()
    torch.testing.assert_close(levels(gumbel), levels(gumbel))
    torch.testing.assert_close(levels(gumbel), levels(soft))
    hard_eval = make("conditional", plankton, routing="gumbel", eval_routing="hard").eval()
    routes = hard_eval.routing_probs(x)
    assert all(((p == 0) | (p == 1)).all() for p in routes.values())


def test_option_errors(plankton):
    with pytest.raises(ConfigError, match="routing"):
        create_head("conditional", plankton, D, routing="argmax")
    with pytest.raises(ConfigError, match="eval_routing"):
        create_head("conditional", plankton, D, eval_routing="gumbel")
    with pytest.raises(ConfigError, match="eps"):
        create_head("refined", plankton, D, eps=0)
    with pytest.raises(ConfigError, match="margin"):
        create_head("arcface", plankton, D, margin=2.0)
    with pytest.raises(ConfigError, match="no option"):
        create_head("hsoftmax", plankton, D, temperature=2)


# ----------------------------------------------------------------- ArcFace
def test_arcface_margin_only_on_label_targets_in_training(plankton):
    head = make("arcface", plankton, scale=16.0, margin=0.4)
    x = torch.randn(6, D)
    label_nodes = plankton.label_ids[[0, 5, 17, 40]]
    genus_like = int(plankton.find("PROTISTS"))          # not a label: a partial target
    assert not plankton.is_label[genus_like]
    targets = torch.tensor([*label_nodes.tolist(), genus_like, -1])
    head.train()
    with_margin = head(x, targets=targets)["labels"]
    plain = head(x)["labels"]
    head.eval()
    torch.testing.assert_close(head(x, targets=targets)["labels"], plain)     # eval: never a margin
    diff = (with_margin - plain).abs() > 1e-6
    expect = torch.zeros_like(diff)
    for b, t in enumerate(label_nodes):
        expect[b, plankton.label_index[t]] = True
    assert torch.equal(diff, expect)
    for b, t in enumerate(label_nodes):
        c = plain[b, plankton.label_index[t]].item() / 16.0
        theta = math.acos(c)
        assert theta < math.pi - 0.4
        assert with_margin[b, plankton.label_index[t]].item() == pytest.approx(16.0 * math.cos(theta + 0.4), abs=1e-4)


def test_arcface_guard_when_theta_is_near_pi(plankton):
    m = 0.5
    head = make("arcface", plankton, scale=10.0, margin=m).train()
    t = int(plankton.label_ids[3])
    li = int(plankton.label_index[t])
    w = head.weight.detach()[li]
    x = torch.stack([-w, -w + 0.05 * torch.randn(D), w]).requires_grad_(True)   # theta = pi, ~pi, 0
    z = head(x, targets=torch.tensor([t, t, t]))["labels"]
    cos = z.detach()[:, li] / 10.0
    head.eval()
    c = head(x.detach())["labels"][:, li] / 10.0
    for b in range(3):
        theta = math.acos(max(-1.0, min(1.0, c[b].item())))
        if theta > math.pi - m:       # the guard: cos(theta) - m sin(m), not cos(theta + m)
            expect = c[b].item() - m * math.sin(m)
            assert cos[b].item() < c[b].item()
        else:
            expect = math.cos(theta + m)
        assert cos[b].item() == pytest.approx(expect, abs=1e-4)
    assert math.acos(max(-1.0, c[0].item())) > math.pi - m and math.acos(min(1.0, c[2].item())) < 1e-2
    z[:, li].sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    # the margin never raises a logit and never increases with the angle
    grid = torch.linspace(-1, 1, 2001)
    phi = arc_margin(grid, m)
    assert (phi <= grid + 1e-7).all() and (phi[1:] >= phi[:-1] - 1e-7).all()


def test_arcface_per_rank_margin_on_every_determined_level(trees):
    tax = trees["fathomnet"]
    head = make("arcface_per_rank", tax, scale=8.0, margin=0.3)
    # a genus that is not a label and has several species labels below it
    genus = next(int(v) for v in np.flatnonzero((tax.ranks == "genus") & ~tax.is_label)
                 if tax.is_label[tax.descendants_mask(int(v))].sum() >= 2)
    targets = torch.tensor([int(tax.label_ids[-1]), genus, -1])
    x = torch.randn(3, D)
    head.train()
    marg = head(x, targets=targets)
    head.eval()
    plain = head(x)
    level_t = head.level_targets(targets)
    for lv in head.levels:
        diff = (marg[lv] - plain[lv]).abs() > 1e-6
        for b in range(3):
            t = int(level_t[lv][b])
            expect = np.zeros(diff.shape[1], dtype=bool)
            if t >= 0:
                expect[t] = True
            assert np.array_equal(diff[b].numpy(), expect), (lv, b)
    # the genus-level target got margins down to genus and none at species
    assert level_t["genus"][1] >= 0 and level_t["species"][1] == -1


# ----------------------------------------------------------------- multilabel
def test_multilabel_against_slow_references(trees):
    tax = trees["plankton"]
    head = make("multilabel", tax, scale=5.0, margin=0.2)
    x = torch.randn(3, D)
    targets = torch.tensor([int(tax.find("copepod_calanoid")), int(tax.find("PROTISTS")), -1])
    head.train()
    out = head(x, targets=targets)
    head.eval()
    plain = head(x)["nodes"]
    z = out["nodes"].detach().double().numpy()
    # margins exactly on the targets' root paths (root excluded)
    diff = (out["nodes"] - plain).abs().detach().numpy() > 1e-6
    for b, t in enumerate(targets.tolist()):
        path = set(tax.ancestors(t)[1:]) if t >= 0 else set()
        assert set(np.flatnonzero(diff[b]).tolist()) == path
        assert set(np.flatnonzero(head.positives(targets)[b].numpy()).tolist()) == path
    # coherent probabilities: sigmoid of the max logit over each subtree (slow)
    coh = head.node_probs(out).detach().double().numpy()
    for v in range(1, tax.n_nodes):
        sub = np.flatnonzero(tax.descendants_mask(v))
        np.testing.assert_allclose(coh[:, v], 1 / (1 + np.exp(-z[:, sub].max(1))), rtol=1e-6)
    # label distribution: the independent sigmoids conditioned on legal root paths (slow, from the product)
    sig = 1 / (1 + np.exp(-z))
    logp = np.zeros((3, tax.n_labels))
    for i, label in enumerate(tax.label_ids):
        on = np.zeros(tax.n_nodes, dtype=bool)
        on[tax.ancestors(int(label))] = True
        on[0] = False
        logp[:, i] = (np.log(sig[:, on]).sum(1) + np.log(1 - sig[:, 1:][:, ~on[1:]]).sum(1))
    logp -= np.log(np.exp(logp - logp.max(1, keepdims=True)).sum(1, keepdims=True)) + logp.max(1, keepdims=True)
    np.testing.assert_allclose(head.label_log_probs(out).detach().numpy(), logp, atol=1e-6)


# ----------------------------------------------------------------- not the flat head in disguise
def moved_tree(plankton_dir: Path, tmp_path: Path) -> Taxonomy:
    """The real class_paths.tsv with 'amphipods' moved from CRUSTACEANS to DETRITUS."""
    text = (plankton_dir / "class_paths.tsv").read_text()
    old = "amphipods\tPLANKTON > CRUSTACEANS > amphipods"
    assert old in text
    path = tmp_path / "class_paths.tsv"
    path.write_text(text.replace(old, "amphipods\tPLANKTON > DETRITUS > amphipods"))
    return load(path)


def row_keys(head) -> list[tuple]:
    """A tree-independent name for every parameter row of a head (node names; plankton names are unique)."""
    tax = head.taxonomy
    name = head.registry_name
    if name in ("flat", "arcface"):
        return [(n,) for n in tax.names[tax.label_ids]]
    if name == "hsoftmax":
        return [(tax.names[v], bool(s)) for v, s in zip(head.branch_nodes.tolist(), head.branch_is_stop.tolist())]
    if name == "multilabel":
        return [(n,) for n in tax.names[1:]]
    return [(lv, "<none>" if v < 0 else tax.names[v]) for lv, cls in head.level_classes().items()
            for v in cls.tolist()]


def copy_rows(src, dst) -> None:
    ks, kd = row_keys(src), row_keys(dst)
    assert sorted(ks) == sorted(kd)
    index = {k: i for i, k in enumerate(ks)}
    perm = torch.tensor([index[k] for k in kd])
    with torch.no_grad():
        for (pn, p_src), (_, p_dst) in zip(src.named_parameters(), dst.named_parameters()):
            p_dst.copy_(p_src[perm])


@pytest.mark.parametrize("name", HEADS + ["flat", "per_rank"])
def test_moving_a_leaf_changes_hierarchical_predictions(plankton, plankton_dir, tmp_path, name):
    moved = moved_tree(plankton_dir, tmp_path)
    assert moved.fingerprint != plankton.fingerprint
    assert moved.names[moved.parent[moved.find("amphipods")]] == "DETRITUS"
    a, b = make(name, plankton).eval(), make(name, moved, seed=1).eval()
    copy_rows(a, b)
    x = torch.randn(8, D) * 3
    pa = dict(zip(plankton.names[plankton.label_ids], a.label_log_probs(run(a, x)).exp().detach().T))
    pb = dict(zip(moved.names[moved.label_ids], b.label_log_probs(run(b, x)).exp().detach().T))
    gap = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    if name in ("flat", "arcface"):
        assert gap < 1e-6          # control: no tree inside, so the same weights give the same answer
    else:
        assert gap > 1e-3, f"{name} ignores the tree"


# ----------------------------------------------------------------- model plumbing
def test_model_passes_targets_and_adds_attribute_heads(plankton):
    torch.manual_seed(0)
    model = create_model(plankton, in_features=D, head={"name": "arcface", "margin": 0.3},
                         neck={"hidden": [16]}, attributes={"life_stage": 3, "sex": 2})
    assert model.tasks == ("labels", "attr/life_stage", "attr/sex")
    x = torch.randn(4, D)
    t = torch.as_tensor(plankton.label_ids[:4])
    model.train()
    out = model(features=x, targets=t)
    assert out["attr/life_stage"].shape == (4, 3) and out["attr/sex"].shape == (4, 2)
    no_margin = model(features=x)["labels"]
    assert not torch.allclose(out["labels"], no_margin)
    flat = create_model(plankton, in_features=D, head="flat")
    flat(features=x, targets=t)                         # heads without targets ignore them
    shared = model.last_shared_parameters()
    assert [p.shape for p in shared] == [torch.Size([16, D]), torch.Size([16])]
    assert shared[0] is model.neck.layers[0].weight
    sum(v.sum() for v in out.values()).backward()
    assert model.attributes.heads["sex"].weight.grad is not None
    assert [p.shape for p in create_model(plankton, in_features=D, neck={"norm": "layer"})
            .last_shared_parameters()] == [torch.Size([D]), torch.Size([D])]
    with pytest.raises(ConfigError, match="share no trainable"):
        create_model(plankton, in_features=D).last_shared_parameters()
    with pytest.raises(ConfigError, match="at least|>= 2"):
        AttributeHeads(D, {"sex": 1})
    with pytest.raises(ConfigError, match="name"):
        AttributeHeads(D, {"bad name": 2})


# ----------------------------------------------------------------- scale
def wide_tree(n_labels: int = 10_000) -> Taxonomy:
    """Root -> 20 families -> 200 genera -> species; one genus holds 3,000 species (a very wide node)."""
    fam = np.arange(20)
    gen_parent = np.repeat(fam, 10)
    sizes = np.full(200, (n_labels - 3000) // 199)
    sizes[0] = 3000
    sizes[-1] += n_labels - sizes.sum()
    sp_parent = np.repeat(np.arange(200), sizes)
    n_f, n_g = 20, 200
    parent = np.r_[-1, np.zeros(n_f, dtype=np.int64), 1 + gen_parent, 1 + n_f + sp_parent]
    names = ["root"] + [f"f{i}" for i in range(n_f)] + [f"g{i}" for i in range(n_g)] + \
            [f"s{i}" for i in range(len(sp_parent))]
    return Taxonomy.from_parents(parent, names)


def test_ten_thousand_labels_stay_linear_in_batch_times_nodes():
    tax = wide_tree()
    assert tax.n_labels == 10_000 and tax.n_children.max() == 3000
    b, d = 32, 32
    # every saved tensor is O(batch x nodes) (largest: the marginaliser's [B, sum of label path lengths]);
    # a dense [labels, labels] would be 10^8 elements
    bound = 4 * max(b, d) * (tax.n_nodes + tax.n_labels)
    for name in HEADS:
        torch.manual_seed(0)
        head = create_head(name, tax, d).train()
        x = torch.randn(b, d)
        targets = torch.as_tensor(np.random.default_rng(0).choice(tax.label_ids, b))
        biggest = [0]

        def pack(t):
            biggest[0] = max(biggest[0], t.numel())
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(head, x, targets)
            index = torch.as_tensor(tax.label_index[targets.numpy()]).view(-1, 1)
            loss = -head.label_log_probs(out).gather(1, index).mean()
            nodes = head.node_probs(out)
        loss.backward()
        elapsed = time.perf_counter() - t0
        assert nodes.shape == (b, tax.n_nodes)
        sums = head.label_log_probs(out).exp().sum(-1).detach()
        torch.testing.assert_close(sums, torch.ones(b), atol=1e-4, rtol=0)
        assert 0 < biggest[0] <= bound, f"{name}: a saved tensor of {biggest[0]} elements"
        assert elapsed < 10, f"{name}: {elapsed:.1f}s"


# ------------------------------------------------------------------ hsoftmax's target likelihood shortcut
def _all_targets(tax: Taxonomy) -> torch.Tensor:
    """Every label node and every non-label node with labels below (the partial targets), shuffled."""
    covered = tax.subtree_sum(tax.is_label.astype(np.float64)) > 0
    nodes = np.flatnonzero(covered & (np.arange(tax.n_nodes) > 0))
    return torch.as_tensor(np.random.default_rng(0).permutation(nodes), dtype=torch.long)


@pytest.mark.parametrize("tree", ["plankton", "fathomnet", "cifar"])
def test_hsoftmax_target_log_likelihood_equals_label_distribution(trees, tree):
    """log P(t) from the path product equals log sum_{l in labels(t)} p(l) from label_log_probs, for every
    label (internal labels: their own mass, not their subtree) and every partial target; same gradients."""
    tax = trees[tree]
    head = make("hsoftmax", tax, seed=3)
    targets = _all_targets(tax)
    x = torch.randn(len(targets), D)
    out = head(x)
    ll = head.target_log_likelihood(out, targets)
    lp = head.label_log_probs(out)
    ref = []
    for i, t in enumerate(targets.tolist()):
        if tax.is_label[t]:
            ref.append(lp[i, tax.label_index[t]])
        else:
            under = [k for k, lab in enumerate(tax.label_ids) if tax.is_ancestor(t, np.array([lab]))[0]]
            ref.append(torch.logsumexp(lp[i, under], dim=0))
    ref = torch.stack(ref)
    assert ll.shape == (len(targets),)
    assert (tax.is_label[targets.numpy()] & ~tax.is_leaf[targets.numpy()]).any() or tree != "plankton"
    torch.testing.assert_close(ll, ref, atol=2e-5, rtol=1e-5)
    w = torch.randn(len(targets))
    g_fast = torch.autograd.grad((ll * w).sum(), head.linear.weight, retain_graph=True)[0]
    g_ref = torch.autograd.grad((ref * w).sum(), head.linear.weight)[0]
    torch.testing.assert_close(g_fast, g_ref, atol=2e-5, rtol=1e-4)


def test_hsoftmax_ce_shortcut_same_loss_and_node_major_outputs(plankton):
    """ce without smoothing takes the shortcut: same value as the label-distribution path; the head's
    logits are the linear layer's, returned as a [B, n_branches] view of a node-major tensor."""
    head = make("hsoftmax", plankton, seed=1)
    x = torch.randn(32, D)
    out = head(x)
    assert out["branches"].shape == (32, head.n_branches)
    torch.testing.assert_close(out["branches"], head.linear(x))
    targets = _all_targets(plankton)[:32].clone()
    targets[5] = -1
    ce = create_loss("ce", plankton, head)
    fast = ce(out, targets)["labels"]
    nll, valid = ce.per_sample(head.label_log_probs(out), targets)
    torch.testing.assert_close(fast, nll.sum() / valid.sum())
    assert int(valid.sum()) == 31
