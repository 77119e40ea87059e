"""Pack a SampleTable's images into HDF5 shards (layout: :mod:`.format`).

Each image is read as :func:`~taxonomist.data.images.load_rgb` reads it (crop box,
RGB conversion), scaled down so that its longer side is at most ``image_size``
(never up; aspect ratio kept; the size formula and PIL filter of
:class:`~taxonomist.data.transforms.Preprocess` with ``resize="pad"``), then stored:

* ``encoding="jpeg"``: JPEG bytes (``quality``; grayscale images as 1-channel
  JPEG). A source file that is already a JPEG and needs no crop or resize is
  stored byte for byte, so it decodes to exactly the pixels of the original.
* ``encoding="raw"``: uint8 pixels in a fixed ``[S, S, 3]`` slot per image
  (top-left; its size in ``size``), uncompressed: the fastest to read, the largest.

Packing at the training ``image_size`` with the training interpolation makes the
packed pipeline give *the same tensors* as the folder pipeline for
``resize="pad"`` (raw, and passed-through JPEGs): ``Preprocess`` then finds the
longer side already at ``S`` and only pads.

Images are decoded and encoded in a thread pool (PIL releases the GIL) and written
in order by the main thread. Every shard is written to a temporary file next to
its final name and renamed when complete (all shards only after every one is
complete), so a killed run leaves no partial pack.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from ...errors import ConfigError, DataError
from ...taxonomy import Taxonomy
from ..images import _to_rgb, crop_box_pixels
from ..report import check_on_error
from ..table import ATTR_PREFIX, META_PREFIX, SampleTable
from ..transforms import INTERPOLATIONS
from .format import ENCODINGS, FORMAT_NAME, FORMAT_VERSION, SHARD_RE, glob_escape, shard_names, taxonomy_bytes

CHUNK = 256  # images encoded per thread-pool round
BYTES_CHUNK = 1 << 16  # HDF5 chunk of the JPEG byte array (64 KiB)


@dataclass
class PackResult:
    """What :func:`pack_table` wrote: shard files, counts, failures (path, reason), bytes and seconds."""

    shards: list[Path]
    n_samples: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    n_bytes: int = 0
    seconds: float = 0.0
    n_passthrough: int = 0

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def __str__(self) -> str:
        lines = [f"packed {self.n_samples} images into {len(self.shards)} file(s), "
                 f"{self.n_bytes / 2**20:.1f} MiB in {self.seconds:.1f} s"
                 + (f" ({self.n_passthrough} original JPEG files stored as they are)" if self.n_passthrough else "")]
        lines += [f"  {p}" for p in self.shards[:5]] + (["  ..."] if len(self.shards) > 5 else [])
        if self.failures:
            lines.append(f"  {self.n_failed} unreadable image(s) left out, e.g.:")
            lines += [f"    - {p}: {why}" for p, why in self.failures[:5]]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Encoded:
    data: np.ndarray | None
    size: tuple[int, int]
    orig_size: tuple[int, int]
    passthrough: bool
    error: str = ""


def _is_gray(img: Image.Image) -> bool:
    if img.mode in ("L", "1"):
        return True
    if img.mode != "RGB":
        return False
    a = np.asarray(img)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def _encode_one(path: str, box: np.ndarray | None, size: int, encoding: str, quality: int,
                resample: int) -> _Encoded:
    """Read, crop, convert, shrink and encode one image; errors are returned, not raised."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            whole = box is None or np.isnan(box).any()
            if not whole:
                im = im.crop(crop_box_pixels(box, *im.size))  # type: ignore[arg-type]
            else:
                im.load()
            rgb = _to_rgb(im)
    except FileNotFoundError:
        return _Encoded(None, (0, 0), (0, 0), False, "file not found")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _Encoded(None, (0, 0), (0, 0), False, f"cannot read the image: {type(exc).__name__}: {exc}")
    w, h = rgb.size
    if max(w, h) > size:
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        rgb = rgb.resize((nw, nh), resample)
    nw, nh = rgb.size
    if encoding == "raw":
        slot = np.zeros((size, size, 3), dtype=np.uint8)
        slot[:nh, :nw] = np.asarray(rgb, dtype=np.uint8)
        return _Encoded(slot, (nh, nw), (h, w), False)
    if fmt == "JPEG" and whole and (nw, nh) == (w, h):
        with open(path, "rb") as fh:
            return _Encoded(np.frombuffer(fh.read(), dtype=np.uint8), (nh, nw), (h, w), True)
    buf = io.BytesIO()
    (rgb.convert("L") if _is_gray(rgb) else rgb).save(buf, format="JPEG", quality=quality)
    return _Encoded(np.frombuffer(buf.getvalue(), dtype=np.uint8), (nh, nw), (h, w), False)


def _new_shard(fh: h5py.File, encoding: str, size: int, n: int) -> h5py.Dataset:
    if encoding == "raw":
        return fh.create_dataset("images", shape=(0, size, size, 3), maxshape=(n, size, size, 3), dtype=np.uint8,
                                 chunks=(1, size, size, 3))
    # all encoded images end to end in one byte array (a slice of it reads ~10x faster than a
    # variable-length element); ``image_offset`` says where each starts
    return fh.create_dataset("image_bytes", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(BYTES_CHUNK,))


def _write_columns(fh: h5py.File, table: SampleTable, rows: np.ndarray, sizes: np.ndarray,
                   orig: np.ndarray) -> None:
    df = table.df.iloc[rows]
    text = h5py.string_dtype("utf-8")
    fh.create_dataset("node", data=df["node"].to_numpy(dtype=np.int64))
    for col in ("path", "label", "split"):
        fh.create_dataset(col, data=df[col].astype(str).to_numpy(dtype=object), dtype=text)
    fh.create_dataset("box", data=df[["box_x", "box_y", "box_w", "box_h"]].to_numpy(dtype=np.float64))
    fh.create_dataset("size", data=sizes.astype(np.int32))
    fh.create_dataset("orig_size", data=orig.astype(np.int32))
    bad = [c for c in (*table.meta_columns, *table.attr_columns) if "/" in c or c.endswith("_")]
    if bad:
        raise DataError(f"column name(s) {bad} cannot be HDF5 dataset names ('/' or a trailing '_'); rename them")
    meta = fh.create_group("meta")
    for c in table.meta_columns:
        meta.create_dataset(c[len(META_PREFIX):], data=df[c].to_numpy(dtype=np.float64))
    attr = fh.create_group("attr")
    for c in table.attr_columns:
        attr.create_dataset(c[len(ATTR_PREFIX):], data=df[c].astype(str).to_numpy(dtype=object), dtype=text)


def pack_table(table: SampleTable, taxonomy: Taxonomy, out: str | Path, *, image_size: int = 256,
               encoding: str = "jpeg", quality: int = 95, interpolation: str = "bilinear",
               shard_size: int | None = None, workers: int | None = None, on_error: str = "raise",
               source: str = "", progress: Callable[[int, int], None] | None = None) -> PackResult:
    """Write ``table``'s images, labels and columns to ``out`` (one file, or shards of ``shard_size``).

    on_error: ``"raise"`` stops at the first unreadable image (nothing is written);
    ``"skip"`` leaves such images out and lists them in the result.
    progress: called as ``progress(done, total)`` after each chunk.
    """
    check_on_error(on_error)
    if encoding not in ENCODINGS:
        raise ConfigError(f"pack encoding={encoding!r}; choose one of: {', '.join(ENCODINGS)}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"pack interpolation={interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}")
    if not (isinstance(image_size, int) and 8 <= image_size <= 8192):
        raise ConfigError(f"pack image_size={image_size!r}: give the longest stored side in pixels (8..8192)")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ConfigError(f"pack quality={quality!r} must be an integer in 1..100")
    n = len(table)
    if n == 0:
        raise DataError(f"{source or 'pack'}: no samples to pack")
    nodes = table.nodes()
    if nodes.max() >= taxonomy.n_nodes:
        raise DataError(f"{source or 'pack'}: node id {int(nodes.max())} is not in the taxonomy "
                        f"({taxonomy.n_nodes} nodes): the table was loaded with another tree")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ConfigError(f"pack shard_size={shard_size!r} must be a positive integer (images per shard)")
    per = n if shard_size is None else shard_size
    n_shards = (n + per - 1) // per
    finals = shard_names(out, n_shards)
    for p in finals:
        p.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    resample = INTERPOLATIONS[interpolation]
    paths, boxes = table.paths(), table.boxes()
    pack_id = uuid.uuid4().hex
    tax_bytes = taxonomy_bytes(taxonomy)
    result = PackResult(shards=finals, n_samples=0)
    temps: list[str] = []
    t0 = time.perf_counter()
    offset = 0
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack") as pool:
            for s, final in enumerate(finals):
                lo, hi = s * per, min(n, (s + 1) * per)
                fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
                os.close(fd)
                temps.append(tmp)
                kept: list[int] = []
                ends: list[int] = [0]
                sizes: list[tuple[int, int]] = []
                orig: list[tuple[int, int]] = []
                with h5py.File(tmp, "w") as fh:
                    images = _new_shard(fh, encoding, image_size, hi - lo)
                    for c0 in range(lo, hi, CHUNK):
                        idx = range(c0, min(hi, c0 + CHUNK))
                        encoded = list(pool.map(lambda i: _encode_one(str(paths[i]), boxes[i], image_size, encoding,
                                                                      quality, resample), idx))
                        good = []
                        for i, e in zip(idx, encoded):
                            if e.error:
                                if on_error == "raise":
                                    raise DataError(
                                        f"{paths[i]}: {e.error}. Run `taxonomist pack --verify SOURCE` to list every "
                                        "unreadable image, or pack with --on-error skip to leave them out")
                                result.failures.append((str(paths[i]), e.error))
                                continue
                            good.append((i, e))
                        if good:
                            if encoding == "raw":
                                start = images.shape[0]
                                images.resize(start + len(good), axis=0)
                                images[start:] = np.stack([e.data for _, e in good])
                            else:
                                blob = np.concatenate([e.data for _, e in good])
                                start = images.shape[0]
                                images.resize(start + len(blob), axis=0)
                                images[start:] = blob
                                ends.extend((start + np.cumsum([len(e.data) for _, e in good])).tolist())
                        for i, e in good:
                            kept.append(i)
                            sizes.append(e.size)
                            orig.append(e.orig_size)
                            result.n_passthrough += int(e.passthrough)
                        if progress is not None:
                            progress(min(hi, c0 + CHUNK), n)
                    rows = np.asarray(kept, dtype=np.int64)
                    if encoding == "jpeg":
                        fh.create_dataset("image_offset", data=np.asarray(ends, dtype=np.int64))
                    _write_columns(fh, table, rows, np.asarray(sizes).reshape(-1, 2), np.asarray(orig).reshape(-1, 2))
                    fh.create_dataset("taxonomy_json", data=tax_bytes, compression="gzip")
                    fh.attrs.update({"format": FORMAT_NAME, "version": FORMAT_VERSION, "pack_id": pack_id,
                                     "shard": s, "n_shards": n_shards, "offset": offset, "encoding": encoding,
                                     "image_size": image_size, "interpolation": interpolation, "quality": quality,
                                     "fingerprint": taxonomy.fingerprint, "source": str(source)})
                offset += len(rows)
                result.n_samples += len(rows)
        # totals are known only now: stamp them, then publish every shard
        for tmp in temps:
            with h5py.File(tmp, "r+") as fh:
                fh.attrs["n_total"] = result.n_samples
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        temps = []
        _remove_stale(out, finals)
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    result.n_bytes = sum(p.stat().st_size for p in finals)
    result.seconds = time.perf_counter() - t0
    return result


def _remove_stale(out: str | Path, finals: list[Path]) -> None:
    """Delete packs previously written to ``out`` with another shard count: they would shadow this one."""
    out = Path(out)
    suffix = out.suffix or ".h5"
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    candidates = list(out.parent.glob(f"{glob_escape(stem)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
                                      f"{suffix}")) + [out]
    keep = {p.resolve() for p in finals}
    for p in candidates:
        if not p.is_file() or p.resolve() in keep or (p != out and not SHARD_RE.match(p.name)):
            continue
        try:
            with h5py.File(p, "r") as fh:
                ours = fh.attrs.get("format") == FORMAT_NAME
        except OSError:
            ours = False
        if ours:
            p.unlink()


def pack_source(source: str | Path, taxonomy: Taxonomy, out: str | Path, *, on_error: str = "raise",
                verify_images: str = "header", load_options: dict[str, Any] | None = None,
                **pack_options: Any) -> tuple[PackResult, SampleTable]:
    """Load any supported source with :func:`~taxonomist.data.load_samples` and pack it.

    Returns the result and the loaded table (its ``report`` says what loading dropped).
    """
    from ..load import load_samples

    table = load_samples(source, taxonomy, on_error=on_error, verify_images=verify_images, **(load_options or {}))
    assert isinstance(table, SampleTable)
    return pack_table(table, taxonomy, out, on_error=on_error, source=str(source), **pack_options), table

