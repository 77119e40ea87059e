"""End to end on real plankton images: train -> bundle -> evaluate -> predict, and kill-and-resume.

A small real subset (3 images per class from the bundled NDSB demo sample, 64 px)
keeps it fast; the frozen offline EfficientNet-Lite0 features are cached once per
test session in a shared folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from taxonomist.cli.main import main as cli

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, small: Path, demo: Path, cache: Path, name: str, **train) -> Path:
    return write_small_config(tmp, small, demo, cache, name, **train)


def write_small_config(tmp: Path, small: Path, demo: Path, cache: Path, name: str, neck: list[int] | None = None,
                       **train) -> Path:
    cfg = {
        "name": name, "output_dir": str(tmp / "runs"), "seed": 3,
        "taxonomy": {"path": str(demo / "class_paths.tsv")},
        "data": {"train": str(small / "train.csv"), "val": str(small / "val.csv")},
        "model": {"backbone": {"name": "efficientnet_lite0", "image_size": 64}, "neck": {"hidden": [64] if neck is None else neck}},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.003, "cache_dir": str(cache), "progress": False, **train},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_train_evaluate_predict(tmp_path, small_set, demo, cache_dir, capsys):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "e2e", epochs=6)
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "e2e"
    for f in ("config.yaml", "taxonomy.json", "metrics.csv", "metrics.json", "checkpoints/last.pt",
              "checkpoints/best.pt", "bundle/bundle.json", "bundle/model.pt", "bundle/taxonomy.json",
              "bundle/preprocess.json"):
        assert (run / f).exists(), f
    assert list((run / "tensorboard").glob("events.*"))
    hist = pd.read_csv(run / "metrics.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert hist["train/loss"].iloc[-1] < hist["train/loss"].iloc[0]
    metrics = json.loads((run / "metrics.json").read_text())
    # 121 classes, 3 shots each: far above chance (1/121) but no miracle
    assert metrics["n_samples"] == 121
    assert metrics["top1_error"] < 0.95
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert len(bundle["labels"]) == 121

    # evaluate: same numbers from the bundle alone (no config), written to metrics.json
    out = tmp_path / "eval" / "metrics.json"
    assert cli(["evaluate", str(run), "--data", str(small_set / "val.csv"), "--out", str(out),
                "--cache-dir", str(cache_dir), "--no-progress"]) == 0
    ev = json.loads(out.read_text())
    for key in ("top1_error", "mistake_severity", "hdist@1", "hdist@5", "mean_path_distance"):
        assert ev[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert "top1_error" in capsys.readouterr().out

    # predict: JSON rows with lineage, top-k, how; a threshold of 1.0 backs everything off to the root or a high node
    images = sorted((demo / "val" / "copepod_calanoid").glob("*.jpg"))[:2]
    pj = tmp_path / "p.json"
    assert cli(["predict", str(run), *map(str, images), "-o", str(pj), "--no-progress",
                "--cache-dir", str(cache_dir)]) == 0
    rows = json.loads(pj.read_text())
    assert len(rows) == 2
    r = rows[0]
    assert {"image", "prediction", "rank", "depth", "probability", "lineage", "top_k", "how"} <= set(r)
    assert len(r["top_k"]) == 5 and r["lineage"][-1] == r["prediction"]
    assert r["probability"] >= 0.8 or r["depth"] == 0
    p_hi = tmp_path / "p_hi.csv"
    assert cli(["predict", str(run), *map(str, images), "--threshold", "0.999999", "-o", str(p_hi),
                "--no-progress", "--cache-dir", str(cache_dir)]) == 0
    hi = pd.read_csv(p_hi)
    assert (hi["depth"] <= np.array([x["depth"] for x in rows])).all()
    assert "lineage" in hi.columns and "top1_name" in hi.columns

    # one image alone gives the same probabilities as inside a batch
    from taxonomist.bundle import load_bundle
    from taxonomist.data import load_images

    b = load_bundle(run / "bundle")
    both = b.label_probs(load_images([str(p) for p in images], b.taxonomy), cache_dir=None, progress=False)
    one = b.label_probs(load_images([str(images[1])], b.taxonomy), cache_dir=None, progress=False)
    np.testing.assert_allclose(one[0], both[1], atol=1e-5)


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, small_set, demo, cache_dir):
    """SIGKILL a real training process mid-run, run the same command again: same weights and metrics."""
    epochs = 60
    # the subprocess must use the same number of threads as this process (bitwise-equal sums)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    ref_cfg = _config(tmp_path, small_set, demo, cache_dir, "ref", epochs=epochs, batch_size=8)
    assert cli(["train", str(ref_cfg)]) == 0
    ref_run = tmp_path / "runs" / "ref"

    cfg = _config(tmp_path, small_set, demo, cache_dir, "killed", epochs=epochs, batch_size=8)
    run = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "taxonomist", "train", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline:
        if last.exists():
            try:
                ep = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
            except Exception:  # noqa: BLE001 - the atomic write means this should not happen
                pytest.fail("last.pt was readable only partially: checkpoint writes are not atomic")
            if ep >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_at = ep
                break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at is not None and killed_at < epochs, "the run finished before it could be killed"
    # resume with the very same command
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout
    a, b = _final_state(ref_run), _final_state(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ha, hb = pd.read_csv(ref_run / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    assert list(hb["epoch"]) == list(range(1, epochs + 1))
    cols = [c for c in ha.columns if c.startswith("val/") or c.startswith("train/")]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, small_set, demo, cache_dir, capsys):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "changed", epochs=1)
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "changed"
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli(["train", str(cfg), "train.lr=0.01", "model.neck.dropout=0.5", "train.progress=true"]) == 1
    err = capsys.readouterr().err
    assert "cannot be resumed" in err
    assert "train.lr: 0.003 -> 0.01" in err and "model.neck.dropout: 0.2 -> 0.5" in err
    assert "train.progress" not in err  # progress bars do not block a resume, so they are not named
    assert (run / "config.yaml").read_text() == saved  # the refused run did not overwrite the record
    # a change of progress bars alone resumes (and finds the run complete)
    assert cli(["train", str(cfg), "train.progress=true"]) == 0


def test_resume_removes_stale_temp_files_of_an_interrupted_write(tmp_path, small_set, demo, cache_dir, capsys):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "stale", epochs=1)
    assert cli(["train", str(cfg)]) == 0
    ckpt = tmp_path / "runs" / "stale" / "checkpoints"
    # what a SIGKILL inside atomic_write leaves behind (tempfile.mkstemp's name), and look-alikes to keep
    from taxonomist.utils.io import atomic_write

    class Killed(BaseException):
        pass

    def die(fh):
        fh.write(b"half a checkpoint")
        raise Killed

    with pytest.raises(Killed):
        atomic_write(ckpt / "last.pt", die)  # a clean failure removes its own temp file ...
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    stale = [ckpt / ".last.pt.k3x_9a2q.tmp", ckpt / ".epoch_0002.pt.0abcdefg.tmp"]  # ... a kill does not
    keep = [ckpt / "notes.tmp", ckpt / ".last.pt.tmp", ckpt / ".last.pt.ABCDEFGH.tmp", ckpt / "my.last.pt.abcdefgh.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x")
    capsys.readouterr()
    assert cli(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert torch.load(ckpt / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 1


# ---------------------------------------------------------------- the split column of a table
def _marked_csv(tmp: Path, demo: Path, n_classes: int = 24) -> pd.DataFrame:
    """48 real demo images of 24 classes, two per class: the first marked train, the second val."""
    rows = []
    for cls in sorted(p.name for p in (demo / "train").iterdir() if p.is_dir())[:n_classes]:
        imgs = sorted((demo / "train" / cls).glob("*.jpg"))[:2]
        rows += [{"path": str(imgs[0]), "label": cls, "split": "train"},
                 {"path": str(imgs[1]), "label": cls, "split": "val"}]
    return pd.DataFrame(rows)


def _table_config(tmp: Path, demo: Path, cache: Path, name: str, table: Path, **data) -> Path:
    cfg = {"name": name, "output_dir": str(tmp / "runs"), "seed": 3,
           "taxonomy": {"path": str(demo / "class_paths.tsv")}, "data": {"train": str(table), **data},
           "model": {"backbone": {"name": "efficientnet_lite0", "image_size": 64}, "neck": {"hidden": [64]}},
           "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "cache_dir": str(cache), "progress": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_split_column_of_the_training_table_is_used(tmp_path, demo, cache_dir, capsys):
    df = _marked_csv(tmp_path, demo)
    df.to_csv(tmp_path / "marked.csv", index=False)
    cfg = _table_config(tmp_path, demo, cache_dir, "marked", tmp_path / "marked.csv")
    assert cli(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "split as its split column says: train 24 / val 24" in out
    assert "split 48 samples" not in out  # not re-split (which would give 0 val rows at 2 per class)
    assert "data: 24 train, 24 val samples" in out
    metrics = json.loads((tmp_path / "runs" / "marked" / "metrics.json").read_text())
    assert metrics["n_samples"] == 24

    from taxonomist.train.config import load_config
    from taxonomist.train.setup import prepare_data

    data = prepare_data(load_config(cfg))
    assert sorted(data.val.df["path"]) == sorted(df.loc[df["split"] == "val", "path"])
    assert sorted(data.train.df["path"]) == sorted(df.loc[df["split"] == "train", "path"])
    assert data.test is None


def test_split_column_gaps_and_conflicts_are_errors(tmp_path, demo, cache_dir):
    from taxonomist.errors import ConfigError, DataError
    from taxonomist.train.config import load_config
    from taxonomist.train.setup import prepare_data

    df = _marked_csv(tmp_path, demo, n_classes=6)
    gaps = df.copy()
    gaps.loc[[3, 7], "split"] = ""
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    with pytest.raises(DataError) as e:
        prepare_data(load_config(_table_config(tmp_path, demo, cache_dir, "gaps", tmp_path / "gaps.csv")))
    msg = str(e.value)
    assert "empty for 2" in msg and gaps["path"][3] in msg and gaps["path"][7] in msg and "10 rows" in msg

    df.to_csv(tmp_path / "marked.csv", index=False)
    with pytest.raises(ConfigError, match="marks 6 rows split=val, and data.val is given too"):
        prepare_data(load_config(_table_config(tmp_path, demo, cache_dir, "both", tmp_path / "marked.csv",
                                               val=str(tmp_path / "marked.csv"))))
    # a test split comes along too; no split column at all: data.split splits the table as before
    tv = df.copy()
    tv.loc[tv.index % 4 == 1, "split"] = "test"
    tv.to_csv(tmp_path / "tvt.csv", index=False)
    data = prepare_data(load_config(_table_config(tmp_path, demo, cache_dir, "tvt", tmp_path / "tvt.csv")))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    df.drop(columns="split").to_csv(tmp_path / "plain.csv", index=False)
    data = prepare_data(load_config(_table_config(tmp_path, demo, cache_dir, "plain", tmp_path / "plain.csv"),
                                    ["data.split.val=0.5"]))
    assert (len(data.train), len(data.val)) == (6, 6) and any("split 12 samples" in n for n in data.notes)


# ---------------------------------------------------------------- checkpoint.best_metric / best_mode
def test_best_metric_is_checked_before_any_feature_is_computed(tmp_path, small_set, demo, capsys):
    cache = tmp_path / "fresh_cache"
    cfg = _config(tmp_path, small_set, demo, cache, "badmetric", epochs=1)
    assert cli(["train", str(cfg), "checkpoint.best_metric=top1_acc", "checkpoint.best_mode=max"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.best_metric='top1_acc' is not a validation metric" in err
    for key in ("top1_error", "hdist@1", "hf", "level1, level2", "level6", "top1, top5", "level1/top1"):
        assert key in err, key
    assert "n_samples" not in err  # counts are not offered as a metric to optimise
    assert not cache.exists() or not any(cache.rglob("*")), "features were extracted before the check"
    assert cli(["train", str(cfg), "checkpoint.best_metric=level9/top1", "checkpoint.best_mode=max"]) == 1
    assert cli(["train", str(cfg), "checkpoint.best_metric=val/top1_error"]) == 1
    assert "without the 'val/' prefix" in capsys.readouterr().err


@pytest.mark.slow
def test_best_mode_auto_picks_the_highest_level_accuracy(tmp_path, small_set, demo, cache_dir):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "auto", epochs=5, lr=0.01)
    assert cli(["train", str(cfg), "checkpoint.best_metric=level3/top1"]) == 0
    run = tmp_path / "runs" / "auto"
    assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint"]["best_mode"] == "max"
    hist = pd.read_csv(run / "metrics.csv")
    col = hist["val/level3/top1"]
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert best["epoch"] == int(hist["epoch"][col.idxmax()])  # the first epoch with the highest accuracy
    assert best["best"] == pytest.approx(col.max())
    assert col.idxmax() != col.idxmin()  # a run where min and max would choose different epochs


# ---------------------------------------------------------------- bundles of other frozen backbones
@pytest.mark.slow
@pytest.mark.parametrize("weights", ["file", "random"])
def test_frozen_timm_backbone_bundle_is_self_contained(tmp_path, small_set, demo, monkeypatch, weights):
    """A frozen timm backbone (test_resnet, no network) from a local weights file or a random init: the
    bundle carries its weights, so deleting the file or a different random draw changes nothing."""
    import taxonomist.models as models
    from taxonomist.bundle import load_bundle
    from taxonomist.data import load_samples

    name, size = "test_resnet", 32
    if weights == "file":
        wfile = tmp_path / "moved" / "resnet.pth"
        wfile.parent.mkdir()
        torch.save(models.create_backbone(name, pretrained=False, seed=5).body.state_dict(), wfile)
        pretrained: bool | str = str(wfile)
    else:
        pretrained = False
    cfg = _config(tmp_path, small_set, demo, tmp_path / "cache", f"timm_{weights}", epochs=2)
    assert cli(["train", str(cfg), f"model.backbone.name={name}", f"model.backbone.pretrained={pretrained}",
                f"model.backbone.image_size={size}"]) == 0
    bundle_dir = tmp_path / "runs" / f"timm_{weights}" / "bundle"
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["backbone"]["weights_in_bundle"] is True and meta["backbone"]["in_model_state"] is False
    val = load_samples(str(small_set / "val.csv"), load_bundle(bundle_dir).taxonomy)

    # the reference: the bundle's neck + head on the backbone training used, built independently
    ref_bundle = load_bundle(bundle_dir)
    ref_bundle.model.backbone = models.create_backbone(name, pretrained=pretrained, image_size=size)
    ref = ref_bundle.label_probs(val, cache_dir=None, progress=False)

    orig = models.create_backbone
    monkeypatch.setattr(models, "create_backbone", lambda *a, **k: orig(*a, **{**k, "seed": 11}))
    if weights == "file":
        wfile.unlink()
        wfile.parent.rmdir()
    else:  # a differently seeded backbone really gives other probabilities (so the check below has teeth)
        other = load_bundle(bundle_dir)
        other.model.backbone = orig(name, pretrained=False, image_size=size, seed=11)
        assert not np.allclose(other.label_probs(val, cache_dir=None, progress=False), ref, atol=1e-3)
    b = load_bundle(bundle_dir)
    got = b.label_probs(val, cache_dir=None, progress=False)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert b.backbone.weights_key == meta["backbone"]["weights_key"]
    # evaluate from the bundle alone reproduces the training run's validation metrics
    out = tmp_path / "eval" / "metrics.json"
    assert cli(["evaluate", str(bundle_dir), "--data", str(small_set / "val.csv"), "--out", str(out),
                "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    trained = json.loads((tmp_path / "runs" / f"timm_{weights}" / "metrics.json").read_text())
    ev = json.loads(out.read_text())
    for key in ("top1_error", "hdist@1", "mean_path_distance"):
        assert ev[key] == pytest.approx(trained[key], abs=1e-6), key


# ---------------------------------------------------------------- predict prints its input's notes
def test_predict_prints_the_load_notes_of_its_input(tmp_path, small_set, demo, cache_dir, capsys):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "notes", epochs=1)
    assert cli(["train", str(cfg)]) == 0
    folder = tmp_path / "to_predict"
    imgs = sorted((demo / "val" / "copepod_calanoid").glob("*.jpg"))[:3]
    (folder / "copepod_calanoid").mkdir(parents=True)
    (folder / "not_a_class").mkdir()
    for img in imgs[:2]:
        (folder / "copepod_calanoid" / img.name).write_bytes(img.read_bytes())
    (folder / "not_a_class" / imgs[2].name).write_bytes(imgs[2].read_bytes())
    (folder / "copepod_calanoid" / "notes.txt").write_text("field notes")
    capsys.readouterr()
    assert cli(["predict", str(tmp_path / "runs" / "notes"), str(folder), "--no-progress",
                "--cache-dir", str(cache_dir)]) == 0
    cap = capsys.readouterr()
    assert "non-image file(s) ignored" in cap.err and "notes.txt" in cap.err
    assert "not_a_class" in cap.err
    assert len([ln for ln in cap.out.splitlines() if ln.endswith(("label", "leaf")) or "backoff" in ln]) == 3
    # clean input: nothing on stderr
    assert cli(["predict", str(tmp_path / "runs" / "notes"), *map(str, imgs), "--no-progress",
                "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().err == ""
