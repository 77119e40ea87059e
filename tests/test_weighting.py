"""Task weighting: static, GradNorm (Chen et al. 2018) and uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from taxonomist.errors import ConfigError
from taxonomist.losses import (GradNorm, StaticWeighting, UncertaintyWeighting, create_loss, create_weighting,
                               list_weightings)
from taxonomist.models import create_model
from taxonomist.taxonomy import load


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_task_graph(g1: float, g2: float):
    """A shared layer W (4 weights = 1) and two losses with known gradients at W:
    L_i = g_i / 2 * sum(W), so ||grad_W L_i|| = g_i and L_i = 2 g_i."""
    w = torch.nn.Parameter(torch.ones(4))
    return w, {"a": g1 / 2 * w.sum(), "b": g2 / 2 * w.sum()}


def test_registry_and_interface():
    assert {"static", "gradnorm", "uncertainty"} <= set(list_weightings())
    gn = create_weighting("gradnorm", tasks=("a", "b"))
    assert isinstance(gn, GradNorm) and gn.needs_shared_parameters
    assert not create_weighting("uncertainty", tasks=["a"]).needs_shared_parameters
    assert list(gn.parameters()) == []                        # its weights have their own optimiser
    assert len(list(create_weighting("uncertainty", tasks=["a", "b"]).parameters())) == 1
    with pytest.raises(ConfigError, match="tasks=loss.tasks"):
        create_weighting("gradnorm")
    with pytest.raises(ConfigError, match="has no option"):
        create_weighting("gradnorm", tasks=["a"], beta=1)


def test_gradnorm_reduces_the_weight_of_the_task_with_too_large_gradients():
    """Norms 10 and 1, equal training rates: GradNorm moves the weights towards w_a g_a = w_b g_b,
    i.e. w = [2/11, 20/11]. The update Linnaeus shipped (weight times its norm over the target)
    goes the other way: the large-gradient task takes everything (FIELD_NOTES.md)."""
    gn = GradNorm(tasks=["a", "b"], alpha=1.5, lr=0.05)
    history = []
    for step in range(300):
        w, losses = two_task_graph(10.0, 1.0)
        gn.update(losses, [w], step)
        history.append(gn.current_weights())
        total = gn(losses)
        total.backward()                                     # the graph survived the measurement
        assert sum(history[-1].values()) == pytest.approx(2.0)
    assert history[0]["a"] < 1.0 < history[0]["b"]          # the first step already goes the right way
    final = history[-1]
    assert final["a"] == pytest.approx(2 / 11, abs=0.03) and final["b"] == pytest.approx(20 / 11, abs=0.03)
    diag = gn.diagnostics()
    assert diag["grad_norm/a"] == pytest.approx(10.0) and diag["grad_norm/b"] == pytest.approx(1.0)
    assert diag["rate/a"] == pytest.approx(1.0)

    # the Linnaeus update, reproduced: w_i <- w_i * G_i / G*_i, renormalised to sum 2
    lw = torch.tensor([1.0, 1.0])
    norms = torch.tensor([10.0, 1.0])
    for _ in range(4):
        g = lw * norms
        lw = lw * g / g.mean()
        lw = lw * 2 / lw.sum()
    assert lw[0] > 1.99 and lw[1] < 0.01                     # the bug: the large-gradient task wins
    assert final["a"] < final["b"]                           # ours: the opposite


def test_gradnorm_alpha_gives_more_weight_to_the_task_that_trains_slower():
    gn = GradNorm(tasks=["a", "b"], alpha=1.0, lr=0.05)

    def graph(offset_b: float):
        w = torch.nn.Parameter(torch.ones(4))              # both gradient norms are 1 at every step
        return w, {"a": 0.5 * w.sum() + 2.0, "b": 0.5 * w.sum() + offset_b}

    w, losses = graph(2.0)
    gn.update(losses, [w], step=0)                            # records L(0) = 4, 4; equal norms: no change
    assert gn.current_weights() == pytest.approx({"a": 1.0, "b": 1.0})
    for step in range(1, 50):
        # task b's loss halved since step 0 (it trains faster), a's did not: r_a = 4/3, r_b = 2/3
        w, losses = graph(0.0)
        gn.update(losses, [w], step)
    assert gn.diagnostics()["rate/a"] == pytest.approx(4 / 3) and gn.diagnostics()["rate/b"] == pytest.approx(2 / 3)
    assert gn.diagnostics()["rate/a"] > 1.0 > gn.diagnostics()["rate/b"]
    assert gn.current_weights()["a"] > gn.current_weights()["b"]


def test_gradnorm_matches_the_published_step_with_sgd():
    """One SGD step on L_grad = sum |w_i g_i - mean(w g) r_i^alpha|, computed by hand."""
    gn = GradNorm(tasks=["a", "b"], alpha=0.5, lr=0.01, optimizer="sgd", initial_weights={"a": 1.5, "b": 0.5})
    w, losses = two_task_graph(4.0, 1.0)
    gn.update(losses, [w], step=0)                            # L(0) = L(t): r = 1
    g = [4.0, 1.0]
    wt = [1.5, 0.5]
    gw = [wt[i] * g[i] for i in range(2)]
    target = sum(gw) / 2
    grad = [math.copysign(g[i], gw[i] - target) for i in range(2)]
    new = [wt[i] - 0.01 * grad[i] for i in range(2)]
    new = [x * 2 / sum(new) for x in new]
    assert list(gn.current_weights().values()) == pytest.approx(new)


def test_gradnorm_schedule_validation_and_state_dict():
    with pytest.raises(ConfigError, match="multiple of the gradient-accumulation steps.*update_every=4"):
        GradNorm(tasks=["a", "b"], update_every=2, accumulation_steps=4)
    with pytest.raises(ConfigError, match="multiple"):
        GradNorm(tasks=["a", "b"], update_every=6, accumulation_steps=4)
    gn = GradNorm(tasks=["a", "b"], warmup_steps=3, update_every=2, accumulation_steps=2, lr=0.1)
    for step in range(4):
        w, losses = two_task_graph(10.0, 1.0)
        gn.update(losses, [w], step)
        if step < 3:
            assert gn.current_weights() == {"a": 1.0, "b": 1.0}      # warm-up (L(0) recorded meanwhile)
    assert gn.current_weights() == {"a": 1.0, "b": 1.0}              # step 3 is not a multiple of 2
    w, losses = two_task_graph(10.0, 1.0)
    gn.update(losses, [w], 4)
    assert gn.current_weights()["a"] < 1.0 and int(gn.n_updates) == 1
    # checkpoint round trip: the copy continues exactly like the original
    copy = GradNorm(tasks=["a", "b"], warmup_steps=3, update_every=2, accumulation_steps=2, lr=0.1)
    copy.load_state_dict(gn.state_dict())
    for m in (gn, copy):
        w, losses = two_task_graph(10.0, 1.0)
        m.update(losses, [w], 6)
    assert gn.current_weights() == copy.current_weights()
    assert set(gn.state_dict()) >= {"w", "initial_losses", "adam_m", "adam_v", "n_updates"}
    with pytest.raises(ConfigError, match="last shared layer"):
        gn.update(two_task_graph(1.0, 1.0)[1], [], 8)


def test_gradnorm_skips_absent_tasks_without_nan():
    gn = GradNorm(tasks=["a", "b", "c"], lr=0.1)
    for step in range(5):
        w = torch.nn.Parameter(torch.ones(4))
        losses = {"a": 5.0 * w.sum(), "b": 0.5 * w.sum(), "c": w.sum() * 0.0}   # c: no target (connected zero)
        gn.update(losses, [w], step)
        total = gn(losses)
        total.backward()
        assert torch.isfinite(w.grad).all()
    cw = gn.current_weights()
    assert cw["c"] == 1.0                                      # untouched
    assert cw["a"] < cw["b"] and sum(cw.values()) == pytest.approx(3.0)
    assert all(math.isfinite(v) for v in cw.values())
    assert math.isnan(gn.diagnostics()["grad_norm/c"])
    # a task that never reaches the shared layer (zero gradient there) is skipped too
    gn2 = GradNorm(tasks=["a", "b"])
    w = torch.nn.Parameter(torch.ones(4))
    other = torch.nn.Parameter(torch.ones(1))
    gn2.update({"a": w.sum(), "b": other.sum()}, [w], 0)
    assert gn2.current_weights() == {"a": 1.0, "b": 1.0}


def test_gradnorm_on_a_real_model_does_not_touch_grads_and_uses_the_new_weights(shared_data):
    tax = load(shared_data / "taxonomies" / "fathomnet2025_lineage.csv")
    torch.manual_seed(0)
    model = create_model(tax, in_features=16, head="per_rank", neck={"hidden": [32]})
    loss_fn = create_loss("per_rank_ce", tax, model.head)
    gn = create_weighting("gradnorm", tasks=loss_fn.tasks, lr=0.05)
    shared = model.last_shared_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 16)
    y = torch.as_tensor(tax.label_ids[torch.randint(0, tax.n_labels, (32,)).numpy()])
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        losses = loss_fn(model(features=x), y)
        gn.update(losses, shared, step)
        assert all(p.grad is None for p in model.parameters())          # measurement leaves .grad alone
        weights = gn.current_weights()
        total = gn(losses)
        want = sum(weights[k] * v.detach() for k, v in losses.items())
        assert total.item() == pytest.approx(float(want), rel=1e-5)      # this step uses the new weights
        total.backward()
        opt.step()
    assert sum(gn.current_weights().values()) == pytest.approx(len(loss_fn.tasks))
    assert len(set(gn.current_weights().values())) > 1


def test_uncertainty_weighting_forms_and_optimum():
    for form, reg in (("regression", 1.0), ("classification", 0.5)):
        uw = UncertaintyWeighting(tasks=["a", "b"], form=form, init=0.3)
        la, lb = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
        total = uw({"a": la, "b": lb})
        want = sum(math.exp(-0.3) * v + reg * 0.3 for v in (2.0, 0.5))
        assert total.item() == pytest.approx(want, rel=1e-6)
        # minimising over s with the losses fixed: exp(s) = L / reg
        opt = torch.optim.Adam(uw.parameters(), lr=0.05)
        for _ in range(800):
            opt.zero_grad()
            uw({"a": torch.tensor(2.0), "b": torch.tensor(0.5)}).backward()
            opt.step()
        s = uw.log_vars.detach()
        assert s[0].item() == pytest.approx(math.log(2.0 / reg), abs=0.02)
        assert s[1].item() == pytest.approx(math.log(0.5 / reg), abs=0.02)
        assert uw.current_weights()["a"] == pytest.approx(reg / 2.0, rel=0.03)
    # an absent task (connected zero) contributes nothing and its s gets a zero, not missing, gradient
    uw = UncertaintyWeighting(tasks=["a", "b"])
    w = torch.nn.Parameter(torch.ones(2))
    total = uw({"a": w.sum(), "b": w.sum() * 0.0})
    total.backward()
    assert uw.log_vars.grad is not None and uw.log_vars.grad[1].item() == 0.0
    assert uw.log_vars.grad[0].item() == pytest.approx(-2.0 + 1.0)
    state = uw.state_dict()
    assert "log_vars" in state
    with pytest.raises(ConfigError, match="form"):
        UncertaintyWeighting(tasks=["a"], form="poisson")
    with pytest.raises(ConfigError, match="built for tasks"):
        uw({"a": torch.tensor(1.0)})


def test_static_weighting_checks_tasks_at_construction():
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['genre'\]"):
        StaticWeighting({"genre": 2.0}, tasks=["genus", "species"])
    sw = create_weighting("static", weights={"genus": 0.5}, tasks=["genus", "species"])
    assert sw.current_weights() == {"genus": 0.5, "species": 1.0}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    gn = GradNorm(tasks=["a", "b", "c"], lr=0.1)
    for step in range(4):
        w = torch.nn.Parameter(torch.ones(4))
        # different batches per rank: other norms and values, and task c present on rank 1 only
        losses = {"a": (3.0 + rank) * w.sum(), "b": (0.5 + rank) * w.sum(),
                  "c": w.sum() * (2.0 if rank == 1 else 0.0)}
        gn.update(losses, [w], step)
    torch.save(gn.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gradnorm_gives_every_ddp_rank_the_same_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(s0["w"], s1["w"]) and torch.equal(s0["initial_losses"], s1["initial_losses"])
    assert not torch.equal(s0["w"], torch.ones(3))                 # it did move
    assert s0["w"].sum().item() == pytest.approx(3.0)
