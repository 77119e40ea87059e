"""Losses (ce with partial labels, per_rank_ce) and task weighting, against slow references on real trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_models import fathomnet_tree, plankton_tree

from taxonomist.errors import ConfigError, DataError
from taxonomist.losses import (StaticWeighting, connected_zero, create_loss, create_weighting, list_losses,
                               list_weightings)
from taxonomist.models import create_head
from taxonomist.taxonomy import Taxonomy



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is fastest, and `make test` runs one worker per core."""
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


def labels_meant_by(tax: Taxonomy, t: int) -> list[int]:
    """Slow reference: label indices a target node stands for (itself if a label, else every label below)."""
    if tax.is_label[t]:
        return [int(tax.label_index[t])]
    return [i for i, lab in enumerate(tax.label_ids) if t in tax.ancestors(int(lab))]


def slow_ce(tax: Taxonomy, logp: np.ndarray, targets: list[int], eps: float = 0.0) -> float:
    vals = []
    for b, t in enumerate(targets):
        if t < 0:
            continue
        p = np.exp(logp[b])
        nll = -np.log(sum(p[i] for i in labels_meant_by(tax, t)))
        vals.append((1 - eps) * nll + eps * float(np.mean(-logp[b])))
    return float(np.mean(vals))


def test_registry():
    assert {"ce", "per_rank_ce"} <= set(list_losses())
    assert "static" in list_weightings()
    with pytest.raises(ConfigError, match="unknown loss 'cee'.*Did you mean 'ce'"):
        create_loss("cee", None, None)


def test_ce_on_label_targets_is_ordinary_cross_entropy(plankton):
    head = create_head("flat", plankton, 8)
    out = head(torch.randn(6, 8))
    y = torch.tensor([0, 5, 17, 40, 99, 120])
    got = create_loss("ce", plankton, head)(out, torch.as_tensor(plankton.label_ids)[y])
    assert set(got) == {"labels"}
    torch.testing.assert_close(got["labels"], F.cross_entropy(out["labels"], y))
    got_s = create_loss("ce", plankton, head, label_smoothing=0.2)(out, torch.as_tensor(plankton.label_ids)[y])
    torch.testing.assert_close(got_s["labels"], F.cross_entropy(out["labels"], y, label_smoothing=0.2))


@pytest.mark.parametrize("head_name", ["flat", "per_rank"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_with_partial_and_internal_labels_matches_slow_reference(plankton, fathomnet, head_name, eps):
    for tax in (plankton, fathomnet):
        torch.manual_seed(0)
        head = create_head(head_name, tax, 8)
        internal_labels = [int(v) for v in tax.label_ids if not tax.is_leaf[v]]
        partial = [int(v) for v in range(tax.n_nodes) if not tax.is_label[v]]
        targets = (internal_labels[:3] + partial[:: max(1, len(partial) // 8)] + [int(tax.label_ids[-1]), -1, 0])
        out = head(torch.randn(len(targets), 8))
        got = create_loss("ce", tax, head, label_smoothing=eps)(out, torch.tensor(targets))["labels"]
        ref = slow_ce(tax, head.label_log_probs(out).detach().double().numpy(), targets, eps)
        assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    if not internal_labels:  # the FathomNet tree has internal labels too (genus Asteronyx above its species)
        pytest.fail("expected internal label nodes")


def masked_logsumexp_ce(tax: Taxonomy, lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The former ``ce.per_sample``: a [B, n_labels] label-set mask for every row, then a masked
    logsumexp (set built here in Python from the tree, one row at a time)."""
    mask = torch.zeros(lp.shape, dtype=torch.bool)
    for b, t in enumerate(targets.tolist()):
        if t < 0:
            mask[b] = True
        else:
            mask[b, labels_meant_by(tax, t)] = True
    nll = -torch.logsumexp(lp.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(targets >= 0, nll, torch.zeros_like(nll))


@pytest.mark.parametrize("head_name", ["flat", "hsoftmax"])
def test_ce_fast_path_for_label_rows_equals_masked_logsumexp_on_mixed_batches(plankton, head_name):
    """Label rows take a gather, partial rows the masked logsumexp: per-sample values and gradients
    are those of the masked logsumexp over every row, on batches mixing labels, internal labels,
    partial labels and unlabelled rows (and on batches with no partial row at all)."""
    from taxonomist.losses.ce import CrossEntropy

    rng = np.random.default_rng(3)
    partial = [int(v) for v in range(1, plankton.n_nodes) if not plankton.is_label[v]]
    internal = [int(v) for v in plankton.label_ids if not plankton.is_leaf[v]]
    head = create_head(head_name, plankton, 8)
    loss = CrossEntropy(plankton, head)
    for batch in (list(rng.choice(plankton.label_ids, 20)) + partial[:6] + internal[:3] + [-1, -1],
                  list(rng.choice(plankton.label_ids, 12)),
                  partial[:5]):
        targets = torch.tensor([int(v) for v in rng.permutation(batch)])
        torch.manual_seed(len(batch))
        z = torch.randn(len(targets), 8, requires_grad=True)
        lp = head.label_log_probs(head(z))
        got, valid = loss.per_sample(lp, targets)
        want = masked_logsumexp_ce(plankton, lp, targets)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert valid.tolist() == (targets >= 0).tolist()
        g_got, = torch.autograd.grad(got.sum(), z, retain_graph=True)
        g_want, = torch.autograd.grad(want.sum(), z)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_ce_internal_label_is_that_node_not_its_subtree(plankton):
    head = create_head("flat", plankton, 4)
    out = head(torch.randn(1, 4))
    cal = plankton.find("copepod_calanoid")
    assert plankton.is_label[cal] and not plankton.is_leaf[cal]
    got = create_loss("ce", plankton, head)(out, torch.tensor([cal]))["labels"]
    torch.testing.assert_close(got, -head.label_log_probs(out)[0, plankton.label_index[cal]])


def test_unlabelled_samples_are_ignored_and_an_empty_batch_is_a_connected_zero(fathomnet):
    head = create_head("per_rank", fathomnet, 6)
    x = torch.randn(3, 6)
    out = head(x)
    for name in ("ce", "per_rank_ce"):
        loss = create_loss(name, fathomnet, head, label_smoothing=0.1)
        part = loss(out, torch.tensor([int(fathomnet.label_ids[2]), -1, -1]))
        one = loss(head(x[:1]), torch.tensor([int(fathomnet.label_ids[2])]))
        for k in part:
            torch.testing.assert_close(part[k], one[k])
        head.zero_grad()
        empty = loss(head(x), torch.tensor([-1, -1, -1]))
        assert set(empty) == set(loss.tasks)
        total = StaticWeighting()(empty)
        assert total.item() == 0.0 and total.requires_grad
        total.backward()
        for p in head.parameters():  # every parameter is in the graph, with a zero (not NaN) gradient
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad))
    z = connected_zero(out)
    z.backward()
    assert z.item() == 0.0


def test_targets_without_a_label_below_are_clear_errors(plankton):
    # make only internal nodes labels: the leaves below them can no longer be trained on
    tax = plankton.with_labels(plankton.internal_nodes[1:])
    head = create_head("flat", tax, 4)
    leaf = int(tax.leaves[0])
    loss = create_loss("ce", tax, head)
    with pytest.raises(DataError, match=rf"no label node at or below them.*{tax.names[leaf]}.*node {leaf}"):
        loss(head(torch.randn(2, 4)), torch.tensor([int(tax.label_ids[0]), leaf]))
    with pytest.raises(DataError, match="not node ids of this taxonomy"):
        loss(head(torch.randn(1, 4)), torch.tensor([tax.n_nodes + 3]))
    with pytest.raises(DataError, match="integer node ids"):
        loss(head(torch.randn(1, 4)), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="different taxonomies"):
        create_loss("ce", plankton, head)
    # the once-per-split check the training loop runs (so the losses need not sync a GPU every step)
    from taxonomist.losses.base import check_target_ids

    check_target_ids(tax, np.array([-1, int(tax.label_ids[0]), 0]))
    with pytest.raises(DataError, match=rf"in the training data have no label node.*{tax.names[leaf]}"):
        check_target_ids(tax, np.array([-1, int(tax.label_ids[0]), leaf, leaf]), "training data")
    with pytest.raises(DataError, match=r"1 target\(s\) in the training data are not node ids"):
        check_target_ids(tax, np.array([tax.n_nodes]), "training data")
    loss.check_on_device = False  # only accelerator targets skip the per-step check: CPU ones stay checked
    with pytest.raises(DataError, match="no label node at or below them"):
        loss(head(torch.randn(1, 4)), torch.tensor([leaf]))


def test_per_rank_ce_matches_slow_reference(fathomnet, plankton):
    for tax in (fathomnet, plankton):
        torch.manual_seed(2)
        head = create_head("per_rank", tax, 8)
        classes = {lv: c.tolist() for lv, c in head.level_classes().items()}
        targets = [int(v) for v in range(0, tax.n_nodes, 3)] + [-1]
        out = head(torch.randn(len(targets), 8))
        eps = 0.1
        got = create_loss("per_rank_ce", tax, head, label_smoothing=eps)(out, torch.tensor(targets))
        assert tuple(got) == head.levels

        def level_of(a: int) -> str:
            return str(tax.ranks[a]) if tax.has_ranks else f"level{tax.depth[a]}"

        for lv in head.levels:
            terms = []
            for b, t in enumerate(targets):
                if t < 0:
                    continue
                under = [t] if tax.is_label[t] else [int(x) for x in tax.label_ids if t in tax.ancestors(int(x))]
                codes = set()
                for lab in under:
                    at = [a for a in tax.ancestors(lab) if level_of(a) == lv]
                    codes.add(classes[lv].index(at[0]) if at else (classes[lv].index(-1) if -1 in classes[lv]
                                                                    else -1))
                if len(codes) != 1 or -1 in codes:
                    continue
                c = codes.pop()
                logp = torch.log_softmax(out[lv][b].double(), -1)
                terms.append(-(1 - eps) * logp[c].item() - eps * logp.mean().item())
            want = float(np.mean(terms)) if terms else 0.0
            assert got[lv].item() == pytest.approx(want, rel=1e-5, abs=1e-6), lv


def test_per_rank_ce_needs_a_per_level_head(plankton):
    with pytest.raises(ConfigError, match="per_rank_ce.*needs a head with one output per level.*'flat'"):
        create_loss("per_rank_ce", plankton, create_head("flat", plankton, 4))
    with pytest.raises(ConfigError, match="label_smoothing"):
        create_loss("ce", plankton, create_head("flat", plankton, 4), label_smoothing=1.5)
    with pytest.raises(ConfigError, match="has no option"):
        create_loss("ce", plankton, create_head("flat", plankton, 4), gamma=2)


def test_losses_are_float32_under_bf16_autocast(fathomnet):
    head = create_head("per_rank", fathomnet, 8)
    targets = torch.as_tensor(fathomnet.label_ids[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 8))
        for name in ("ce", "per_rank_ce"):
            losses = create_loss(name, fathomnet, head)(out, targets)
            assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_static_weighting():
    losses = {"genus": torch.tensor(2.0, requires_grad=True), "species": torch.tensor(3.0, requires_grad=True)}
    assert StaticWeighting()(losses).item() == 5.0
    w = StaticWeighting({"genus": 0.5})
    assert w(losses).item() == pytest.approx(0.5 * 2 + 3)
    assert w.weights(losses) == {"genus": 0.5, "species": 1.0}
    assert create_weighting("static", weights={"species": 0.0})(losses).item() == 2.0
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['genre'\].*genus, species"):
        StaticWeighting({"genre": 1.0})(losses)
    with pytest.raises(ConfigError, match=">= 0"):
        StaticWeighting({"genus": -1.0})
    with pytest.raises(ConfigError, match="unknown task weighting 'gradnormm'"):
        create_weighting("gradnormm")


def test_per_rank_ce_taxonomy_smoothing_matches_slow_reference(plankton):
    """Per-level taxonomy smoothing against a reference built pair by pair with Taxonomy.distance;
    taxonomy_alpha = 0 is plain per_rank_ce."""
    import math

    torch.manual_seed(4)
    head = create_head("per_rank", plankton, 8)
    targets = torch.tensor([int(v) for v in plankton.label_ids[::7]] + [int(v) for v in range(1, plankton.n_nodes, 9)]
                           + [-1])
    targets = targets[(targets < 0) | torch.from_numpy(
        plankton.subtree_sum(plankton.is_label.astype(np.int64)) > 0)[targets.clamp(min=0)]]
    out = head(torch.randn(len(targets), 8))
    plain = create_loss("per_rank_ce", plankton, head)(out, targets)
    zero = create_loss("per_rank_ce", plankton, head, taxonomy_alpha=0.0, taxonomy_beta=2.0)(out, targets)
    for lv in head.levels:
        torch.testing.assert_close(zero[lv], plain[lv])
    alpha, beta = 0.3, 0.7
    got = create_loss("per_rank_ce", plankton, head, taxonomy_alpha=alpha, taxonomy_beta=beta)(out, targets)
    level_t = head.level_targets(targets)
    for lv, nodes in head.level_classes().items():
        nodes = nodes.tolist()
        terms = []
        for b in range(len(targets)):
            i = int(level_t[lv][b])
            if i < 0:
                continue
            c = len(nodes)
            others = [k for k in range(c) if k != i]
            rel = ([k for k in others if nodes[k] >= 0
                    and set(plankton.ancestors(nodes[i])[1:]) & set(plankton.ancestors(nodes[k])[1:])]
                   if nodes[i] >= 0 else [])
            target = np.zeros(c)
            target[i] = 1.0
            if others:
                if rel:
                    cand = [k for k in others if nodes[k] >= 0]
                    w = np.array([math.exp(-beta * plankton.distance(nodes[i], nodes[k])) for k in cand])
                else:
                    cand, w = others, np.ones(len(others))
                target[i] = 1 - alpha
                target[cand] += alpha * w / w.sum()
            logp = torch.log_softmax(out[lv][b].detach().double(), -1).numpy()
            terms.append(-(target * logp).sum())
        want = float(np.mean(terms)) if terms else 0.0
        assert got[lv].item() == pytest.approx(want, rel=1e-5, abs=1e-6), lv
    with pytest.raises(ConfigError, match="two kinds of smoothing"):
        create_loss("per_rank_ce", plankton, head, taxonomy_alpha=0.1, label_smoothing=0.1)
