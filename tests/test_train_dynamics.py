"""The training loop's options on real plankton images: gradient accumulation, task weighting
(GradNorm, uncertainty), EMA, early stopping, attribute heads, metadata fusion, mixup/cutmix,
augmentation presets, gradient clipping and mixed precision (bf16/fp16 on CPU, the fp16 scaler
in checkpoints).

Attributes and metadata come from the images themselves (aspect ratio, pixel area, the
specimen's orientation), real per-sample properties that the NDSB tables do not carry as columns.
Mixup, clipping and autocast are observed through spies on the functions the loop calls
(TaxonMixup.__call__, clip_grad_norm_, the model's forward), not only through a finite loss.
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


def _run(tmp_path, small_set, demo, cache_dir, name, overrides=(), log=None, **train_opts):
    path = write_small_config(tmp_path, small_set, demo, cache_dir, name, **train_opts)
    cfg = load_config(path, list(overrides))
    return train(cfg, log=log or (lambda _m: None))


def _history(result) -> pd.DataFrame:
    return pd.read_csv(result.run_dir / "metrics.csv")


def orientation_deg(path) -> float:
    """Orientation of the specimen's long axis in degrees, 0..180 (180 = 0: an axis, not a direction),
    from the second moments of the image's darkness (plankton: dark specimen on white)."""
    g = 255.0 - np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    ys, xs = np.mgrid[:g.shape[0], :g.shape[1]]
    m = g.sum()
    cx, cy = (g * xs).sum() / m, (g * ys).sum() / m
    mu20, mu02 = (g * (xs - cx) ** 2).sum() / m, (g * (ys - cy) ** 2).sum() / m
    mu11 = (g * (xs - cx) * (ys - cy)).sum() / m
    return float(np.degrees(0.5 * np.arctan2(2 * mu11, mu20 - mu02)) % 180.0)


@pytest.fixture(scope="module")
def shaped_set(tmp_path_factory, small_set) -> Path:
    """small_set plus attr_shape (wide/tall/square from the image's aspect ratio), meta_area
    (pixel count; every 7th training row left empty = missing) and meta_angle (the specimen's
    orientation in degrees, a cyclic value of period 180)."""
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
        df["meta_angle"] = [orientation_deg(p) for p in df["path"]]
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
    """A plain name (kind inferred) and a mapping (cyclic, period 180) through the config: the log says which
    kind each field got, the bundle stores the resolved fields, and prediction encodes with them."""
    over = ["data.metadata={columns: [area, {name: angle, kind: cyclic, period: 180}], mask_prob: 0.3}"]
    lines: list[str] = []
    res = _run(tmp_path, shaped_set, demo, cache_dir, "meta", over, log=lines.append, epochs=4)
    assert any("metadata field 'area': numeric, column area (inferred: not a lat/lon, date, time or month name)"
               in line for line in lines), lines
    assert any("metadata field 'angle': cyclic (period 180), column angle (given)" in line for line in lines)
    m = res.metrics
    assert "no_metadata/top1_error" in m and 0 <= m["no_metadata/top1_error"] <= 1
    stored = json.loads((res.bundle_dir / "bundle.json").read_text())["metadata"]["encoder"]["fields"]
    assert [(f["name"], f["kind"], f["columns"], f["period"]) for f in stored] == [
        ("area", "numeric", ["area"], 0.0), ("angle", "cyclic", ["angle"], 180.0)]
    train_area = pd.read_csv(shaped_set / "train.csv")["meta_area"].dropna().to_numpy()
    assert stored[0]["mean"] == pytest.approx(train_area.mean()) and stored[0]["std"] == pytest.approx(train_area.std())
    bundle = load_bundle(res.bundle_dir)
    assert bundle.meta["metadata"]["fusion"]["mode"] == "concat"
    assert bundle.meta["metadata"]["fusion"]["component_index"] == [0, 1, 1]  # 1 numeric + sin, cos
    assert bundle.model.metadata is not None
    with_meta = load_samples(str(shaped_set / "val.csv"), bundle.taxonomy)
    # what predict feeds the model: the stored encoding (the angle as sin/cos of 2 pi angle / 180)
    values, mask = bundle.encode_metadata(with_meta)
    angle = pd.read_csv(shaped_set / "val.csv")["meta_angle"].to_numpy()
    np.testing.assert_allclose(values[:, 1].numpy(), np.sin(2 * np.pi * angle / 180), atol=1e-6)
    np.testing.assert_allclose(values[:, 2].numpy(), np.cos(2 * np.pi * angle / 180), atol=1e-6)
    assert (mask.numpy() == 1).all()
    p_meta = bundle.label_probs(with_meta, cache_dir=cache_dir, progress=False)
    no_cols = pd.read_csv(shaped_set / "val.csv").drop(columns=["meta_area", "meta_angle"])
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


class MixupSpy:
    """Wraps TaxonMixup.__call__ to keep every batch the training loop mixed: (inputs, targets, MixedBatch)."""

    def __init__(self, monkeypatch):
        from taxonomist.data import mixup

        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []
        self.taxonomy = None
        real = mixup.TaxonMixup.__call__

        def spy(mix, inputs, targets, step=0):
            out = real(mix, inputs, targets, step)
            self.taxonomy = mix.taxonomy
            self.calls.append((inputs.detach().clone(), targets.detach().clone(), out))
            return out

        monkeypatch.setattr(mixup.TaxonMixup, "__call__", spy)

    @property
    def n_mixed(self) -> int:
        return sum(int(out.mixed.sum()) for _, _, out in self.calls)


def _lineage(demo) -> dict[str, list[str]]:
    """Class name -> its path in the demo's class_paths.tsv (root first), read straight from the file."""
    df = pd.read_csv(demo / "class_paths.tsv", sep="\t")
    return {c: [p.strip() for p in path.split(">")] for c, path in zip(df["class"], df["path"])}


def test_feature_mixup_mixes_pairs_that_share_the_group_taxon(tmp_path, small_set, demo, cache_dir, monkeypatch):
    """Mixup with group_rank 3 on cached features: pairs share their depth-3 taxon of the real plankton tree
    (checked against class_paths.tsv), the features the model gets are the mixtures, and the training differs
    from the same run without mixing (prob 0, which must equal no mixup at all)."""
    from taxonomist.data.mixup import HierarchyConsistencyWarning

    spy = MixupSpy(monkeypatch)
    with pytest.warns(HierarchyConsistencyWarning, match=r"lam \* loss\(own label\) \+ \(1 - lam\) \* loss"):
        mixed = _run(tmp_path, small_set, demo, cache_dir, "mix", ["train.mixup={mixup_alpha: 0.4, group_rank: 3}"],
                     epochs=2)
    assert spy.calls and all(out.mode == "mixup" for _, _, out in spy.calls)  # prob defaults to 1
    n_train = len(pd.read_csv(small_set / "train.csv"))
    assert sum(len(t) for _, t, _ in spy.calls) == 2 * n_train  # every sample of both epochs met the mixer
    print(f"mixed {spy.n_mixed} of {2 * n_train}")
    assert spy.n_mixed > 100, spy.n_mixed
    lineage, tax = _lineage(demo), spy.taxonomy
    n_pairs_differ = 0
    for x, t, out in spy.calls:
        m, perm, lam = out.mixed.numpy(), out.perm.numpy(), out.lam
        names = [tax.names[int(v)] for v in t]
        for i in np.flatnonzero(m):
            a, b = lineage[names[i]], lineage[names[perm[i]]]
            assert len(a) >= 3 and a[:3] == b[:3], (a, b)  # same taxon at depth 3 (PLANKTON > X > Y)
            n_pairs_differ += a != b
        for i in np.flatnonzero(~m):  # samples left alone: singletons of their group, or labelled above depth 3
            group = lineage[names[i]][:3]
            assert len(lineage[names[i]]) < 3 or sum(lineage[n][:3] == group for n in names) == 1
        torch.testing.assert_close(out.inputs[m], lam * x[m] + (1 - lam) * x[perm[m]])
        assert torch.equal(out.inputs[~m], x[~m])
        assert torch.equal(out.targets_a, t) and torch.equal(out.targets_b, t[perm])
    assert n_pairs_differ > 0  # group_rank 3 is coarser than most labels: some pairs have two labels

    spy.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HierarchyConsistencyWarning)  # checked above
        never = _run(tmp_path, small_set, demo, cache_dir, "mix_p0",
                     ["train.mixup={mixup_alpha: 0.4, group_rank: 3, prob: 0.0}"], epochs=2)
    assert spy.calls and spy.n_mixed == 0
    plain = _run(tmp_path, small_set, demo, cache_dir, "mix_off", epochs=2)
    h_mix, h_never, h_plain = _history(mixed), _history(never), _history(plain)
    np.testing.assert_allclose(h_never["train/loss"], h_plain["train/loss"], rtol=1e-6)
    assert np.abs(h_mix["train/loss"].to_numpy() - h_plain["train/loss"].to_numpy()).min() > 1e-3
    assert np.isfinite(h_mix["train/loss"]).all()


def test_bad_mixup_and_augment_combinations_are_errors(tmp_path, small_set, demo, cache_dir):
    with pytest.raises(ConfigError, match="cutmix"):
        _run(tmp_path, small_set, demo, cache_dir, "mix_bad", ["train.mixup={cutmix_alpha: 1.0, mixup_alpha: 0}"])
    with pytest.raises(ConfigError, match="trainable backbone"):
        _run(tmp_path, small_set, demo, cache_dir, "aug_bad", ["train.augment=standard"])


def test_grad_clip_clips_the_norm_of_every_step(tmp_path, small_set, demo, cache_dir, monkeypatch):
    """train.grad_clip: every optimiser step's gradient norm is cut to the limit (measured after the
    clip), which changes training; a limit above every norm leaves the run as it is without one."""
    clips: list[tuple[float, float, float]] = []  # (norm before, norm after, max_norm) per optimiser step
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        params = [p for p in parameters if p.grad is not None]
        before = real(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        clips.append((float(before), float(after), float(max_norm)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    over = ["train.optimizer=sgd", "train.lr=0.05"]  # SGD: the update is proportional to the clipped gradient
    plain = _run(tmp_path, small_set, demo, cache_dir, "clip_off", over, epochs=2)
    assert clips == []
    tight = _run(tmp_path, small_set, demo, cache_dir, "clip_tight", over, epochs=2, grad_clip=0.05)
    steps = len(clips)
    assert steps > 0 and steps % 2 == 0  # once per optimiser step, the same number in both epochs
    assert all(before > 0.05 and after == pytest.approx(0.05, rel=1e-4) and mx == 0.05 for before, after, mx in clips)
    clips.clear()
    loose = _run(tmp_path, small_set, demo, cache_dir, "clip_loose", over, epochs=2, grad_clip=1e6)
    assert len(clips) == steps and all(after == pytest.approx(before, rel=1e-6) for before, after, _ in clips)
    h_plain, h_tight, h_loose = _history(plain), _history(tight), _history(loose)
    np.testing.assert_allclose(h_loose["train/loss"], h_plain["train/loss"], rtol=1e-6)
    assert np.abs(h_tight["train/loss"].to_numpy() - h_plain["train/loss"].to_numpy()).max() > 1e-2
    assert h_tight["train/loss"].iloc[-1] > h_plain["train/loss"].iloc[-1]  # smaller steps: slower descent


def _record_output_dtypes(monkeypatch) -> list[set]:
    """Dtypes of the model's outputs in each training forward pass (grad enabled)."""
    from taxonomist.models.model import TaxonomistModel

    seen: list[set] = []
    real = TaxonomistModel.forward

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            seen.append({v.dtype for v in out.values() if isinstance(v, torch.Tensor)})
        return out

    monkeypatch.setattr(TaxonomistModel, "forward", spy)
    return seen


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_autocasts_on_cpu(tmp_path, small_set, demo, cache_dir, monkeypatch, amp, dtype):
    seen = _record_output_dtypes(monkeypatch)
    res = _run(tmp_path, small_set, demo, cache_dir, f"amp_{amp}", epochs=2, amp=amp)
    assert seen and all(s == {dtype} for s in seen)  # the head ran in reduced precision
    n_steps = len(seen)
    seen.clear()
    full = _run(tmp_path, small_set, demo, cache_dir, "amp_off", epochs=2, amp="off")
    assert len(seen) == n_steps and all(s == {torch.float32} for s in seen)
    h_amp, h_full = _history(res)["train/loss"].to_numpy(), _history(full)["train/loss"].to_numpy()
    assert not np.array_equal(h_amp, h_full)  # other arithmetic ...
    np.testing.assert_allclose(h_amp, h_full, rtol=0.05)  # ... the same training
    scaler = torch.load(res.run_dir / "checkpoints" / "last.pt", weights_only=False)["scaler"]
    if amp == "bf16":
        assert scaler == {}  # bf16 needs no loss scaling: the scaler is off
    else:
        assert scaler["scale"] > 0 and scaler["growth_interval"] == 2000


def test_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path, small_set, demo, cache_dir):
    import shutil

    over = ["checkpoint.keep=3"]
    full = _run(tmp_path, small_set, demo, cache_dir, "fp16", over, epochs=3, amp="fp16")
    ck = full.run_dir / "checkpoints"
    final = torch.load(ck / "last.pt", weights_only=False)["scaler"]
    at2 = torch.load(ck / "epoch_0002.pt", weights_only=False)
    steps = final["_growth_tracker"] - at2["scaler"]["_growth_tracker"]  # optimiser steps in epoch 3
    assert steps > 0 and at2["scaler"]["_growth_tracker"] == 2 * steps  # one scaler update per step, no overflow
    assert at2["scaler"]["scale"] == final["scale"] == 65536.0  # the initial scale: no inf/NaN gradient met
    # resuming after epoch 2 gives the same epoch 3 and the same scaler state as the uninterrupted run
    shutil.copy(ck / "epoch_0002.pt", ck / "last.pt")
    again = _run(tmp_path, small_set, demo, cache_dir, "fp16", over, epochs=3, amp="fp16")
    assert again.resumed_from == 2 and again.epochs_run == 1
    assert torch.load(ck / "last.pt", weights_only=False)["scaler"] == final
    np.testing.assert_allclose(_history(again)["train/loss"], _history(full)["train/loss"], rtol=1e-6)
    # the resumed run starts from the checkpoint's scaler, not a fresh one
    at2["scaler"].update(scale=256.0, _growth_tracker=1990)
    torch.save(at2, ck / "last.pt")
    third = _run(tmp_path, small_set, demo, cache_dir, "fp16", over, epochs=3, amp="fp16")
    assert third.resumed_from == 2
    after = torch.load(ck / "last.pt", weights_only=False)["scaler"]
    # 1990 + steps clean steps: the scale doubled at 2000 (growth_interval) and the counter restarted
    assert after["scale"] == 512.0 and after["_growth_tracker"] == 1990 + steps - 2000  # (fresh: 65536, steps)


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
def test_trainable_backbone_with_randaugment_and_cutmix(tmp_path, two_classes, demo, cache_dir, monkeypatch):
    """A fine-tuned backbone with a named augmentation preset and image cutmix: every batch is cut and
    pasted between same-label pairs, and lam is the share of the image left to the sample itself."""
    spy = MixupSpy(monkeypatch)
    over = ["model.backbone.trainable=true", "train.augment={name: randaugment, erasing: 0.25}",
            "train.mixup={mixup_alpha: 0.2, cutmix_alpha: 1.0, cutmix_prob: 1.0}"]
    res = _run(tmp_path, two_classes, demo, cache_dir, "ft", over, epochs=1, batch_size=8)
    assert np.isfinite(_history(res)["train/loss"]).all()
    assert res.metrics["n_samples"] == 8
    assert len(spy.calls) == 3 and all(out.mode == "cutmix" for _, _, out in spy.calls)  # 24 images, batches of 8
    assert spy.n_mixed > 0
    pasted_pairs = 0
    for x, t, out in spy.calls:
        assert x.dim() == 4 and x.shape[1:] == (3, 64, 64)  # images, not features
        m, perm = out.mixed.numpy(), out.perm.numpy()
        assert m.any() and (t.numpy()[perm] == t.numpy()).all()  # default grouping: same label only
        for i in np.flatnonzero(m):
            changed = (out.inputs[i] != x[i]).any(dim=0)  # [H, W]: pixels that are not the sample's own
            assert torch.equal(out.inputs[i][:, changed], x[perm[i]][:, changed])  # ... are the partner's
            if changed.any():
                pasted_pairs += 1
                ys, xs = torch.nonzero(changed, as_tuple=True)
                box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)  # one rectangle
                assert int(changed.sum()) <= box <= round((1 - out.lam) * 64 * 64)
        assert torch.equal(out.inputs[~m], x[~m])
    assert pasted_pairs > 0


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
