"""The packed HDF5 layout: names, shard files and the stored taxonomy.

One pack is one ``.h5`` file, or several *shards* ``<stem>-00000-of-00004.h5``
... written by the same run (same ``pack_id``). Every shard is self-describing:

=====================  =========================================================
root attribute         meaning
=====================  =========================================================
``format``             ``"taxonomist-packed"``; ``version`` (int)
``pack_id``            random id shared by the shards of one pack
``shard``, ``n_shards`` this shard's index and the number of shards
``offset``, ``n_total`` global index of its first sample; samples in the pack
``encoding``           ``"jpeg"`` or ``"raw"``
``image_size``         longest stored side; ``interpolation`` of the resize
``quality``            JPEG quality of re-encoded images
``fingerprint``        the taxonomy's fingerprint (see ``Taxonomy.fingerprint``)
``source``             the data source that was packed
=====================  =========================================================

=====================  ======================  ====================================
dataset                shape / dtype           meaning
=====================  ======================  ====================================
``image_bytes``        [total] uint8           ``jpeg``: every encoded image end to
                                               end (the original file when it is a
                                               JPEG needing no crop or resize)
``image_offset``       [n + 1] int64           ``jpeg``: image i is
                                               ``image_bytes[off[i]:off[i+1]]``
``images``             [n, S, S, 3] uint8      ``raw``: pixels at the top-left corner
``size``               [n, 2] int32            (height, width) of the stored image
``orig_size``          [n, 2] int32            (height, width) before the resize
``node``               [n] int64               node id in the stored taxonomy (-1 = none)
``label``, ``path``,   [n] str                 SampleTable columns (``path``: the
``split``                                      original absolute path)
``box``                [n, 4] float64          crop box (x, y, w, h); NaN = whole image
``meta/<name>``        [n] float64             the table's ``meta_<name>`` columns
``attr/<name>``        [n] str                 the table's ``attr_<name>`` columns
``taxonomy_json``      [m] uint8 (gzip)        the taxonomy in taxonomist's JSON format
=====================  ======================  ====================================
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...taxonomy import Taxonomy

FORMAT_NAME = "taxonomist-packed"
FORMAT_VERSION = 1
ENCODINGS: tuple[str, ...] = ("jpeg", "raw")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<suffix>\.[^.]+)$")


def shard_names(out: str | Path, n_shards: int) -> list[Path]:
    """``out`` itself for one shard, else ``<stem>-00000-of-0000N<suffix>`` next to it."""
    out = Path(out)
    if n_shards <= 1:
        return [out]
    suffix = out.suffix or ".h5"
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return [out.with_name(f"{stem}-{i:05d}-of-{n_shards:05d}{suffix}") for i in range(n_shards)]


def resolve_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shard files of a pack: a file, an explicit list, or ``OUT.h5`` standing for its shards."""
    if isinstance(source, (list, tuple)):
        paths = [Path(os.path.abspath(os.fspath(p))) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"packed shard(s) not found: {missing[:5]}")
        if not paths:
            raise DataError("no packed shard given")
        return paths
    path = Path(os.path.abspath(os.fspath(source)))
    if path.is_file():
        return [path]
    suffix = path.suffix or ".h5"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    found = sorted(path.parent.glob(f"{glob_escape(stem)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
                                    f"{suffix}")) if path.parent.is_dir() else []
    if not found:
        raise DataError(f"packed data not found: {path} (nor shards {stem}-00000-of-NNNNN{suffix}); create it with "
                        "`taxonomist pack SOURCE OUT.h5 --taxonomy TREE`")
    counts = {int(SHARD_RE.match(p.name).group("n")) for p in found}  # type: ignore[union-attr]
    if len(counts) != 1:
        raise DataError(f"{path}: shards of different packs lie next to each other (of-{sorted(counts)}); delete the "
                        "stale ones")
    n = counts.pop()
    have = {int(SHARD_RE.match(p.name).group("i")) for p in found}  # type: ignore[union-attr]
    lost = sorted(set(range(n)) - have)
    if lost:
        raise DataError(f"{path}: shard(s) {lost[:10]} of {n} are missing (e.g. "
                        f"{shard_names(path, n)[lost[0]].name}); re-run the pack")
    return shard_names(path, n)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def taxonomy_bytes(taxonomy: Taxonomy) -> np.ndarray:
    """The taxonomy as taxonomist JSON, UTF-8 bytes in a uint8 array (stored gzip-compressed)."""
    from ...taxonomy.io.native import to_native

    return np.frombuffer(json.dumps(to_native(taxonomy), separators=(",", ":")).encode("utf-8"), dtype=np.uint8)


def taxonomy_from_bytes(data: np.ndarray, where: str) -> Taxonomy:
    from ...taxonomy.io.native import read_taxonomy_json

    try:
        obj = json.loads(np.asarray(data, dtype=np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: the stored taxonomy is damaged ({exc}); re-pack the data") from None
    tax = read_taxonomy_json(where, data=obj)
    assert isinstance(tax, Taxonomy)
    return tax
