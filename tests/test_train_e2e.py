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


def test_resume_refuses_a_changed_config(tmp_path, small_set, demo, cache_dir):
    cfg = _config(tmp_path, small_set, demo, cache_dir, "changed", epochs=1)
    assert cli(["train", str(cfg)]) == 0
    assert cli(["train", str(cfg), "train.lr=0.01"]) == 1
