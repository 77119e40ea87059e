"""GradNorm with heads that refine their task logits (refined, conditional).

Level j+1's refined logits are ``Z_{j+1} + log(P_j . H + eps)``, so a refined level loss sends
gradient through every level above it and the per-task gradient norms GradNorm balances are mixed.
GradNorm (``measure="unrefined"``, the default) measures them on the same loss evaluated on the
head's plain per-level logits ``Z_j`` (``head.refine = False``); the training loss, the loss
ratios ``r_i`` and ``L_i(0)`` stay those of the refined logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _ddp import subset_tables
from test_train_e2e import write_small_config
from taxonomist.errors import ConfigError
from taxonomist.losses import GradNorm, create_loss, create_weighting
from taxonomist.models.heads import PerRankHead


def test_gradnorm_measures_the_gradient_norms_on_grad_losses_and_the_rates_on_the_losses():
    """Two tasks. The training losses have equal gradient norms at W (1 and 1); the measurement losses
    have known norms 10 and 1: the weights follow the measurement, in the published direction (the
    task whose gradient is too large loses weight, towards w_a * 10 = w_b * 1), while the rates come
    from the training losses."""
    gn = GradNorm(tasks=["a", "b"], alpha=1.5, lr=0.05)
    assert gn.measure == "unrefined"
    for step in range(300):
        w = torch.nn.Parameter(torch.ones(4))
        b_scale = 1.0 if step == 0 else 0.5                    # task b's training loss halves after step 0
        losses = {"a": 0.5 * w.sum(), "b": b_scale * 0.5 * w.sum()}
        grad_losses = {"a": 5.0 * w.sum(), "b": 0.5 * w.sum()}  # ||grad_W|| = 10 and 1
        gn.update(losses, [w], step, grad_losses=grad_losses)
        if step == 0:
            first = gn.current_weights()
            assert first["a"] < 1.0 < first["b"]
        total = gn(losses)
        total.backward()                                       # the training graph survived both measurements
        assert w.grad is not None
    diag = gn.diagnostics()
    assert diag["grad_norm/a"] == pytest.approx(10.0) and diag["grad_norm/b"] == pytest.approx(1.0)
    # rates from the training losses: L(t)/L(0) = 1 for a, 1/2 for b -> r = 4/3, 2/3 (grad_losses: 1, 1)
    assert diag["rate/a"] == pytest.approx(4 / 3) and diag["rate/b"] == pytest.approx(2 / 3)
    # the large-gradient task keeps the smaller weight, but more than the 2/11 it gets at equal rates
    # (test_weighting.py): it trains slower (r_a > 1), so its target is raised
    final = gn.current_weights()
    assert 2 / 11 + 0.1 < final["a"] < 1.0 < final["b"]
    # without grad_losses the same training losses have equal norms: the weights stay put at r = 1
    plain = GradNorm(tasks=["a", "b"], alpha=1.5, lr=0.05)
    w = torch.nn.Parameter(torch.ones(4))
    plain.update({"a": 0.5 * w.sum(), "b": 0.5 * w.sum()}, [w], 0)
    assert plain.current_weights() == pytest.approx({"a": 1.0, "b": 1.0})
    with pytest.raises(ConfigError, match="measure='x'"):
        GradNorm(tasks=["a", "b"], measure="x")
    with pytest.raises(ConfigError, match="grad_losses"):
        gn.update(losses, [w], 1, grad_losses={"a": losses["a"]})


@pytest.mark.parametrize("head", ["refined", "conditional"])
def test_training_loop_measures_gradnorm_on_the_unrefined_logits(tmp_path, small_set, demo, cache_dir, head):
    """The real loop on real demo images (cached efficientnet_lite0 features), one optimiser step over
    the whole set: GradNorm's measurement losses equal per_rank_ce on the head's plain per-level
    logits of that step (recomputed here from a copy of the model taken before the step), its
    gradient norms are theirs at the shared layer (not those of the refined losses), its rates are
    the training losses' (all 1 at the first step), and the first update moves each weight in the
    published direction: down where the task's gradient norm is above the mean, up where below."""
    from taxonomist.train.config import load_config
    from taxonomist.train.loop import Trainer

    data = subset_tables(small_set, tmp_path / "data", n_classes=40, n_train=2)
    path = write_small_config(tmp_path, data, demo, cache_dir, f"gn_{head}", epochs=1, batch_size=80)
    cfg = load_config(path, ["model.neck.dropout=0.0", f"model.head.name={head}", "loss.name=per_rank_ce",
                             "loss.weighting=gradnorm", "train.warmup_epochs=0"])
    logs: list[str] = []
    tr = Trainer(cfg, log=logs.append)
    tr._prepare()
    assert tr.steps_per_epoch == 1 and any("unrefined per-level logits" in m for m in logs)
    before = copy.deepcopy(tr.model)
    seen: dict[str, torch.Tensor] = {}
    tr.model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(x=kw["features"], y=kw["targets"]),
                                       with_kwargs=True)
    calls: list[tuple[dict[str, float], dict[str, float] | None]] = []
    update = tr.weighting.update

    def spy(losses, shared, step, grad_losses=None):
        calls.append(({k: float(v.detach()) for k, v in losses.items()},
                      None if grad_losses is None else {k: float(v.detach()) for k, v in grad_losses.items()}))
        return update(losses, shared, step, grad_losses=grad_losses)

    tr.weighting.update = spy
    tr._train_epoch(1)
    assert len(calls) == 1 and calls[0][1] is not None
    losses, measured = calls[0]

    # the same step by hand, from the weights before it
    before.train()
    x, y = seen["x"], seen["y"]
    loss_fn = create_loss("per_rank_ce", before.taxonomy, before.head)
    h = before.embed(features=x)
    plain = loss_fn(PerRankHead.forward(before.head, h), y)            # the unrefined level logits Z_j
    if head == "refined":  # conditional routes with the same soft softmax here (routing=soft, T=1)
        refined = loss_fn(before.head(h), y)
        for k in losses:
            assert losses[k] == pytest.approx(float(refined[k].detach()), rel=1e-5), k
    for k in measured:
        assert measured[k] == pytest.approx(float(plain[k].detach()), rel=1e-5), k
    levels = before.head.levels
    assert measured[levels[0]] == pytest.approx(losses[levels[0]], rel=1e-6)   # Z'_0 = Z_0
    assert any(abs(measured[k] - losses[k]) > 1e-3 * losses[k] for k in levels[1:])  # the refinement matters

    shared = before.last_shared_parameters()

    def norm(loss: torch.Tensor) -> float:
        return float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]).norm())

    diag = tr.weighting.diagnostics()
    want = {k: norm(plain[k]) for k in levels}
    coupled = {k: norm(loss_fn(before.head(h), y)[k]) for k in levels}
    for k in levels:
        assert diag[f"grad_norm/{k}"] == pytest.approx(want[k], rel=1e-4), k
        assert diag[f"rate/{k}"] == pytest.approx(1.0)
    assert any(abs(coupled[k] - want[k]) > 1e-3 * want[k] for k in levels[1:])  # measure=outputs would differ
    mean = sum(want.values()) / len(want)
    weights = tr.weighting.current_weights()
    assert sum(weights.values()) == pytest.approx(len(levels))
    for k in levels:
        assert (weights[k] < 1.0) == (want[k] > mean), (k, weights[k], want[k], mean)


def test_measure_outputs_keeps_the_refined_losses(tmp_path, small_set, demo, cache_dir):
    """loss.weighting_options.measure=outputs: no unrefined pass, GradNorm measures the training losses."""
    from taxonomist.train.config import load_config
    from taxonomist.train.loop import Trainer

    data = subset_tables(small_set, tmp_path / "data", n_classes=40, n_train=2)
    path = write_small_config(tmp_path, data, demo, cache_dir, "gn_outputs", epochs=1, batch_size=80)
    cfg = load_config(path, ["model.neck.dropout=0.0", "model.head.name=refined", "loss.name=per_rank_ce",
                             "loss.weighting=gradnorm", "loss.weighting_options={measure: outputs}"])
    logs: list[str] = []
    tr = Trainer(cfg, log=logs.append)
    tr._prepare()
    assert tr.head_input is None and not any("unrefined" in m for m in logs)
    assert create_weighting("gradnorm", tasks=["a"], measure="outputs").measure == "outputs"
