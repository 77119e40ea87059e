"""The optimiser side of training: the LR multiplier (warm-up, cosine), SGD on real demo features, and
mixed precision + torch.compile on CUDA (skipped without a GPU)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from taxonomist.cli.main import main as cli
from taxonomist.train.schedule import lr_multiplier

from test_train_e2e import write_small_config


def test_warmup_ramps_linearly_then_cosine_decays_to_zero():
    total, warm = 100, 10
    f = lr_multiplier("cosine", total, warm)
    ramp = [f(s) for s in range(warm)]
    assert ramp == pytest.approx([(s + 1) / (warm + 1) for s in range(warm)])  # linear, from ~0, below 1
    assert all(b > a for a, b in zip(ramp, ramp[1:])) and ramp[-1] < 1.0
    assert f(warm) == pytest.approx(1.0)  # the peak right after warm-up
    decay = [f(s) for s in range(warm, total + 1)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))  # monotone after warm-up
    assert f(warm + (total - warm) // 2) == pytest.approx(0.5)  # half-way down the cosine
    assert f(total) == pytest.approx(0.0, abs=1e-12)  # ends at its minimum (0) ...
    assert f(total + 50) == pytest.approx(0.0, abs=1e-12)  # ... and stays there
    assert f(total - 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))


def test_constant_schedule_and_degenerate_lengths():
    f = lr_multiplier("constant", 50, 5)
    assert [f(s) for s in range(5)] == pytest.approx([(s + 1) / 6 for s in range(5)])
    assert {f(s) for s in range(5, 60)} == {1.0}
    no_warm = lr_multiplier("cosine", 10, 0)
    assert no_warm(0) == 1.0 and no_warm(10) == pytest.approx(0.0, abs=1e-12)
    # warm-up longer than the run is cut to leave one step of decay; one-step runs do not divide by zero
    long = lr_multiplier("cosine", 4, 100)
    assert [long(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75]) and long(3) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 1, 1)(0) == 1.0


@pytest.mark.slow
def test_sgd_with_cosine_warmup_trains_on_demo_features(tmp_path, small_set, demo, cache_dir):
    """A short SGD run on real demo images: the loss falls, the optimiser really is SGD with Nesterov
    momentum, and each epoch's logged LR is the schedule's value."""
    epochs, bs, lr = 5, 32, 0.05
    cfg = write_small_config(tmp_path, small_set, demo, cache_dir, "sgd", epochs=epochs, batch_size=bs, lr=lr,
                             optimizer="sgd", momentum=0.9, warmup_epochs=1, schedule="cosine")
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "sgd"
    hist = pd.read_csv(run / "metrics.csv")
    assert hist["train/loss"].iloc[-1] < 0.8 * hist["train/loss"].iloc[0]
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True and "betas" not in group
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    n_train = len(pd.read_csv(small_set / "train.csv"))
    steps = math.ceil(n_train / bs)
    f = lr_multiplier("cosine", steps * epochs, steps)
    expected = [lr * f(e * steps) for e in range(1, epochs + 1)]  # the LR after each epoch's last step
    np.testing.assert_allclose(hist["lr"].to_numpy(), expected, rtol=1e-6)
    assert hist["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision and torch.compile need a CUDA device")
def test_amp_and_compile_train_on_cuda(tmp_path, small_set, demo, cache_dir):
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cfg = write_small_config(tmp_path, small_set, demo, cache_dir, "amp", epochs=3, device="cuda", amp=dtype,
                             compile=True)
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "amp"
    hist = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(hist["train/loss"]).all() and hist["train/loss"].iloc[-1] < hist["train/loss"].iloc[0]
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])  # compiled wrapper not saved
    assert state["scaler"] == {} or dtype == "fp16"  # the gradient scaler runs only under fp16
    # the bundle from the compiled, mixed-precision run loads and predicts on the CPU like any other
    from taxonomist.bundle import load_bundle
    from taxonomist.data import load_samples

    b = load_bundle(run / "bundle")
    val = load_samples(str(small_set / "val.csv"), b.taxonomy)
    probs = b.label_probs(val, cache_dir=None, progress=False)
    assert probs.shape == (len(val), b.taxonomy.n_labels) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
