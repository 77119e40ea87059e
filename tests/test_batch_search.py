"""Automatic batch-size search (taxonomist.train.batch_search): the search on a simulated memory limit,
and the real probe step on small models on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taxonomist.errors import ConfigError
from taxonomist.losses import create_loss
from taxonomist.models import create_backbone, create_model
from taxonomist.taxonomy import Taxonomy
from taxonomist.train import batch_search
from taxonomist.train.batch_search import (BatchSizeResult, ProbeStep, find_batch_size, is_oom_error,
                                           search_batch_size)


def fake_step(limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError,
              message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    """A step that 'runs out of memory' above ``limit`` samples; records the sizes it was called with."""
    calls: list[int] = []

    def step(b: int) -> None:
        calls.append(b)
        if b > limit:
            raise error(message)

    return step, calls


def test_doubling_then_binary_search_with_margin():
    step, calls = fake_step(300)
    res = find_batch_size(step, start=16, max_batch=4096, device="cpu", probe=True, multiple_of=1, margin=0.9)
    assert calls[:6] == [16, 32, 64, 128, 256, 512]  # doubling until the first failure
    assert all(256 < b < 512 for b in calls[6:])  # then a binary search between 256 and 512
    assert res.probed and res.limit == 300 and res.first_failure == 301
    assert res.batch_size == 270 == int(res)  # 0.9 x 300
    assert "largest batch that ran: 300" in res.reason and "batch 301 ran out of memory" in res.reason
    assert "90% of 300" in res.reason and str(res).startswith("270 (")
    assert [t.batch_size for t in res.trials] == calls and [t.ok for t in res.trials] == [b <= 300 for b in calls]


def test_multiple_of_rounds_the_search_and_the_result():
    step, calls = fake_step(300)
    res = find_batch_size(step, start=16, max_batch=4096, device="cpu", probe=True)  # multiple_of=8
    assert all(b % 8 == 0 for b in calls)
    assert res.limit == 296 and res.first_failure == 304
    assert res.batch_size == 264  # int(0.9 * 296) = 266 -> 264
    assert "multiple of 8" in res.reason


def test_start_that_fails_halves_down():
    step, calls = fake_step(5)
    res = find_batch_size(step, start=32, device="cpu", probe=True)
    assert calls[:4] == [32, 16, 8, 4]
    assert res.limit == 5 and res.first_failure == 6 and res.batch_size == 4  # int(0.9 * 5)


def test_max_batch_that_fits_is_used_without_margin():
    step, calls = fake_step(10_000)
    res = find_batch_size(step, start=16, max_batch=1000, device="cpu", probe=True)
    assert calls == [16, 32, 64, 128, 256, 512, 1000]
    assert res.batch_size == 1000 and res.first_failure is None
    assert "max_batch" in res.reason and "no margin" in res.reason


def test_other_out_of_memory_errors_count_and_other_errors_propagate():
    step, _ = fake_step(100, RuntimeError, "MPS backend out of memory (MPS allocated: 17 GB)")
    assert find_batch_size(step, start=64, device="cpu", probe=True, multiple_of=1).limit == 100
    assert is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    step, calls = fake_step(100, ValueError, "a bug, not memory")
    with pytest.raises(ValueError, match="a bug"):
        find_batch_size(step, start=64, device="cpu", probe=True)
    assert calls == [64, 128]


def test_nothing_fits_is_a_clear_error():
    step, _ = fake_step(0)
    with pytest.raises(ConfigError, match=r"even with a batch of 1.*train.amp"):
        find_batch_size(step, start=8, device="cpu", probe=True)


def test_memory_is_freed_after_every_try(monkeypatch):
    freed: list[str] = []
    monkeypatch.setattr(batch_search, "free_memory", lambda device=None: freed.append(str(device)))
    step, calls = fake_step(300)
    find_batch_size(step, start=16, device="cuda", probe=True)  # no CUDA needed: the step is fake
    assert len(freed) == len(calls) and set(freed) == {"cuda"}


def test_max_trials_caps_the_search():
    step, calls = fake_step(300)
    res = find_batch_size(step, start=1, max_batch=4096, device="cpu", probe=True, multiple_of=1, max_trials=12)
    assert len(calls) == 12 and "max_trials=12" in res.reason
    assert 256 <= res.limit <= 300 and res.batch_size == int(0.9 * res.limit)


def test_cpu_is_not_probed_by_default():
    step, calls = fake_step(300)
    res = find_batch_size(step, start=16, max_batch=4096, device="cpu", fallback=256)
    assert calls == [] and not res.probed and res.batch_size == 256 and res.limit is None
    assert "no memory probe on cpu" in res.reason and "configured batch size, 256" in res.reason
    res = find_batch_size(step, max_batch=100, device="cpu", fallback=256)
    assert res.batch_size == 100 and "capped at max_batch=100" in res.reason
    assert res.to_json()["batch_size"] == 100


def test_bad_arguments():
    step, _ = fake_step(300)
    with pytest.raises(ConfigError, match="margin"):
        find_batch_size(step, margin=1.5, device="cpu", probe=True)
    with pytest.raises(ConfigError, match="max_batch=0"):
        find_batch_size(step, max_batch=0, device="cpu", probe=True)


# ---------------------------------------------------------------- the real probe step
@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_parents([-1, 0, 0, 1, 1, 2], ["root", "a", "b", "a1", "a2", "b1"]).with_labels([3, 4, 5, 2])


def test_probe_step_on_features_and_the_search(tax):
    model = create_model(tax, backbone=None, in_features=32, neck={"hidden": [16], "norm": "batch"},
                         head={"name": "per_rank"})
    loss_fn = create_loss("per_rank_ce", tax, model.head)
    model.eval()
    bn = model.neck.layers[0]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    rng = torch.get_rng_state()
    with ProbeStep(model, input_shape=(32,), input_key="features", loss_fn=loss_fn, device="cpu") as step:
        assert model.training and step.reserve_bytes == 2 * 4 * sum(p.numel() for p in model.parameters())
        step(8)
        assert all(p.grad is None for p in model.parameters())  # zeroed after each step
        assert not torch.equal(bn.running_mean, stats[0])  # the step trained (BatchNorm saw the batch) ...
        res = find_batch_size(step, start=2, max_batch=64, device="cpu", probe=True)
    assert res.batch_size == 64 and res.first_failure is None and step.calls == 1 + len(res.trials)
    assert not model.training  # ... and everything is restored afterwards
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(torch.get_rng_state(), rng)


def test_probe_step_runs_a_trainable_backbone_on_images(tax):
    bb = create_backbone("efficientnet_lite0", pretrained=True, trainable=True, image_size=32)
    model = create_model(tax, backbone=bb, neck={"hidden": []}, head={"name": "flat"}, attributes={"colour": 3})
    loss_fn = create_loss("ce", tax, model.head)
    from taxonomist.losses import with_attribute_losses

    loss_fn = with_attribute_losses(loss_fn, {"colour": 3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.Size] = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    res = search_batch_size(model, input_shape=(3, 32, 32), loss_fn=loss_fn, device="cpu", probe=True, start=2,
                            max_batch=4, optimizer_state_factor=1.0)
    hook.remove()
    assert seen == [torch.Size([2, 3, 32, 32]), torch.Size([4, 3, 32, 32])]
    assert res.batch_size == 4 and isinstance(res, BatchSizeResult)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight or BatchNorm statistic changed
    assert all(p.grad is None for p in model.parameters())


def test_search_on_cpu_does_not_run_the_model(tax):
    class Boom(nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("the model must not run on a CPU search")

    res = search_batch_size(Boom(), input_shape=(8,), device="cpu", fallback=128, max_batch=4096)
    assert res.batch_size == 128 and not res.probed


def test_surrogate_loss_without_loss_fn():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    grads: list[bool] = []
    model[0].weight.register_hook(lambda g: grads.append(bool(g.abs().sum() > 0)))
    wrapped = _KwargModel(model)  # the probe passes its input by keyword (input_key)
    with ProbeStep(wrapped, input_shape=(8,), input_key="x", device="cpu") as step:
        step(5)
    assert grads == [True]


class _KwargModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_memory_limit_is_found():
    """A real out-of-memory error: the process is limited to 1 GiB of the GPU."""
    dev = torch.device("cuda")
    budget = 1 << 30
    batch_search.free_memory(dev)
    torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(dev).total_memory, dev)
    try:
        model = _KwargModel(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])).to(dev)
        res = search_batch_size(model, input_shape=(1024,), input_key="x", device=dev, start=256, max_batch=1 << 20)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        batch_search.free_memory(dev)
    assert res.probed and res.first_failure is not None and res.limit < res.first_failure
    assert res.batch_size <= 0.9 * res.limit and all(t.peak_bytes is not None for t in res.trials)
