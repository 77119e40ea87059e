"""``Head.target_log_likelihood``: the shortcut ``ce`` trains with (no label smoothing) must give
the same values and the same gradients as reading ``log P(target | x)`` off the full label
distribution ``label_log_probs``.

For a label target the reference is ``label_log_probs[:, label_index[t]]``; for a partial target
(a non-label node, e.g. known only to genus) it is the logsumexp of ``label_log_probs`` over the
labels in t's subtree, the labels found here with a Python loop over the taxonomy's pre-order
intervals, independent of the heads' and losses' index tensors. Gradients are compared with
``torch.autograd`` through the reference, both with respect to the head's raw outputs and end to
end (the features and every parameter of the head, the training-time margins included).

Every tree comes from the real importers on the shared files: NDSB plankton (121 labels, 18 of them
internal nodes), FathomNet 2025 (labels at mixed ranks), CIFAR-100 5-level.

To check another head, add its registry name to ``TLL_HEADS`` (and its options to ``HEAD_OPTIONS``
when the defaults do not suit a 24-d toy feature).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taxonomist.losses import create_loss
from taxonomist.models import create_head
from taxonomist.models.heads import arc_margin
from taxonomist.taxonomy import Taxonomy, load

TLL_HEADS = ["multilabel", "hsoftmax"]
"""Heads whose ``target_log_likelihood`` is checked (append a name to add a head)."""
HEAD_OPTIONS: dict[str, dict] = {}
"""Constructor options per head name (default: the head's defaults)."""
TREES = ["plankton", "fathomnet", "cifar"]
D = 24
BATCH = 48


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


def make_head(name: str, tax: Taxonomy, seed: int = 0):
    torch.manual_seed(seed)
    return create_head(name, tax, D, **HEAD_OPTIONS.get(name, {})).train()


def run(head, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    return head(x, targets=targets) if head.uses_targets else head(x)


def covered(tax: Taxonomy) -> np.ndarray:
    """Nodes with a label at or below them (the usable targets), by a loop over the labels."""
    out = np.zeros(tax.n_nodes, dtype=bool)
    for label in tax.label_ids:
        out[tax.ancestors(int(label))] = True
    return out


def targets_for(tax: Taxonomy, n: int, seed: int) -> torch.Tensor:
    """Label nodes (internal label nodes among them where the tree has some), partial targets
    (covered non-label nodes, the root included: a clamped -1 reads as the root) in about equal parts."""
    rng = np.random.default_rng(seed)
    partial = np.flatnonzero(covered(tax) & ~tax.is_label)
    internal_labels = np.flatnonzero(tax.is_label & ~tax.is_leaf)
    t = rng.choice(tax.label_ids, n)
    t[: n // 2] = rng.choice(partial, n // 2)
    t[n // 2] = 0
    if len(internal_labels):
        t[n // 2 + 1: n // 2 + 4] = rng.choice(internal_labels, 3)
    return torch.as_tensor(t, dtype=torch.long)


def labels_under(tax: Taxonomy, t: int) -> list[int]:
    """Label indices (``label_ids`` order) of the labels in t's subtree (pre-order interval, a loop)."""
    lo, hi = int(tax.preorder[t]), int(tax.preorder[t] + tax.subtree_size[t])
    return [i for i, label in enumerate(tax.label_ids) if lo <= int(tax.preorder[label]) < hi]


def reference_ll(tax: Taxonomy, head, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """``log P(t | x)`` from ``label_log_probs``, one target at a time."""
    lp = head.label_log_probs(outputs)
    index = {int(label): i for i, label in enumerate(tax.label_ids)}
    vals = []
    for b, t in enumerate(targets.tolist()):
        if tax.is_label[t]:
            vals.append(lp[b, index[t]])
        else:
            vals.append(torch.logsumexp(lp[b, labels_under(tax, t)], dim=0))
    return torch.stack(vals)


def peaked_features(head, tax: Taxonomy, n: int, seed: int) -> torch.Tensor:
    """Features close to the weight rows of random nodes: cosines near 1 on some root paths, so the
    labels' path sums spread over hundreds (scale 30) as in a trained model, not the near-uniform
    distribution of random features."""
    g = torch.Generator().manual_seed(seed)
    weight = next(p for name, p in head.named_parameters() if p.ndim == 2 and p.shape[1] == D).detach()
    rows = torch.randint(0, weight.shape[0], (n,), generator=g)
    return weight[rows] / weight[rows].norm(dim=1, keepdim=True) + 0.05 * torch.randn(n, D, generator=g)


CASES = [(name, tree, kind) for name in TLL_HEADS for tree in TREES for kind in ("random", "peaked")]


@pytest.mark.parametrize(("name", "tree", "kind"), CASES)
def test_values_and_output_gradients_equal_the_label_distribution(trees, name, tree, kind):
    tax = trees[tree]
    head = make_head(name, tax)
    targets = targets_for(tax, BATCH, seed=1)
    torch.manual_seed(2)
    x = torch.randn(BATCH, D) if kind == "random" else peaked_features(head, tax, BATCH, seed=2)
    with torch.no_grad():
        raw = run(head, x, targets)
    outputs = {k: v.detach().clone().requires_grad_(True) for k, v in raw.items()}
    ll = head.target_log_likelihood(outputs, targets)
    assert ll is not None and ll.shape == (BATCH,) and ll.dtype == torch.float32
    ref = reference_ll(tax, head, outputs, targets)
    torch.testing.assert_close(ll, ref, atol=2e-5, rtol=1e-5)
    assert bool((ll <= 1e-5).all())
    torch.testing.assert_close(ll[targets == 0], torch.zeros_like(ll[targets == 0]), atol=2e-5, rtol=0)
    weights = torch.linspace(-1.0, 2.0, BATCH)
    got = torch.autograd.grad((ll * weights).sum(), list(outputs.values()), allow_unused=True)
    want = torch.autograd.grad((ref * weights).sum(), list(outputs.values()), allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "tree"), [(n, t) for n in TLL_HEADS for t in TREES])
def test_end_to_end_gradients_and_ce_equal_the_label_distribution(trees, name, tree):
    """Through the head's forward (training mode, margins on) to the features and every parameter;
    and ``ce`` (which takes the shortcut) equals its own label-distribution path."""
    tax = trees[tree]
    head = make_head(name, tax, seed=3)
    targets = targets_for(tax, BATCH, seed=4)
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    params = [x] + [p for p in head.parameters() if p.requires_grad]
    outputs = run(head, x, targets)
    ll = head.target_log_likelihood(outputs, targets)
    got = torch.autograd.grad(ll.mean(), params, allow_unused=True)
    outputs = run(head, x, targets)
    want = torch.autograd.grad(reference_ll(tax, head, outputs, targets).mean(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # the ce loss: shortcut (label_smoothing 0) against its per-sample path over label_log_probs
    loss = create_loss("ce", tax, head)
    t = targets.clone()
    t[-1] = -1
    outputs = run(head, x, t)
    short = loss(outputs, t)["labels"]
    nll, valid = loss.per_sample(head.label_log_probs(outputs), t)
    torch.testing.assert_close(short, nll.sum() / valid.sum(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- the multilabel head's own pieces
@pytest.mark.parametrize("name", ["multilabel", "arcface", "arcface_per_rank"])
def test_fused_cosine_logits_and_gradients_equal_the_normalised_formula(trees, name):
    """The fused scaled cosines (weight norms as a column scale, margin in place at the positives)
    against ``s * cos`` from ``F.normalize`` with the margin through autograd, in training mode."""
    tax = trees["fathomnet"]
    head = make_head(name, tax, seed=6)
    targets = targets_for(tax, BATCH, seed=7)
    targets[-1] = -1
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(8), requires_grad=True)
    out = run(head, x, targets)
    z = torch.cat([out[k] for k in head.tasks], dim=1)
    cos = F.normalize(x, dim=-1) @ F.normalize(head.weight, dim=-1).t()
    pos = head.positives(targets)
    if name == "multilabel":
        pos = pos[:, 1:]
        # positives: exactly each target's root path below the root (a loop over ancestors)
        for b, t in enumerate(targets.tolist()):
            want = set(tax.ancestors(t)[1:]) if t >= 0 else set()
            assert set(np.flatnonzero(pos[b].numpy()).tolist()) == {v - 1 for v in want}
    ref = torch.where(pos, head.scale * arc_margin(cos, head.margin), head.scale * cos)
    if name == "multilabel":
        ref = torch.cat([torch.full((BATCH, 1), head.scale), ref], dim=1)
    torch.testing.assert_close(z, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(z, [x, head.weight], g)
    want = torch.autograd.grad(ref, [x, head.weight], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_arc_margin_slope_is_the_autograd_derivative():
    from taxonomist.models.heads.arcface import arc_margin_slope

    for m in (0.0, 0.2, 0.5, 1.2):
        c = torch.cat([torch.linspace(-1.2, 1.2, 4001, dtype=torch.float64),
                       torch.tensor([-1.0, 1.0, math.cos(math.pi - m), 1 - 1e-13, -1 + 1e-13],
                                    dtype=torch.float64)]).requires_grad_(True)
        (g,) = torch.autograd.grad(arc_margin(c, m).sum(), c)
        torch.testing.assert_close(arc_margin_slope(c.detach(), m), g, atol=1e-12, rtol=1e-12)


CHAIN_TREES = {
    # root -> a chain of one-node levels -> a wide level (the chain's parent is the root)
    "top": [-1, 0, 1, 2, 3, 4, 5] + [6] * 4 + [7 + i % 4 for i in range(9)],
    # root -> {1, 2}; 1 -> 3 -> 4 (one-node levels 2 and 3, parent 1) -> {5, 6, 7} -> 8 and 9
    "inner": [-1, 0, 0, 1, 3, 4, 4, 4, 5, 7],
}


@pytest.mark.parametrize("shape", sorted(CHAIN_TREES))
def test_multilabel_path_scores_on_trees_with_one_node_levels(shape):
    """Runs of one-node levels are summed with a cumsum step; values and gradients equal an
    explicit loop over each node's ancestors."""
    parent = CHAIN_TREES[shape]
    tax = Taxonomy.from_parents(np.asarray(parent), [f"n{i}" for i in range(len(parent))])
    head = make_head("multilabel", tax)
    chains = [step for step in head.path_plan if len(step) == 3]
    assert len(chains) == 1 and (chains[0][2] >= 0) == (shape == "inner")
    z = torch.randn(4, tax.n_nodes, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    got = head.path_scores({"nodes": z})
    ref = torch.stack([z[:, tax.ancestors(v)[1:]].sum(dim=1) for v in range(tax.n_nodes)], dim=1)
    torch.testing.assert_close(got, ref)
    g = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.autograd.grad(got, z, g)[0], torch.autograd.grad(ref, z, g)[0])
