"""The on-disk feature cache with a small real conv net on ~100 real plankton images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from taxonomist.data import (CacheStats, ImageDataset, Preprocess, SampleTable, build_transform, cache_info,
                             clear_feature_cache, extract_features, load_samples)
from taxonomist.data.feature_cache import image_keys, plan_chunks
from taxonomist.taxonomy import Taxonomy

CLASSES = ("chaetognath_sagitta", "copepod_calanoid", "amphipods", "protist_other", "trichodesmium_puff")
PRE = Preprocess(image_size=32)
CHUNK = 16


class CountingNet(nn.Module):
    """A tiny conv net returning [B, 8] features; counts forward calls; can fail after k calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.body(x)


@pytest.fixture()
def table(plankton_dir: Path, tmp_path: Path) -> SampleTable:
    root = tmp_path / "img"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for f in sorted((plankton_dir / "train" / cls).iterdir())[:20]:
            shutil.copy(f, root / cls / f.name)
    tax = Taxonomy.from_parents([-1] + [0] * len(CLASSES), ["root", *CLASSES])
    t = load_samples(root, tax)
    assert len(t) == 100
    return t


def reference_features(model: nn.Module, table: SampleTable) -> np.ndarray:
    """Straight through the model, no cache, all images in one batch (eval mode: per-image results)."""
    model.eval()
    ds = ImageDataset(table, build_transform(PRE, train=False))
    with torch.no_grad():
        return model.body(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()


def test_cache_hits_resume_and_partial_recompute(table, tmp_path):
    cache = tmp_path / "cache"
    model = CountingNet()
    model.train()
    s1 = CacheStats()
    f1 = extract_features(model, "tiny-net@v1", table, PRE, cache, batch_size=10, progress=False,
                          chunk_size=CHUNK, stats=s1)
    assert f1.shape == (100, 8) and f1.dtype == np.float32
    assert model.training  # mode restored
    assert s1.chunks_read == 0 and s1.chunks_computed == s1.n_chunks >= 3 and s1.images_computed == 100
    assert model.calls == 10
    np.testing.assert_allclose(f1, reference_features(model, table), rtol=1e-5, atol=1e-6)
    assert len(list(s1.folder.glob("*.npy"))) == s1.n_chunks

    # second call: pure cache reads, identical values
    model.calls = 0
    s2 = CacheStats()
    f2 = extract_features(model, "tiny-net@v1", table, PRE, cache, batch_size=10, progress=False,
                          chunk_size=CHUNK, stats=s2)
    assert model.calls == 0 and s2.chunks_computed == 0 and s2.chunks_read == s1.n_chunks
    np.testing.assert_array_equal(f1, f2)

    # another row order (e.g. a shuffled or re-split table): still no forward pass
    perm = np.random.default_rng(1).permutation(100)
    f3 = extract_features(model, "tiny-net@v1", table.select(perm), PRE, cache, progress=False, chunk_size=CHUNK)
    assert model.calls == 0
    np.testing.assert_array_equal(f3, f1[perm])

    # touching one image re-computes exactly its chunk
    victim = table.df["path"].iloc[37]
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    s4 = CacheStats()
    f4 = extract_features(model, "tiny-net@v1", table, PRE, cache, batch_size=10, progress=False,
                          chunk_size=CHUNK, stats=s4)
    assert s4.chunks_computed == 1 and s4.chunks_read == s1.n_chunks - 1
    assert 1 <= s4.images_computed <= 4 * CHUNK and model.calls == -(-s4.images_computed // 10)
    np.testing.assert_allclose(f4, f1, rtol=1e-5, atol=1e-6)

    # another preprocessing or model key is another cache folder: everything again
    model.calls = 0
    extract_features(model, "tiny-net@v2", table, PRE, cache, batch_size=50, progress=False, chunk_size=CHUNK)
    assert model.calls == 2
    infos = cache_info(cache)
    assert sorted(i["model_key"] for i in infos) == ["tiny-net@v1", "tiny-net@v2"]
    freed = clear_feature_cache(cache, "tiny-net@v2", PRE)
    assert freed > 0 and [i["model_key"] for i in cache_info(cache)] == ["tiny-net@v1"]


def test_killed_extraction_resumes(table, tmp_path):
    cache = tmp_path / "cache"
    # chunks are content-defined over the (tmp) paths: die only after the first chunk is complete
    first = plan_chunks(image_keys(table)[0], CHUNK)[0]
    batches = max(5, -(-len(first) // 10))
    dying = CountingNet(fail_after=batches)
    with pytest.raises(KeyboardInterrupt):
        extract_features(dying, "tiny", table, PRE, cache, batch_size=10, progress=False, chunk_size=CHUNK)
    stats = CacheStats()
    model = CountingNet()
    feats = extract_features(model, "tiny", table, PRE, cache, batch_size=10, progress=False,
                             chunk_size=CHUNK, stats=stats)
    assert stats.chunks_read >= 1 and stats.chunks_computed >= 1  # resumed, not restarted
    assert stats.images_computed <= 100 - batches * 10 + 4 * CHUNK
    assert not list(cache.rglob("*.tmp*"))  # no half-written files left behind
    np.testing.assert_allclose(feats, reference_features(model, table), rtol=1e-5, atol=1e-6)


def test_bad_model_output_and_empty_table(table, tmp_path):
    class Wrong(nn.Module):
        def forward(self, x):
            return x  # [B, 3, H, W]

    with pytest.raises(ValueError, match=r"must return \[batch, features\]"):
        extract_features(Wrong(), "wrong", table, PRE, tmp_path, progress=False)
    empty = extract_features(CountingNet(), "tiny", table.select(np.array([], dtype=np.int64)), PRE, tmp_path,
                             progress=False)
    assert empty.shape == (0, 0)


def test_content_defined_chunks_are_local():
    keys = [f"/data/img_{i:05d}.jpg|" for i in range(5000)]
    before = {tuple(np.asarray(keys)[c]) for c in plan_chunks(keys, 64)}
    sizes = [len(c) for c in before]
    assert sum(sizes) == 5000 and max(sizes) <= 4 * 64 and 40 < np.mean(sizes) < 100
    changed = keys[:2500] + ["/data/img_02500b.jpg|"] + keys[2500:]
    after = {tuple(np.asarray(changed)[c]) for c in plan_chunks(changed, 64)}
    assert len(after - before) <= 2 and len(before - after) <= 2
    shuffled = list(np.random.default_rng(0).permutation(keys))
    assert {tuple(np.asarray(shuffled)[c]) for c in plan_chunks(shuffled, 64)} == before
