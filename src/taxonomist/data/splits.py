"""Seeded, stratified train/val/test splitting for users with one labelled set.

Per node (class, at whatever depth it is labelled; unlabelled rows form their
own group) with ``n`` samples:

* ``n_val = floor(n * val + 0.5)`` and ``n_test = floor(n * test + 0.5)``
  (round half up), then
* at least one sample stays in train: if ``n_val + n_test > n - 1``, test gives
  samples back first, then val. A class with a single sample is train-only, and
  a class with few samples may get no val/test sample at all (e.g. with
  ``val=0.1`` a class needs 5 samples to put one in val).

Which samples go where: within each class, samples are ordered by a keyed hash
(BLAKE2b, key = the seed) of their identity ``path|box``, and the first
``n_val`` go to val, the next ``n_test`` to test. The result therefore depends
only on the seed and the set of samples, not on the row order, and adding a
sample moves at most the samples of its own class.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ConfigError
from .table import SampleTable


def _hash_keys(keys: list[str], seed: int) -> np.ndarray:
    key = int(seed).to_bytes(16, "little", signed=True)
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8, key=key).digest(), "little")
                        for k in keys), dtype=np.uint64, count=len(keys))


def split_counts(class_sizes: np.ndarray, val: float, test: float) -> tuple[np.ndarray, np.ndarray]:
    """(n_val, n_test) per class, with the rounding and at-least-one-in-train rule above."""
    n = np.asarray(class_sizes, dtype=np.int64)
    n_val = np.floor(n * val + 0.5).astype(np.int64)
    n_test = np.floor(n * test + 0.5).astype(np.int64)
    excess = np.maximum(n_val + n_test - (n - 1), 0)
    give = np.minimum(excess, n_test)
    n_test -= give
    n_val -= np.minimum(excess - give, n_val)
    return n_val, n_test


def split_samples(table: SampleTable, *, val: float = 0.1, test: float = 0.0, seed: int = 0) -> SampleTable:
    """A copy of ``table`` with every row's ``split`` set to train/val/test (see module docstring)."""
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ConfigError(f"split fractions val={val}, test={test}: each must be in [0, 1) and their sum < 1")
    n = len(table)
    if n == 0:
        return table.with_split(np.array([], dtype=object))
    nodes = table.nodes()
    h = _hash_keys(table.sample_keys(), seed)
    classes, cls_of, sizes = np.unique(nodes, return_inverse=True, return_counts=True)
    order = np.lexsort((np.arange(n), h, cls_of))  # by class, then hash (row index only breaks exact ties)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[cls_of[order]]
    n_val, n_test = split_counts(sizes, val, test)
    split = np.full(n, "train", dtype=object)
    split[rank < n_val[cls_of]] = "val"
    split[(rank >= n_val[cls_of]) & (rank < (n_val + n_test)[cls_of])] = "test"
    return table.with_split(split)
