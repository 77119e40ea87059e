"""Shared fixtures: paths to the real data in ../shared (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (set TAXONOMIST_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def plankton_dir() -> Path:
    return _need(DATA / "plankton")


@pytest.fixture(scope="session")
def taxonomies_dir() -> Path:
    return _need(DATA / "taxonomies")


@pytest.fixture(scope="session")
def demo():
    from taxonomist.data.demo import demo_root

    return demo_root()


@pytest.fixture(scope="session")
def small_set(tmp_path_factory, demo):
    """CSV tables of real demo images: 3 train and 1 val image per class (first in name order)."""
    out = tmp_path_factory.mktemp("small")
    for split, n in (("train", 3), ("val", 1)):
        rows = []
        for cls in sorted(p.name for p in (demo / split).iterdir() if p.is_dir()):
            for img in sorted((demo / split / cls).glob("*.jpg"))[:n]:
                rows.append({"path": str(img), "label": cls})
        pd.DataFrame(rows).to_csv(out / f"{split}.csv", index=False)
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature_cache")


def pytest_configure(config):
    """Under pytest-xdist every worker gets one torch thread: two workers x two threads on a
    2-core machine oversubscribe the CPU and make small-tensor steps ~20x slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
