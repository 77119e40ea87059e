"""The training loop's options on real plankton images: gradient accumulation, task weighting
(GradNorm, uncertainty), EMA, early stopping, attribute heads, metadata fusion, mixup and
augmentation presets.

Attributes and metadata come from the images themselves (aspect ratio, pixel area), real
per-sample properties that the NDSB tables do not carry as columns.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from taxonomist.bundle import load_bundle
from taxonomist.data import load_samples
from taxonomist.errors import ConfigError
from taxonomist.train.config import load_config
from taxonomist.train.loop import train

from test_train_e2e import write_small_config


def _run(tmp_path, small_set, demo, cache_dir, name, overrides=(), **train_opts):
    path = write_small_config(tmp_path, small_set, demo, cache_dir, name, **train_opts)
    cfg = load_config(path, list(overrides))
    return train(cfg, log=lambda _m: None)


def _history(result) -> pd.DataFrame:
    return pd.read_csv(result.run_dir / "metrics.csv")


@pytest.fixture(scope="module")
def shaped_set(tmp_path_factory, small_set) -> Path:
    """small_set plus attr_shape (wide/tall/square from the image's aspect ratio) and meta_area
    (pixel count; every 7th training row left empty = missing)."""
    out = tmp_path_factory.mktemp("shaped")
    for split in ("train", "val"):
        df = pd.read_csv(small_set / f"{split}.csv")
        sizes = [Image.open(p).size for p in df["path"]]
        ratio = np.array([w / h for w, h in sizes])
        df["attr_shape"] = np.where(ratio > 1.15, "wide", np.where(ratio < 0.87, "tall", "square"))
        area = np.array([float(w * h) for w, h in sizes])
        if split == "train":
            area[::7] = np.nan
        df["meta_area"] = area
        df.to_csv(out / f"{split}.csv", index=False)
    return out


def test_accumulation_matches_one_big_batch(tmp_path, small_set, demo, cache_dir):
    """4 micro-batches of 8 give the gradient of one batch of 32 (no dropout, per-sample norm)."""
    over = ["model.neck.dropout=0.0"]
    one = _run(tmp_path, small_set, demo, cache_dir, "acc1", over, epochs=2)
    four = _run(tmp_path, small_set, demo, cache_dir, "acc4", over, epochs=2, accumulation_steps=4)
    h1, h4 = _history(one), _history(four)
    np.testing.assert_allclose(h4["train/loss"], h1["train/loss"], rtol=1e-4)
    assert four.metrics["top1_error"] == pytest.approx(one.metrics["top1_error"], abs=1e-6)
    assert four.metrics["mistake_severity"] == pytest.approx(one.metrics["mistake_severity"], rel=1e-4)


def test_gradnorm_reweights_per_rank_tasks_and_resumes(tmp_path, small_set, demo, cache_dir):
    over = ["model.head.name=per_rank", "loss.name=per_rank_ce", "loss.weighting=gradnorm",
            "loss.weighting_options={alpha: 1.5, lr: 0.05}"]
    res = _run(tmp_path, small_set, demo, cache_dir, "gn", over, epochs=3)
    hist = _history(res)
    wcols = [c for c in hist.columns if c.startswith("weight/")]
    assert len(wcols) == 6  # the six depth levels of the NDSB tree
    w = hist[wcols].to_numpy()
    np.testing.assert_allclose(w.sum(axis=1), len(wcols), rtol=1e-5)  # GradNorm keeps sum w = T
    assert np.abs(w[-1] - 1.0).max() > 0.05  # and moved them
    state = torch.load(res.run_dir / "checkpoints" / "last.pt", weights_only=False)
    np.testing.assert_allclose(state["weighting"]["w"].numpy(), w[-1], rtol=1e-4)

    # (resuming the weights is tested in test_resume_repeats_an_uninterrupted_run_with_all_the_new_state)
    with pytest.raises(ConfigError, match="learns them"):
        _run(tmp_path, small_set, demo, cache_dir, "gn_bad", over + ["loss.task_weights={level1: 2.0}"])


def test_uncertainty_weighting_learns_its_log_variances(tmp_path, small_set, demo, cache_dir):
    over = ["model.head.name=per_rank", "loss.name=per_rank_ce", "loss.weighting=uncertainty"]
    res = _run(tmp_path, small_set, demo, cache_dir, "unc", over, epochs=2)
    state = torch.load(res.run_dir / "checkpoints" / "last.pt", weights_only=False)
    log_vars = state["weighting"]["log_vars"]
    assert log_vars.abs().max() > 1e-3  # trained through the optimiser (they start at 0)
    hist = _history(res)
    assert any(c.startswith("weight/") for c in hist.columns)


def test_ema_weights_are_validated_and_exported(tmp_path, small_set, demo, cache_dir):
    res = _run(tmp_path, small_set, demo, cache_dir, "ema", epochs=3, ema_decay=0.9)
    best = torch.load(res.run_dir / "checkpoints" / "best.pt", weights_only=False)
    ema = {k[len("module."):]: v for k, v in best["ema"].items() if k.startswith("module.")}
    exported = torch.load(res.bundle_dir / "model.pt", weights_only=True)
    key = next(k for k in exported if k.startswith("head.") and k.endswith("weight"))
    assert torch.equal(exported[key], ema[key])
    assert not torch.allclose(best["model"][key], ema[key])  # the average is not the raw weights
    # the bundle alone reproduces the run's validation metrics (so they were computed with the EMA weights)
    bundle = load_bundle(res.bundle_dir)
    val = load_samples(str(small_set / "val.csv"), bundle.taxonomy)
    probs = bundle.label_probs(val, cache_dir=cache_dir, progress=False)
    err = float((bundle.taxonomy.label_ids[probs.argmax(1)] != val.nodes()).mean())
    assert err == pytest.approx(res.metrics["top1_error"], abs=1e-6)
    assert json.loads((res.run_dir / "metrics.json").read_text())["top1_error"] == pytest.approx(
        res.metrics["top1_error"])
    assert bundle.meta["val_metrics"]["top1_error"] == pytest.approx(res.metrics["top1_error"])


def test_early_stopping_stops_and_stays_stopped(tmp_path, small_set, demo, cache_dir):
    # a learning rate so small that validation cannot improve after the first epoch
    over = ["train.lr=1e-9", "train.warmup_epochs=0"]
    res = _run(tmp_path, small_set, demo, cache_dir, "es", over, epochs=10, early_stopping=2)
    hist = _history(res)
    assert list(hist["epoch"]) == [1, 2, 3]
    assert res.stopped_early and res.epochs_run == 3
    assert hist["stopped_early"].iloc[-1] == 1
    again = _run(tmp_path, small_set, demo, cache_dir, "es", over, epochs=10, early_stopping=2)
    assert again.epochs_run == 0 and again.stopped_early
    assert list(_history(again)["epoch"]) == [1, 2, 3]


def test_attribute_heads_train_and_are_scored(tmp_path, shaped_set, demo, cache_dir):
    over = ["model.attributes=[shape]"]
    res = _run(tmp_path, shaped_set, demo, cache_dir, "attr", over, epochs=4)
    hist = _history(res)
    assert "train/loss_attr/shape" in hist.columns
    assert hist["train/loss_attr/shape"].iloc[-1] < hist["train/loss_attr/shape"].iloc[0]
    acc = res.metrics["attr/shape/top1"]
    val = pd.read_csv(shaped_set / "val.csv")
    majority = val["attr_shape"].value_counts(normalize=True).max()
    assert acc >= majority - 0.05  # at least about the majority class, on 121 real images
    bundle = json.loads((res.bundle_dir / "bundle.json").read_text())
    assert bundle["attributes"] == {"shape": ["square", "tall", "wide"]}
    assert load_bundle(res.bundle_dir).model.attributes is not None
    # predict writes the attribute's class and score beside the taxon
    out = tmp_path / "p.csv"
    from taxonomist.cli.main import main as cli

    assert cli(["predict", str(res.bundle_dir), str(shaped_set / "val.csv"), "-o", str(out), "--no-progress",
                "--cache-dir", str(cache_dir)]) == 0
    pred = pd.read_csv(out)
    assert set(pred["attr_shape"]) <= {"square", "tall", "wide"}
    assert pred["attr_shape_score"].between(1 / 3, 1).all()
    agree = (pred["attr_shape"].to_numpy() == val["attr_shape"].to_numpy()).mean()
    assert agree == pytest.approx(acc, abs=1e-9)  # the same model as the run's validation
    with pytest.raises(Exception, match="attr_colour"):
        _run(tmp_path, shaped_set, demo, cache_dir, "attr_bad", ["model.attributes=[colour]"])


def test_metadata_fusion_with_masking_and_ablation(tmp_path, shaped_set, demo, cache_dir):
    over = ["data.metadata={columns: [area], mask_prob: 0.3}"]
    res = _run(tmp_path, shaped_set, demo, cache_dir, "meta", over, epochs=4)
    m = res.metrics
    assert "no_metadata/top1_error" in m and 0 <= m["no_metadata/top1_error"] <= 1
    bundle = load_bundle(res.bundle_dir)
    assert bundle.meta["metadata"]["fusion"]["mode"] == "concat"
    assert bundle.model.metadata is not None
    with_meta = load_samples(str(shaped_set / "val.csv"), bundle.taxonomy)
    p_meta = bundle.label_probs(with_meta, cache_dir=cache_dir, progress=False)
    no_cols = pd.read_csv(shaped_set / "val.csv").drop(columns=["meta_area"])
    no_cols.to_csv(tmp_path / "val_nometa.csv", index=False)
    bare = load_samples(str(tmp_path / "val_nometa.csv"), bundle.taxonomy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p_none = bundle.label_probs(bare, cache_dir=cache_dir, progress=False)
    assert any("without metadata" in str(w.message) for w in caught)
    assert p_meta.shape == p_none.shape
    assert not np.allclose(p_meta, p_none)  # the metadata changes the prediction
    tax = bundle.taxonomy
    for probs, key in ((p_meta, "top1_error"), (p_none, "no_metadata/top1_error")):
        err = float((tax.label_ids[probs.argmax(1)] != bare.nodes()).mean())
        assert err == pytest.approx(m[key], abs=1e-6), key


def test_feature_mixup_trains_and_bad_combinations_are_errors(tmp_path, small_set, demo, cache_dir):
    res = _run(tmp_path, small_set, demo, cache_dir, "mix", ["train.mixup={mixup_alpha: 0.4, group_rank: 3}"],
               epochs=2)
    assert np.isfinite(_history(res)["train/loss"]).all()
    with pytest.raises(ConfigError, match="cutmix"):
        _run(tmp_path, small_set, demo, cache_dir, "mix_bad", ["train.mixup={cutmix_alpha: 1.0, mixup_alpha: 0}"])
    with pytest.raises(ConfigError, match="trainable backbone"):
        _run(tmp_path, small_set, demo, cache_dir, "aug_bad", ["train.augment=standard"])


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, demo) -> Path:
    """12 train / 4 val real images of two classes, for runs that fine-tune the backbone."""
    rows = []
    for cls in ("copepod_calanoid", "diatom_chain_string"):
        for split, sl in (("train", slice(0, 12)), ("val", slice(12, 16))):
            for img in sorted((demo / "train" / cls).glob("*.jpg"))[sl]:
                rows.append({"path": str(img), "label": cls, "split": split})
    df = pd.DataFrame(rows)
    out = tmp_path_factory.mktemp("two")
    for split in ("train", "val"):
        df[df.split == split].drop(columns="split").to_csv(out / f"{split}.csv", index=False)
    return out


@pytest.mark.slow
def test_trainable_backbone_with_randaugment_and_cutmix(tmp_path, two_classes, demo, cache_dir):
    """A fine-tuned backbone with a named augmentation preset and image cutmix."""
    over = ["model.backbone.trainable=true", "train.augment={name: randaugment, erasing: 0.25}",
            "train.mixup={mixup_alpha: 0.2, cutmix_alpha: 1.0, cutmix_prob: 1.0}"]
    res = _run(tmp_path, two_classes, demo, cache_dir, "ft", over, epochs=1, batch_size=8)
    assert np.isfinite(_history(res)["train/loss"]).all()
    assert res.metrics["n_samples"] == 8


@pytest.mark.slow
def test_lora_run_exports_a_bundle_that_loads_without_peft(tmp_path, two_classes, demo, cache_dir, monkeypatch):
    pytest.importorskip("peft")
    over = ["model.backbone.lora={r: 4, alpha: 8}", "train.auto_batch_size=true"]
    res = _run(tmp_path, two_classes, demo, cache_dir, "lora", over, epochs=2, batch_size=8)
    best = torch.load(res.run_dir / "checkpoints" / "best.pt", weights_only=False)
    lora_keys = [k for k in best["model"] if "lora_" in k]
    assert lora_keys  # the adapters were trained and checkpointed
    assert json.loads((res.run_dir / "batch_size.json").read_text())["batch_size"] == 8  # CPU: no probing
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("peft blocked for this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    bundle = load_bundle(res.bundle_dir)
    assert not any("lora_" in k for k in bundle.model.state_dict())  # merged into plain weights
    assert bundle.meta["backbone"]["lora"]["r"] == 4
    val = load_samples(str(two_classes / "val.csv"), bundle.taxonomy)
    probs = bundle.label_probs(val, cache_dir=cache_dir, progress=False)
    err = float((bundle.taxonomy.label_ids[probs.argmax(1)] != val.nodes()).mean())
    assert err == pytest.approx(res.metrics["top1_error"], abs=1e-6)


def test_resume_repeats_an_uninterrupted_run_with_all_the_new_state(tmp_path, shaped_set, demo, cache_dir):
    """GradNorm weights, EMA, mixup draws, metadata masking, attribute heads and the early-stopping
    state all come back from a checkpoint: resuming after epoch 2 gives the same epochs 3 and 4."""
    import shutil

    over = ["model.head.name=per_rank", "loss.name=per_rank_ce", "model.attributes=[shape]",
            "loss.weighting=gradnorm", "data.metadata={columns: [area], mask_prob: 0.3}",
            "train.mixup={mixup_alpha: 0.4}", "train.ema_decay=0.8", "train.early_stopping=10",
            "train.early_stopping_delta=0.001", "checkpoint.keep=4"]
    full = _run(tmp_path, shaped_set, demo, cache_dir, "resume", over, epochs=4)
    before = _history(full)
    ck = full.run_dir / "checkpoints"
    shutil.copy(ck / "epoch_0002.pt", ck / "last.pt")
    again = _run(tmp_path, shaped_set, demo, cache_dir, "resume", over, epochs=4)
    assert again.resumed_from == 2 and again.epochs_run == 2
    after = _history(again)
    cols = [c for c in before.columns if c != "time_s" and pd.api.types.is_numeric_dtype(before[c])]
    assert any(c.startswith("weight/") for c in cols) and "val/attr/shape/top1" in cols
    np.testing.assert_allclose(after[cols].to_numpy(float), before[cols].to_numpy(float), rtol=1e-5)
    for key in ("top1_error", "no_metadata/top1_error", "attr/shape/top1"):
        assert again.metrics[key] == pytest.approx(full.metrics[key], abs=1e-9), key


def test_early_stopping_state_survives_a_resume():
    from taxonomist.train.dynamics import EarlyStopping

    values = [1.0, 0.95, 0.94, 0.935, 0.93, 0.925, 0.92]
    run = EarlyStopping(3, delta=0.02)
    stops = [run.step(e, v) for e, v in enumerate(values, 1)]
    assert stops.index(True) + 1 == 5  # best 0.95 at epoch 2; no gain above 0.02 for 3 epochs
    first = EarlyStopping(3, delta=0.02)
    for e, v in enumerate(values[:4], 1):
        first.step(e, v)
    resumed = EarlyStopping(3, delta=0.02, **first.state_dict())
    assert resumed.step(5, values[4]) is True
