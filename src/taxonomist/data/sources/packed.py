"""A packed HDF5 file (``taxonomist pack``) as a data source, like a folder or a CSV.

Each sample's ``path`` becomes ``pack:<shard file>::<row>``; :func:`read_packed_image`
(called by ``load_rgb``) reads it back, so the image dataset, the feature cache,
training, evaluation and prediction take a pack wherever they take images. Packed
images are stored already cropped, so the boxes are cleared (the original paths and
boxes stay in the pack). The feature cache keys a packed sample by its shard file's
size and modification time, like an image file.

Labels: when the pack was written with the same taxonomy (same fingerprint) its node
ids are used as they are; otherwise each sample's stored label is looked up in the given
taxonomy like a table's label column (unknown labels are reported, the policy applies).
Without a taxonomy the pack's own tree is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...taxonomy import Taxonomy
from ..labels import resolve_labels
from ..report import LoadReport
from ..table import ATTR_PREFIX, BOX_COLUMNS, META_PREFIX, SampleTable

PACK_PREFIX = "pack:"
_SEP = "::"
PACK_SUFFIXES = (".h5", ".hdf5")


def is_pack_path(path: str) -> bool:
    """True for a sample path that points into a pack (``pack:<file>::<row>``)."""
    return path.startswith(PACK_PREFIX)


def split_pack_path(path: str) -> tuple[str, int]:
    """``pack:<file>::<row>`` -> (file, row)."""
    body = path[len(PACK_PREFIX):]
    file, _, row = body.rpartition(_SEP)
    return file, int(row)


def pack_file_of(path: str) -> str:
    """The file a sample path lives in (the shard for packed samples)."""
    return split_pack_path(path)[0] if is_pack_path(path) else path


_OPEN: dict[tuple[int, str], object] = {}


def read_packed_image(path: str):
    """The stored image (PIL RGB) of a ``pack:`` sample path; shard handles are cached per process."""
    from ..hdf5 import PackedFile

    file, row = split_pack_path(path)
    key = (os.getpid(), file)  # h5py handles must not cross a fork: one cache entry per process
    pack = _OPEN.get(key)
    if pack is None:
        pack = _OPEN[key] = PackedFile(file)
    return pack.image(row)  # type: ignore[attr-defined]


def load_packed(source: str | Path, taxonomy: Taxonomy | None, *, on_error: str = "raise",
                lenient_labels: bool = False) -> tuple[SampleTable, LoadReport]:
    """A pack (or its shards) as a SampleTable with ``pack:`` paths (see the module docstring)."""
    from ..hdf5 import PackedFile

    pack = PackedFile(source)
    report = LoadReport(str(source), kind="pack")
    table = pack.table()
    df = table.df.copy()
    n = len(df)
    shard = np.searchsorted(pack.offsets, np.arange(n), side="right") - 1
    row = np.arange(n) - pack.offsets[shard]
    files = [str(Path(p).resolve()) for p in pack.shards]
    df["path"] = [f"{PACK_PREFIX}{files[s]}{_SEP}{r}" for s, r in zip(shard, row)]
    for c in BOX_COLUMNS:
        df[c] = np.nan
    bad = np.zeros(n, dtype=bool)
    if taxonomy is not None and taxonomy.fingerprint != pack.fingerprint:
        labels = df["label"].astype(str).to_numpy(dtype=object)

        def locate(rows: np.ndarray) -> str:
            return f"{source} sample {int(rows[0])}" + (f" (+{len(rows) - 1} more)" if len(rows) > 1 else "")

        nodes, bad = resolve_labels(taxonomy, labels, locate, report, allow_empty=True, lenient=lenient_labels)
        df["node"] = nodes
        report.note(f"{source}: packed with another taxonomy ({pack.fingerprint}); labels looked up by name")
    keep = np.flatnonzero(~bad)
    report.n_read, report.n_kept = n, len(keep)
    df = df.iloc[keep]
    meta = {c[len(META_PREFIX):]: df[c].to_numpy() for c in df.columns if c.startswith(META_PREFIX)}
    attrs = {c[len(ATTR_PREFIX):]: df[c].to_numpy(dtype=object) for c in df.columns if c.startswith(ATTR_PREFIX)}
    out = SampleTable.build(df["path"].to_numpy(dtype=object), labels=df["label"].to_numpy(dtype=object),
                            nodes=df["node"].to_numpy(dtype=np.int64), split=df["split"].to_numpy(dtype=object),
                            meta=meta, attrs=attrs, report=report)
    report.raise_or_warn(on_error)
    return out, report
