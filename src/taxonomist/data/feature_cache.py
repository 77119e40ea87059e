"""On-disk cache of frozen-backbone features: compute once, reuse for every epoch and run.

Key
---
A feature depends on the backbone (``model_key``, given by the caller: e.g. its
name plus a hash of its weights), the preprocessing (``Preprocess.cache_token()``)
and the image: its absolute path, file size, modification time (ns) and crop
box. Change any of them and the affected features are computed again.

Layout
------
``cache_dir/<model-slug>-<hash(model_key, preprocess)>/``
    ``info.json``        the model key and preprocessing, for humans
    ``<chunk hash>.npy`` float32 ``[n, D]`` features of one chunk of images

Images are sorted by (path, box) and cut into chunks of about ``chunk_size``
images at *content-defined* boundaries: an image ends a chunk when a hash of its
(path, box) is 0 modulo ``chunk_size`` (or the chunk reached ``4 * chunk_size``).
A chunk file is named by the hash of the model key, the preprocessing and the
full keys of its images. So the cache does not depend on row order, adding or
removing an image re-computes only the chunk(s) around it, touching an image
re-computes only its chunk, and every chunk is written atomically (temp file +
``os.replace``) as soon as it is done: a killed extraction resumes where it
stopped. A second call with the same inputs only reads files.

Several processes (DDP ranks) fill one cache together with
:func:`fill_feature_cache`: chunk ``j`` of the plan belongs to part
``j % n_parts``, each process computes the missing chunks of its own part (no
file is written by two parts), and after a barrier every process reads the whole
cache with :func:`extract_features` (which computes anything still missing
itself, so a chunk that did not appear is never silently absent).

Clearing: delete ``cache_dir`` (or one model folder in it), or call
:func:`clear_feature_cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .images import ImageDataset
from .table import SampleTable, box_strings
from .transforms import Preprocess, build_transform
from .sources.packed import pack_file_of

CACHE_VERSION = "taxonomist-features-v1"
DEFAULT_CHUNK_SIZE = 512


def _digest(*parts: str, n: int = 32) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:n]


def model_folder(cache_dir: str | Path, model_key: str, preprocess: Preprocess) -> Path:
    """The folder that holds the chunks of one (model, preprocessing) pair."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)[:40].strip("_") or "model"
    return Path(cache_dir) / f"{slug}-{_digest(CACHE_VERSION, model_key, preprocess.cache_token(), n=12)}"


def image_keys(table: SampleTable) -> tuple[list[str], list[str]]:
    """(identity key ``path|box``, full key ``path|size|mtime_ns|box``) per row.

    Raises DataError naming the first file that does not exist.
    """
    paths = [str(p) for p in table.df["path"]]
    boxes = box_strings(table.boxes())
    stats: dict[str, str] = {}
    full = []
    for p, b in zip(paths, boxes):
        st = stats.get(p)
        if st is None:
            try:
                s = os.stat(pack_file_of(p))  # a packed sample: its shard file
            except OSError as exc:
                raise DataError(f"{p}: cannot compute features, the image cannot be read ({exc.strerror})") from None
            st = stats[p] = f"{s.st_size}|{s.st_mtime_ns}"
        full.append(f"{p}|{st}|{b}")
    return [f"{p}|{b}" for p, b in zip(paths, boxes)], full


def _boundary_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def plan_chunks(identity: list[str], chunk_size: int) -> list[np.ndarray]:
    """Content-defined chunks over the items sorted by identity; each chunk is an array of item positions."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    order = sorted(range(len(identity)), key=identity.__getitem__)
    chunks: list[np.ndarray] = []
    start = 0
    for pos, item in enumerate(order):
        if _boundary_hash(identity[item]) % chunk_size == 0 or pos + 1 - start >= 4 * chunk_size \
                or pos + 1 == len(order):
            chunks.append(np.array(order[start:pos + 1], dtype=np.int64))
            start = pos + 1
    return chunks


@dataclass
class CacheStats:
    """What the last :func:`extract_features` call did (for logs and tests)."""

    n_images: int = 0
    n_chunks: int = 0
    chunks_read: int = 0
    chunks_computed: int = 0
    images_computed: int = 0
    folder: Path | None = None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_chunk(path: Path, n_rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 2 or arr.shape[0] != n_rows or arr.dtype != np.float32:
        return None
    return arr


@dataclass
class _Plan:
    """Where the features of a table live: unique images, their chunks and chunk files."""

    inverse: np.ndarray          # row -> unique image
    first_row: np.ndarray        # unique image -> its first row in the table
    chunks: list[np.ndarray]     # chunk -> positions of its unique images
    files: list[Path]            # chunk -> file
    folder: Path


def _plan(model_key: str, table: SampleTable, preprocess: Preprocess, cache_dir: str | Path,
          chunk_size: int) -> _Plan:
    if not model_key:
        raise ValueError("model_key must be a non-empty string that changes whenever the model changes")
    identity, full = image_keys(table)
    uniq_index: dict[str, int] = {}
    inverse = np.fromiter((uniq_index.setdefault(k, len(uniq_index)) for k in full), dtype=np.int64,
                          count=len(full))
    first_row = np.unique(inverse, return_index=True)[1]  # codes are numbered in order of first appearance
    u_identity = [identity[r] for r in first_row]
    u_full = [full[r] for r in first_row]
    folder = model_folder(cache_dir, model_key, preprocess)
    chunks = plan_chunks(u_identity, chunk_size) if u_full else []
    header = _digest(CACHE_VERSION, model_key, preprocess.cache_token(), n=64)
    files = [folder / f"{_digest(header, *(u_full[i] for i in c))}.npy" for c in chunks]
    return _Plan(inverse, first_row, chunks, files, folder)


def _write_info(plan: _Plan, model_key: str, preprocess: Preprocess) -> None:
    plan.folder.mkdir(parents=True, exist_ok=True)
    info = plan.folder / "info.json"
    if not info.exists():
        from ..utils.io import atomic_write_json

        atomic_write_json(info, {"version": CACHE_VERSION, "model_key": model_key,
                                 "preprocess": preprocess.to_json()})


def chunk_owner(chunk: int, n_parts: int) -> int:
    """The part (rank) that computes chunk number ``chunk`` in :func:`fill_feature_cache`."""
    return chunk % n_parts


@torch.no_grad()
def fill_feature_cache(model: torch.nn.Module, model_key: str, table: SampleTable, preprocess: Preprocess,
                       cache_dir: str | Path, part: int = 0, n_parts: int = 1, batch_size: int = 64,
                       num_workers: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, stats: CacheStats | None = None) -> CacheStats:
    """Compute the missing chunks that belong to ``part`` of ``n_parts`` (several processes filling
    one cache together: each calls this with its own part, waits for the others, then reads
    everything with :func:`extract_features`).

    Chunk ``j`` (in the order of the content-defined plan, the same in every process) belongs to
    part ``j % n_parts``, so no two parts ever write the same file; the chunks interleave, so a
    cache that an interrupted run filled from the start is still split evenly. Only part 0 writes
    ``info.json``. Returns the :class:`CacheStats` (chunks computed by this part).
    """
    if not 0 <= part < n_parts:
        raise ValueError(f"part must be in [0, {n_parts}), got {part}")
    plan = _plan(model_key, table, preprocess, cache_dir, chunk_size)
    stats = stats if stats is not None else CacheStats()
    stats.n_images, stats.folder, stats.n_chunks = len(plan.first_row), plan.folder, len(plan.chunks)
    if not plan.chunks:
        return stats
    if part == 0:
        _write_info(plan, model_key, preprocess)
    else:
        plan.folder.mkdir(parents=True, exist_ok=True)
    mine = [j for j in range(len(plan.chunks)) if chunk_owner(j, n_parts) == part]
    results: list[np.ndarray | None] = [None] * len(plan.chunks)
    for j in mine:
        results[j] = _read_chunk(plan.files[j], len(plan.chunks[j]))
    todo = [j for j in mine if results[j] is None]
    stats.chunks_read = len(mine) - len(todo)
    if todo:
        _compute(model, table, plan.first_row, plan.chunks, todo, plan.files, results, batch_size, num_workers,
                 torch.device(device), preprocess, progress, stats)
    return stats


@torch.no_grad()
def extract_features(model: torch.nn.Module, model_key: str, table: SampleTable, preprocess: Preprocess,
                     cache_dir: str | Path, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, stats: CacheStats | None = None) -> np.ndarray:
    """Features ``[N, D]`` (float32) of every row of ``table``, through the on-disk cache.

    ``model(images)`` must return ``[B, D]`` features; it is put in eval mode
    (its previous mode is restored) and moved to ``device``. Rows with the same
    image and box share one computation. An empty table gives a ``[0, 0]`` array.
    ``stats``: a :class:`CacheStats` to fill in (chunks read / computed).
    """
    plan = _plan(model_key, table, preprocess, cache_dir, chunk_size)
    chunks, files, folder = plan.chunks, plan.files, plan.folder
    stats = stats if stats is not None else CacheStats()
    stats.n_images, stats.folder = len(plan.first_row), folder
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    _write_info(plan, model_key, preprocess)
    stats.n_chunks = len(chunks)
    results: list[np.ndarray | None] = [_read_chunk(f, len(c)) for f, c in zip(files, chunks)]
    todo = [j for j, r in enumerate(results) if r is None]
    stats.chunks_read = len(chunks) - len(todo)
    if todo:
        _compute(model, table, plan.first_row, chunks, todo, files, results, batch_size, num_workers,
                 torch.device(device), preprocess, progress, stats)
    dims = {r.shape[1] for r in results if r is not None}
    if len(dims) != 1:
        raise DataError(f"feature cache {folder} holds features of different widths {sorted(dims)}: the same "
                        "model_key was used for different models. Delete that folder and give each model its own key.")
    feats = np.empty((len(plan.first_row), dims.pop()), dtype=np.float32)
    for c, r in zip(chunks, results):
        feats[c] = r
    return feats[plan.inverse]


def _compute(model: torch.nn.Module, table: SampleTable, first_row: np.ndarray, chunks: list[np.ndarray],
             todo: list[int], files: list[Path], results: list[np.ndarray | None], batch_size: int,
             num_workers: int, device: torch.device, preprocess: Preprocess, progress: bool,
             stats: CacheStats) -> None:
    """Run the model over the images of the missing chunks, saving each chunk as soon as it is complete."""
    from tqdm.auto import tqdm

    items = np.concatenate([chunks[j] for j in todo])
    sub = table.select(first_row[items])
    loader = torch.utils.data.DataLoader(ImageDataset(sub, build_transform(preprocess, train=False)),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    model.to(device)
    pending: list[np.ndarray] = []
    n_pending = 0
    queue = list(todo)
    bar = tqdm(total=len(items), desc="features", unit="img", disable=not progress, leave=False)
    try:
        for images, _, _ in loader:
            out = model(images.to(device, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"extract_features: the model returned {shape} for a batch of "
                                 f"{images.shape[0]} images; it must return [batch, features]")
            pending.append(out.float().cpu().numpy())
            n_pending += out.shape[0]
            bar.update(images.shape[0])
            while queue and n_pending >= len(chunks[queue[0]]):
                j = queue.pop(0)
                block = np.concatenate(pending)
                need = len(chunks[j])
                results[j] = np.ascontiguousarray(block[:need], dtype=np.float32)
                _save_atomic(files[j], results[j])
                stats.chunks_computed += 1
                stats.images_computed += need
                pending = [block[need:]] if need < len(block) else []
                n_pending -= need
    finally:
        bar.close()
        model.train(was_training)


def clear_feature_cache(cache_dir: str | Path, model_key: str | None = None,
                        preprocess: Preprocess | None = None) -> int:
    """Delete cached features: all of ``cache_dir``, or one (model_key, preprocess) folder. Returns bytes freed."""
    cache_dir = Path(cache_dir)
    if model_key is not None:
        if preprocess is None:
            raise ValueError("clear_feature_cache: give preprocess together with model_key")
        targets = [model_folder(cache_dir, model_key, preprocess)]
    else:
        targets = [p for p in cache_dir.iterdir() if p.is_dir() and (p / "info.json").exists()] \
            if cache_dir.is_dir() else []
    freed = 0
    for t in targets:
        if t.is_dir():
            freed += sum(f.stat().st_size for f in t.rglob("*") if f.is_file())
            shutil.rmtree(t)
    return freed


def cache_info(cache_dir: str | Path) -> list[dict[str, object]]:
    """One entry per model folder: model key, preprocessing, number of chunk files, bytes."""
    cache_dir = Path(cache_dir)
    out: list[dict[str, object]] = []
    if not cache_dir.is_dir():
        return out
    for p in sorted(cache_dir.iterdir()):
        info = p / "info.json"
        if p.is_dir() and info.exists():
            meta = json.loads(info.read_text())
            chunks = list(p.glob("*.npy"))
            out.append({"folder": str(p), "model_key": meta.get("model_key"), "preprocess": meta.get("preprocess"),
                        "n_chunks": len(chunks), "bytes": sum(c.stat().st_size for c in chunks)})
    return out
