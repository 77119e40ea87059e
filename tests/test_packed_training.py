"""A pack from `taxonomist pack` is a data source like a folder or a CSV: training, evaluation and
prediction read it, and with lossless storage the results equal training on the image files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from taxonomist.cli.main import main as cli
from taxonomist.data import load_samples
from taxonomist.data.sources.packed import is_pack_path, pack_file_of
from taxonomist.taxonomy import load as load_taxonomy

from test_train_e2e import write_small_config


@pytest.mark.slow
def test_training_on_a_sharded_pack_equals_training_on_files(tmp_path, small_set, demo, cache_dir):
    tree = str(demo / "class_paths.tsv")
    # raw pixels and a size limit above every image: the stored images are the decoded files
    for split, shard in (("train", "200"), ("val", "1000")):
        assert cli(["pack", str(small_set / f"{split}.csv"), str(tmp_path / f"{split}.h5"), "--taxonomy", tree,
                    "--encoding", "raw", "--image-size", "2048", "--shard-size", shard]) == 0
    assert not (tmp_path / "train.h5").exists() and len(list(tmp_path.glob("train-*-of-*.h5"))) == 2

    tax = load_taxonomy(tree)
    table = load_samples(tmp_path / "train.h5", tax)
    files = load_samples(small_set / "train.csv", tax)
    assert len(table) == len(files) == 363
    assert all(is_pack_path(p) for p in table.paths())
    assert {pack_file_of(p) for p in table.paths()} == {str(p.resolve()) for p in tmp_path.glob("train-*.h5")}
    np.testing.assert_array_equal(np.sort(table.nodes()), np.sort(files.nodes()))

    ref = write_small_config(tmp_path, small_set, demo, cache_dir, "files", epochs=3)
    assert cli(["train", str(ref)]) == 0
    packed = write_small_config(tmp_path, small_set, demo, tmp_path / "cache_packed", "packed", epochs=3)
    cfg = packed.read_text().replace(str(small_set / "train.csv"), str(tmp_path / "train.h5")) \
        .replace(str(small_set / "val.csv"), str(tmp_path / "val.h5"))
    packed.write_text(cfg)
    assert cli(["train", str(packed)]) == 0
    a = json.loads((tmp_path / "runs" / "files" / "metrics.json").read_text())
    b = json.loads((tmp_path / "runs" / "packed" / "metrics.json").read_text())
    for key in ("top1_error", "mistake_severity", "hdist@1", "n_samples"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    # the first epoch's loss is the same to float precision (identical pixels -> identical features)
    ha = pd.read_csv(tmp_path / "runs" / "files" / "metrics.csv")
    hb = pd.read_csv(tmp_path / "runs" / "packed" / "metrics.csv")
    np.testing.assert_allclose(hb["train/loss"], ha["train/loss"], rtol=1e-4)

    # evaluate and predict take the pack too
    out = tmp_path / "ev" / "metrics.json"
    assert cli(["evaluate", str(tmp_path / "runs" / "packed"), "--data", str(tmp_path / "val.h5"), "--out",
                str(out), "--cache-dir", str(tmp_path / "cache_packed"), "--no-progress", "--no-report"]) == 0
    assert json.loads(out.read_text())["top1_error"] == pytest.approx(b["top1_error"], abs=1e-6)
