"""DDP on CPU (gloo, 2 processes via torchrun) matches a single process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from taxonomist.cli.main import main as cli

from test_train_e2e import write_small_config


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "taxonomist", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path, small_set, demo, cache_dir):
    overrides = ["model.neck.dropout=0.0"]
    single = write_small_config(tmp_path, small_set, demo, cache_dir, "single", epochs=5, batch_size=32)
    # fill the feature cache in this process so both runs read identical features
    assert cli(["train", str(single), *overrides]) == 0
    multi = write_small_config(tmp_path, small_set, demo, cache_dir, "ddp", epochs=5, batch_size=32)
    res = _torchrun(["train", str(multi), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = pd.read_csv(tmp_path / "runs" / "single" / "metrics.csv")
    b = pd.read_csv(tmp_path / "runs" / "ddp" / "metrics.csv")
    assert list(b["epoch"]) == [1, 2, 3, 4, 5]
    # each rank's loss is scaled by its share of the global batch, so the averaged gradient is the
    # single-process gradient up to float summation order (5 significant digits are logged)
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-4)
    for key in ("val/top1_error", "val/hdist@1", "val/n_samples"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-3)
    # only rank 0 wrote: one bundle, one metrics file, checkpoints loadable
    assert (tmp_path / "runs" / "ddp" / "bundle" / "bundle.json").exists()
    state = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 5 and not any(k.startswith("module.") for k in state["model"])
    # resume under DDP: the same command finds the finished run and resumes from its last checkpoint
    res2 = _torchrun(["train", str(multi), *overrides])
    assert res2.returncode == 0 and "resuming from" in res2.stdout, res2.stdout[-2000:] + res2.stderr[-2000:]


@pytest.mark.slow
def test_ddp_multitask_gradnorm_with_missing_task_labels(tmp_path, small_set, demo, cache_dir):
    """Per-rank head + an attribute head labelled on 1 training row in 12 (most batches lack that task),
    GradNorm weighting and gradient accumulation: DDP neither hangs nor errors and matches one process."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        df = pd.read_csv(small_set / f"{split}.csv")
        ratio = np.array([w / h for w, h in (Image.open(p).size for p in df["path"])])
        shape = np.where(ratio >= 1.0, "wide", "tall").astype(object)
        if split == "train":
            shape[np.arange(len(df)) % 12 != 0] = ""
        df["attr_shape"] = shape
        df.to_csv(data / f"{split}.csv", index=False)
    overrides = ["model.neck.dropout=0.0", "model.head.name=per_rank", "loss.name=per_rank_ce",
                 "model.attributes=[shape]", "loss.weighting=gradnorm", "train.accumulation_steps=2"]
    single = write_small_config(tmp_path, data, demo, cache_dir, "mt_single", epochs=2, batch_size=16)
    assert cli(["train", str(single), *overrides]) == 0
    multi = write_small_config(tmp_path, data, demo, cache_dir, "mt_ddp", epochs=2, batch_size=16)
    res = _torchrun(["train", str(multi), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = pd.read_csv(tmp_path / "runs" / "mt_single" / "metrics.csv")
    b = pd.read_csv(tmp_path / "runs" / "mt_ddp" / "metrics.csv")
    assert "train/loss_attr/shape" in b.columns and "weight/attr/shape" in b.columns
    wcols = [c for c in a.columns if c.startswith("weight/")]
    for h in (a, b):  # GradNorm keeps sum w = T on every rank layout
        np.testing.assert_allclose(h[wcols].sum(axis=1), len(wcols), rtol=1e-5)
    # GradNorm averages the per-task gradients over the ranks before taking norms, as one process would.
    # What remains is DDP's own averaging of a sparse task: each rank's attribute loss is the mean over
    # its own labelled samples, and DDP averages the ranks, so a step where one rank holds the only
    # labelled sample gives it half the single-process gradient (measured: 1.5 % on the loss after two
    # epochs; with averaged per-rank norms instead of averaged gradients it was 6 %).
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=3e-2)
    np.testing.assert_allclose(b[wcols].to_numpy(), a[wcols].to_numpy(), rtol=5e-2)


@pytest.mark.slow
def test_ddp_uncertainty_weighting_matches_single_process(tmp_path, small_set, demo, cache_dir):
    """The learnable log-variances live outside the DDP-wrapped model; their gradients are averaged
    over the ranks by the loop, so two processes learn the same weights as one."""
    overrides = ["model.neck.dropout=0.0", "model.head.name=per_rank", "loss.name=per_rank_ce",
                 "loss.weighting=uncertainty"]
    single = write_small_config(tmp_path, small_set, demo, cache_dir, "u_single", epochs=2, batch_size=32)
    assert cli(["train", str(single), *overrides]) == 0
    multi = write_small_config(tmp_path, small_set, demo, cache_dir, "u_ddp", epochs=2, batch_size=32)
    res = _torchrun(["train", str(multi), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = pd.read_csv(tmp_path / "runs" / "u_single" / "metrics.csv")
    b = pd.read_csv(tmp_path / "runs" / "u_ddp" / "metrics.csv")
    wcols = [c for c in a.columns if c.startswith("weight/")]
    assert len(wcols) == 6 and np.abs(a[wcols].to_numpy() - 1.0).max() > 1e-3  # they moved
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-4)
    np.testing.assert_allclose(b[wcols].to_numpy(), a[wcols].to_numpy(), rtol=1e-4)
