"""DDP on CPU (gloo, 2 processes via torchrun) matches a single process with the same global batch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from taxonomist.cli.main import main as cli

from _ddp import dist_env, spawn
from test_train_e2e import write_small_config


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "taxonomist", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path, small_set, demo, cache_dir):
    overrides = ["model.neck.dropout=0.0", "checkpoint.keep=5"]
    single = write_small_config(tmp_path, small_set, demo, cache_dir, "single", epochs=5, batch_size=32)
    # fill the feature cache in this process so both runs read identical features
    assert cli(["train", str(single), *overrides]) == 0
    multi = write_small_config(tmp_path, small_set, demo, cache_dir, "ddp", epochs=5, batch_size=32)
    res = _torchrun(["train", str(multi), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    a = pd.read_csv(tmp_path / "runs" / "single" / "metrics.csv")
    b = pd.read_csv(run / "metrics.csv")
    assert list(b["epoch"]) == [1, 2, 3, 4, 5]
    # each rank's loss is scaled by its share of the global batch, so the averaged gradient is the
    # single-process gradient up to float summation order (5 significant digits are logged)
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-4)
    for key in ("val/top1_error", "val/hdist@1", "val/n_samples"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-3)
    # only rank 0 wrote: one bundle, one metrics file, checkpoints loadable; only rank 0 printed
    assert (run / "bundle" / "bundle.json").exists()
    assert res.stdout.count("run folder:") == 1 and "best epoch None" not in res.stdout, res.stdout[-2000:]
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert final["epoch"] == 5 and not any(k.startswith("module.") for k in final["model"])

    # resume under DDP mid-run: make the run look as if it had been killed after epoch 3
    shutil.copy(run / "checkpoints" / "epoch_0003.pt", run / "checkpoints" / "last.pt")
    res2 = _torchrun(["train", str(multi), *overrides])
    assert res2.returncode == 0, res2.stdout[-2000:] + res2.stderr[-2000:]
    assert "resuming from" in res2.stdout and "(epoch 3 of 5 done)" in res2.stdout, res2.stdout[-2000:]
    c = pd.read_csv(run / "metrics.csv")
    assert list(c["epoch"]) == [1, 2, 3, 4, 5]
    # epochs 4 and 5 trained again from rank 0's broadcast checkpoint: the same run as uninterrupted
    pd.testing.assert_frame_equal(c.drop(columns="time_s"), b.drop(columns="time_s"))
    again = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert again["epoch"] == 5
    for k, v in final["model"].items():
        torch.testing.assert_close(again["model"][k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_ddp_cold_cache_shared_extraction_matches_single_process(tmp_path, small_set, demo):
    """Frozen backbone, empty feature cache: both ranks extract (each its own chunks, none twice), then
    both read the whole cache; features and training equal a single process on its own cold cache."""
    # chunks hold at most 4 x 16 images, so train (363) and val (121) have at least 2 chunks each
    overrides = ["model.neck.dropout=0.0", "train.feature_chunk_size=16"]
    cold_single, cold_ddp = tmp_path / "cache_single", tmp_path / "cache_ddp"
    single = write_small_config(tmp_path, small_set, demo, cold_single, "cold_single", epochs=2, batch_size=32)
    assert cli(["train", str(single), *overrides]) == 0
    multi = write_small_config(tmp_path, small_set, demo, cold_ddp, "cold_ddp", epochs=2, batch_size=32)
    res = _torchrun(["train", str(multi), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the work was split: each rank computed some of the chunks, and the ranks found the cache shared
    lines = [ln for ln in res.stdout.splitlines() if "cache chunks" in ln]
    assert len(lines) == 2, res.stdout[-3000:]  # train and val
    for ln in lines:
        m = re.search(r"(\d+) of (\d+) cache chunks .* computed by 2 processes: (\d+), (\d+) chunks each", ln)
        assert m, ln
        total, n_chunks, r0, r1 = map(int, m.groups())
        assert total == n_chunks == r0 + r1 and r0 > 0 and r1 > 0, ln
    assert "shared by all processes" in res.stdout
    fa = {p.relative_to(cold_single): p for p in cold_single.rglob("*.npy")}
    fb = {p.relative_to(cold_ddp): p for p in cold_ddp.rglob("*.npy")}
    assert len(fa) > 4 and sorted(fa) == sorted(fb)  # the same chunk files (names hash their images)
    for k in fa:  # other batches and thread counts (torchrun: 1 per process) than the single run: rounding only
        np.testing.assert_allclose(np.load(fb[k]), np.load(fa[k]), rtol=1e-4, atol=1e-5)
    assert not [p for p in cold_ddp.rglob("*") if p.name.startswith(".")]  # no temp or probe file left
    a = pd.read_csv(tmp_path / "runs" / "cold_single" / "metrics.csv")
    b = pd.read_csv(tmp_path / "runs" / "cold_ddp" / "metrics.csv")
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-4)
    for key in ("val/top1_error", "val/hdist@1", "val/n_samples"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-3)


@pytest.mark.slow
def test_ddp_schedule_tail_random_draws_and_resume(tmp_path, small_set, demo, cache_dir):
    """363 training rows in global batches of 362: DDP skips the 1-row tail (2 ranks), and the LR
    schedule counts exactly the steps taken, so it ends at its final value (cosine: 0). With dropout and
    feature mixup (random draws seeded per seed, epoch and rank), a run resumed after epoch 2 repeats
    epoch 3's draws on both ranks: the same result as uninterrupted. train.sync_batchnorm with a
    batch-norm neck on CPU is ignored with a note (torch's SyncBatchNorm needs a GPU)."""
    overrides = ["model.neck.dropout=0.3", "model.neck.norm=batch", "train.sync_batchnorm=true",
                 "train.mixup={mixup_alpha: 0.4, prob: 1.0}", "checkpoint.keep=5"]
    cfg = write_small_config(tmp_path, small_set, demo, cache_dir, "tail", epochs=3, batch_size=362)
    res = _torchrun(["train", str(cfg), *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "train.sync_batchnorm is ignored on cpu" in res.stdout
    run = tmp_path / "runs" / "tail"
    h = pd.read_csv(run / "metrics.csv")
    # one step per epoch, 1 warm-up step: the multipliers after each epoch are 1, cos(pi/2) -> 0.5, 0
    np.testing.assert_allclose(h["lr"], [0.003, 0.0015, 0.0], atol=1e-12)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 3
    final = state["model"]

    shutil.copy(run / "checkpoints" / "epoch_0002.pt", run / "checkpoints" / "last.pt")
    res2 = _torchrun(["train", str(cfg), *overrides])
    assert res2.returncode == 0 and "(epoch 2 of 3 done)" in res2.stdout, res2.stdout[-2000:] + res2.stderr[-2000:]
    h2 = pd.read_csv(run / "metrics.csv")
    pd.testing.assert_frame_equal(h2.drop(columns="time_s"), h.drop(columns="time_s"))
    again = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k, v in final.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-6, msg=k)


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
    # The loop all-reduces each task's labelled count and rescales each rank's attribute loss to its
    # share of the global mean, so the gradient is the single-process one (measured with static
    # weights: equal to the 5 logged digits; without the rescaling 3 % on the loss). What remains is
    # GradNorm's measurement: its loss ratios and gradient norms average each rank's own mean over the
    # ranks holding the task (measured: 8e-5 on the loss, 2e-3 on the weights after two epochs; before
    # the rescaling 1.5 % and 1 %).
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-3)
    np.testing.assert_allclose(b["train/loss_attr/shape"], a["train/loss_attr/shape"], rtol=1e-3)
    np.testing.assert_allclose(b[wcols].to_numpy(), a[wcols].to_numpy(), rtol=1e-2)


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


# ---------------------------------------------------------------- building blocks (fast)
def test_fill_feature_cache_parts_write_disjoint_chunks(plankton_dir, tmp_path, monkeypatch):
    """Two parts filling one cache (as two ranks do) write every chunk exactly once between them;
    reading afterwards computes nothing and gives the single-process features."""
    from torch import nn

    from taxonomist.data import CacheStats, Preprocess, extract_features, load_samples
    from taxonomist.data import feature_cache as fc
    from taxonomist.taxonomy import Taxonomy

    classes = sorted(p.name for p in (plankton_dir / "train").iterdir() if p.is_dir())[:4]
    root = tmp_path / "img"
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for f in sorted((plankton_dir / "train" / cls).iterdir())[:15]:
            shutil.copy(f, root / cls / f.name)
    table = load_samples(root, Taxonomy.from_parents([-1] + [0] * len(classes), ["root", *classes]))
    pre = Preprocess(image_size=32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    written: list[str] = []
    save = fc._save_atomic
    monkeypatch.setattr(fc, "_save_atomic", lambda path, arr: (written.append(path.name), save(path, arr)))
    stats = [fc.fill_feature_cache(net, "net@1", table, pre, tmp_path / "cache", part=p, n_parts=2,
                                   batch_size=8, progress=False, chunk_size=4) for p in (0, 1)]
    n_chunks = stats[0].n_chunks
    assert n_chunks >= 4 and all(s.chunks_computed > 0 for s in stats)  # <= 16 images per chunk, 60 images
    assert sum(s.chunks_computed for s in stats) == n_chunks and sorted(set(written)) == sorted(written)
    again = CacheStats()
    feats = extract_features(net, "net@1", table, pre, tmp_path / "cache", progress=False, chunk_size=4, stats=again)
    assert again.chunks_computed == 0 and again.chunks_read == n_chunks
    ref = extract_features(net, "net@1", table, pre, tmp_path / "ref", progress=False, chunk_size=4)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-6)
    # a second fill finds its chunks and computes nothing
    written.clear()
    assert fc.fill_feature_cache(net, "net@1", table, pre, tmp_path / "cache", part=1, n_parts=2,
                                 progress=False, chunk_size=4).chunks_computed == 0 and not written


def test_rank_seeds_differ_by_rank_and_epoch_and_repeat():
    from types import SimpleNamespace

    from taxonomist.train.distributed import DistInfo, rank_seed
    from taxonomist.train.loop import Trainer

    seeds = {rank_seed(3, e, r) for e in (1, 2, 3) for r in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(3, 2, 1) == rank_seed(3, 2, 1) and rank_seed(-1, 1, 0) >= 0

    class Mix:  # stands in for TaxonMixup / MetadataMasker: the loop re-seeds their generators
        rng = None

    def draws(rank: int, epoch: int) -> tuple[float, float, float]:
        tr = Trainer.__new__(Trainer)
        tr.cfg = SimpleNamespace(seed=3)
        tr.dist = DistInfo(rank, 2, rank)
        tr.mixup, tr.mixup_seed = Mix(), 3
        tr.masker = SimpleNamespace(generator=torch.Generator())
        tr._seed_epoch(epoch)
        drop = torch.nn.functional.dropout(torch.ones(1000), 0.5).sum().item()  # the global torch stream
        return drop, float(tr.mixup.rng.random()), float(torch.rand(1, generator=tr.masker.generator))

    d00, d10, d01 = draws(0, 1), draws(1, 1), draws(0, 2)
    assert all(a != b for a, b in zip(d00, d10)) and all(a != b for a, b in zip(d00, d01))
    assert draws(1, 1) == d10  # a resumed epoch draws the same


def test_sync_batchnorm_conversion():
    """SyncBatchNorm only runs on GPUs (torch raises on CPU), so CI checks the conversion itself:
    every BatchNorm of a trainable backbone and a batch-norm neck, the same state-dict keys and values,
    the same eval outputs; and that nothing is converted on CPU or in one process."""
    from torch import nn

    from taxonomist.models import create_backbone, create_model
    from taxonomist.taxonomy import Taxonomy
    from taxonomist.train.distributed import DistInfo, convert_sync_batchnorm

    tax = Taxonomy.from_parents([-1, 0, 0, 1, 1], ["root", "a", "b", "a1", "a2"])

    def build():
        torch.manual_seed(0)
        bb = create_backbone("efficientnet_lite0", pretrained=False, trainable=True, image_size=32)
        return create_model(tax, backbone=bb, neck={"hidden": [16], "norm": "batch", "dropout": 0.0}).eval()

    model = build()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn > 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.label_log_probs(model(images=x))
    for info, dev in ((DistInfo(0, 1, 0), torch.device("cuda")), (DistInfo(0, 2, 0), torch.device("cpu"))):
        same, n, note = convert_sync_batchnorm(model, info, dev)
        assert n == 0 and not any(isinstance(m, nn.SyncBatchNorm) for m in same.modules()), note
    assert "ignored on cpu" in note
    conv, n, note = convert_sync_batchnorm(model, DistInfo(0, 2, 0), torch.device("cuda"))
    assert n == n_bn and f"{n_bn} BatchNorm" in note
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in conv.modules()) == n_bn
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in conv.modules())
    after = conv.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    with torch.no_grad():  # eval mode: SyncBatchNorm uses the running statistics, no collective
        torch.testing.assert_close(conv.label_log_probs(conv(images=x)), ref)
    fresh = build()
    fresh.load_state_dict(after)  # a checkpoint of the converted model loads into a plain one (bundle)


def _collectives_worker(rank: int, world: int, port: int, shared: str, out: str) -> None:
    dist_env(rank, world, port)
    from taxonomist.errors import ConfigError
    from taxonomist.train import distributed as D

    info, _ = D.init_distributed(torch.device("cpu"), timeout_min=2)
    try:
        # gather to rank 0 only: uneven blocks (one empty), in pieces of 3 rows (tiny max_bytes)
        n = [5, 0][rank]
        local = (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 100 * rank)
        got = D.gather_rows(local, info, max_bytes=3 * 4 * 4 * world)
        if rank == 0:
            np.testing.assert_array_equal(got, np.arange(20, dtype=np.float32).reshape(5, 4))
        else:
            assert got is None
        local = np.full((rank + 2, 3), rank, dtype=np.float32)  # 2 rows, then 3 rows
        got = D.gather_rows(local, info, max_bytes=1)
        if rank == 0:
            np.testing.assert_array_equal(got[:, 0], [0, 0, 1, 1, 1])
        # rank 0's checkpoint, entry by entry
        st = D.broadcast_state({"epoch": 3, "w": torch.arange(4.0)} if rank == 0 else None, info)
        assert st["epoch"] == 3 and torch.equal(st["w"], torch.arange(4.0))
        assert D.broadcast_state(None, info) is None
        # an error on rank 0 is an error on every rank, not a hang
        def fail():
            raise ConfigError("bad resume state")
        try:
            D.on_main(fail, info)
        except ConfigError as exc:
            assert "bad resume state" in str(exc)
        else:
            raise AssertionError("no error")
        assert D.on_main(lambda: 7, info) == 7 and D.on_main(lambda: 7, info, share=False) == (7 if rank == 0 else None)
        # one folder both see (a shared file system), then one folder each (per-machine disks)
        assert D.shared_dir_group(shared, info) == (rank, 2)
        assert D.shared_dir_group(os.path.join(shared, f"node{rank}"), info) == (0, 1)
        assert not [f for f in os.listdir(shared) if f.startswith(".probe")]
        with open(os.path.join(out, f"ok{rank}"), "w") as fh:
            fh.write("ok")
    finally:
        D.shutdown(info)


def test_collectives_gather_broadcast_errors_and_cache_groups(tmp_path):
    (tmp_path / "shared").mkdir()
    spawn(_collectives_worker, str(tmp_path / "shared"), str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
