"""Real trees and random test inputs shared by the metrics and decision tests (no tests here).

The trees come from the real files in ../shared/data through the project's own
loader (``taxonomist.taxonomy.load``), so the metrics are tested on the trees users get.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from taxonomist.taxonomy import Taxonomy, load

RANKS7 = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


@lru_cache(maxsize=None)
def plankton_tree(data: Path) -> Taxonomy:
    """NDSB plankton: unranked, uneven depth, 18 internal labels."""
    return load(data / "plankton" / "class_paths.tsv")


@lru_cache(maxsize=None)
def fathomnet_tree(data: Path) -> Taxonomy:
    """FathomNet 2025: 7 WoRMS ranks, labels at mixed ranks."""
    return load(data / "taxonomies" / "fathomnet2025_lineage.csv")


@lru_cache(maxsize=None)
def cifar_tree(data: Path) -> Taxonomy:
    """CIFAR-100: a balanced 5-level tree."""
    return load(data / "taxonomies" / "cifar100_5level.csv")


def real_trees(data: Path) -> dict[str, Taxonomy]:
    return {"plankton": plankton_tree(data), "fathomnet": fathomnet_tree(data), "cifar": cifar_tree(data)}


def random_probs(rng: np.random.Generator, n: int, n_labels: int, sharp: float = 3.0) -> np.ndarray:
    """Peaked random distributions over labels (softmax of scaled Gaussians)."""
    z = rng.normal(size=(n, n_labels)) * sharp
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def mixed_truth(rng: np.random.Generator, tax: Taxonomy, probs: np.ndarray, p_partial: float = 0.25,
                p_unknown: float = 0.05, calibrated: bool = True) -> np.ndarray:
    """Truth nodes: a label (drawn from ``probs`` when calibrated, else uniformly), sometimes
    replaced by a random strict ancestor below the root (partial label) or by -1 (unknown)."""
    n = len(probs)
    if calibrated:
        cum = probs.cumsum(axis=1)
        idx = (cum < rng.random(n)[:, None] * cum[:, -1:]).sum(axis=1)
        idx = np.minimum(idx, tax.n_labels - 1)
    else:
        idx = rng.integers(0, tax.n_labels, n)
    truth = tax.label_ids[idx].copy()
    part = rng.random(n) < p_partial
    d = tax.depth[truth]
    up = rng.integers(1, np.maximum(d, 2))  # a depth in [1, depth - 1]
    truth = np.where(part & (d > 1), tax.ancestor_at_depth(truth, up), truth)
    truth[rng.random(n) < p_unknown] = -1
    return truth
