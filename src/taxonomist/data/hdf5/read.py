"""Read packed HDF5 data: :class:`PackedFile` (the pack as a whole) and :class:`PackedDataset`.

HDF5 handles are not fork-safe, so neither class keeps one across pickling or a
fork: each process (the main one, every DataLoader worker) opens its own
read-only handles on first use and only reads the images it is asked for. What
crosses into a worker is a few small arrays (row number, node, shard offsets),
never the images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ...errors import DataError
from ...taxonomy import Taxonomy
from ..images import _identity_to_tensor, _to_rgb
from ..table import ATTR_PREFIX, META_PREFIX, SampleTable
from .format import FORMAT_NAME, FORMAT_VERSION, resolve_shards, taxonomy_from_bytes

PackSource = str | Path | Sequence[str | Path]


class _Shard:
    """One open shard in one process: the file, its image dataset and the small per-image index."""

    def __init__(self, path: Path, encoding: str) -> None:
        self.file = h5py.File(path, "r")
        if encoding == "raw":
            self.images = self.file["images"]
            self.size = self.file["size"][...]  # [n, 2] (height, width): 8 bytes per image
        else:
            self.images = self.file["image_bytes"]
            self.offset = self.file["image_offset"][...]  # [n + 1]: 8 bytes per image


class _Handles:
    """Per-process read-only shards, opened on first use and dropped on pickling or fork."""

    def __init__(self, shards: list[Path], encoding: str = "") -> None:
        self.shards = shards
        self.encoding = encoding
        self._open: dict[int, _Shard] = {}
        self._pid = os.getpid()

    def shard(self, s: int) -> _Shard:
        if self._pid != os.getpid():  # forked: the parent's handles must not be used here
            self._open = {}
            self._pid = os.getpid()
        sh = self._open.get(s)
        if sh is None:
            sh = self._open[s] = _Shard(self.shards[s], self.encoding)
        return sh

    def get(self, s: int) -> h5py.File:
        return self.shard(s).file

    def close(self) -> None:
        if self._pid == os.getpid():
            for sh in self._open.values():
                try:
                    sh.file.close()
                except Exception:  # noqa: BLE001 - closing at interpreter exit may fail harmlessly
                    pass
        self._open = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "encoding": self.encoding}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards"], state["encoding"])  # type: ignore[misc]


class PackedFile:
    """A pack (one file or its shards): attributes, the stored taxonomy, the table view and images.

    ``PackedFile("train.h5")`` also finds ``train-00000-of-00004.h5`` ... when
    ``train.h5`` itself does not exist.
    """

    def __init__(self, source: PackSource) -> None:
        self.shards = resolve_shards(source)
        counts, attrs = [], []
        for p in self.shards:
            try:
                with h5py.File(p, "r") as fh:
                    a = dict(fh.attrs)
                    if a.get("format") != FORMAT_NAME:
                        raise DataError(f"{p}: not a taxonomist packed file (no format attribute {FORMAT_NAME!r}); "
                                        "create one with `taxonomist pack`")
                    counts.append(int(fh["node"].shape[0]))
            except OSError as exc:
                raise DataError(f"{p}: cannot open as HDF5 ({exc}); was the pack interrupted or the file "
                                "truncated? Re-run `taxonomist pack`") from None
            if int(a.get("version", 0)) > FORMAT_VERSION:
                raise DataError(f"{p}: packed format version {a.get('version')} is newer than this taxonomist "
                                f"({FORMAT_VERSION}); upgrade taxonomist")
            attrs.append(a)
        first = attrs[0]
        for p, a in zip(self.shards[1:], attrs[1:]):
            for key in ("pack_id", "fingerprint", "encoding", "image_size"):
                if a.get(key) != first.get(key):
                    raise DataError(f"{p}: {key} {a.get(key)!r} differs from {self.shards[0].name}'s "
                                    f"{first.get(key)!r}: these shards come from different packs")
        order = np.argsort([int(a.get("shard", 0)) for a in attrs], kind="stable")
        self.shards = [self.shards[i] for i in order]
        attrs = [attrs[i] for i in order]
        counts = [counts[i] for i in order]
        n_shards = int(first.get("n_shards", 1))
        if len(self.shards) == n_shards:  # the whole pack: check it is complete and consistent
            if [int(a.get("shard", 0)) for a in attrs] != list(range(n_shards)):
                raise DataError(f"{self.shards[0]}: expected shards 0..{n_shards - 1}, got "
                                f"{[int(a.get('shard', 0)) for a in attrs]}")
            if int(first.get("n_total", sum(counts))) != sum(counts):
                raise DataError(f"{self.shards[0]}: the pack holds {first['n_total']} samples but its shards hold "
                                f"{sum(counts)}; a shard is damaged or from another run")
        first = attrs[0]
        self.attrs: dict[str, Any] = first
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.r_[0, np.cumsum(self.counts)].astype(np.int64)
        self.encoding: str = str(first["encoding"])
        self.image_size: int = int(first["image_size"])
        self.fingerprint: str = str(first["fingerprint"])
        self._handles = _Handles(self.shards, self.encoding)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        more = f" + {len(self.shards) - 1} shard(s)" if len(self.shards) > 1 else ""
        return (f"PackedFile({self.shards[0].name}{more}, n={len(self)}, encoding={self.encoding!r}, "
                f"image_size={self.image_size})")

    # ------------------------------------------------------------ columns
    def _column(self, name: str, text: bool = False) -> np.ndarray:
        parts = []
        for s in range(len(self.shards)):
            ds = self._handles.get(s)[name]
            parts.append(ds.asstr()[...] if text else ds[...])
        return np.concatenate(parts) if parts else np.empty(0)

    def nodes(self) -> np.ndarray:
        """Node id of every sample in the stored taxonomy (int64, -1 = unlabelled)."""
        return self._column("node").astype(np.int64)

    @cached_property
    def taxonomy(self) -> Taxonomy:
        """The taxonomy the pack was written with (read from the file, fingerprint checked)."""
        return taxonomy_from_bytes(self._handles.get(0)["taxonomy_json"][...], str(self.shards[0]))

    def check_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Raise a DataError unless ``taxonomy`` is the tree the pack was written with."""
        if taxonomy.fingerprint != self.fingerprint:
            raise DataError(
                f"{self.shards[0]}: packed with the taxonomy {self.fingerprint} but read with {taxonomy.fingerprint}; "
                "node ids would be wrong. Use PackedFile(...).taxonomy (the stored tree), re-pack with this "
                "taxonomy, or map the nodes yourself and pass table= to PackedDataset")

    def table(self) -> SampleTable:
        """The pack as a SampleTable (original paths, boxes, labels, nodes, splits, meta_/attr_ columns).

        Row ``i`` is sample ``i`` of the pack (and of ``PackedDataset(pack)``); nodes are in
        :attr:`taxonomy`.
        """
        cols: dict[str, Any] = {"path": self._column("path", text=True), "label": self._column("label", text=True),
                                "node": self.nodes(), "split": self._column("split", text=True)}
        box = self._column("box").reshape(-1, 4)
        for j, c in enumerate(("box_x", "box_y", "box_w", "box_h")):
            cols[c] = box[:, j]
        f0 = self._handles.get(0)
        for name in f0["meta"]:
            cols[META_PREFIX + name] = self._column(f"meta/{name}")
        for name in f0["attr"]:
            cols[ATTR_PREFIX + name] = self._column(f"attr/{name}", text=True)
        return SampleTable(pd.DataFrame(cols))

    # ------------------------------------------------------------ images
    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row in shard) of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside 0..{len(self) - 1}")
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, int(index - self.offsets[s])

    def image(self, index: int) -> Image.Image:
        """Sample ``index`` as a PIL RGB image (as stored: crop applied, longer side <= image_size)."""
        s, r = self.locate(index)
        sh = self._handles.shard(s)
        try:
            if self.encoding == "raw":
                h, w = (int(v) for v in sh.size[r])
                # reading the whole slot is faster than an HDF5 sub-selection; crop in memory
                return Image.fromarray(np.ascontiguousarray(sh.images[r][:h, :w]))
            data = sh.images[int(sh.offset[r]):int(sh.offset[r + 1])]
            with Image.open(io.BytesIO(data.tobytes())) as im:
                im.load()
                return _to_rgb(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{self.shards[s]} sample {r}: cannot decode the packed image ({type(exc).__name__}: "
                            f"{exc}); the file may be damaged, re-run `taxonomist pack`") from None

    def close(self) -> None:
        self._handles.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("taxonomy", None)  # cached; re-read on demand
        return state


class PackedDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (image [3, H, W] float tensor, node id, i)``, like :class:`~taxonomist.data.ImageDataset`.

    Args:
        source: a pack path (or its shards), or a :class:`PackedFile`.
        transform: PIL RGB image -> tensor (``build_transform`` / ``build_augment``); default:
            the stored image on the [0, 1] scale.
        taxonomy: if given (and ``table`` is not), must be the tree the pack was written with
            (a DataError otherwise); the nodes are the stored ones.
        table: a SampleTable whose rows are samples of the pack, e.g. a split or a restriction of
            ``PackedFile.table()`` with nodes mapped to another tree: the dataset yields exactly
            its rows, in its order, with its nodes (rows are matched by path and crop box).
    """

    def __init__(self, source: PackSource | PackedFile, transform: Any = None, *, taxonomy: Taxonomy | None = None,
                 table: SampleTable | None = None) -> None:
        self.pack = source if isinstance(source, PackedFile) else PackedFile(source)
        self.transform = transform if transform is not None else _identity_to_tensor
        if table is None:
            if taxonomy is not None:
                self.pack.check_taxonomy(taxonomy)
            self.rows = np.arange(len(self.pack), dtype=np.int64)
            self.nodes = self.pack.nodes()
        else:
            self.rows = self._match_rows(table)
            self.nodes = table.nodes()

    def _match_rows(self, table: SampleTable) -> np.ndarray:
        keys = self.pack.table().sample_keys()
        index = {k: i for i, k in reversed(list(enumerate(keys)))}  # first occurrence wins
        wanted = table.sample_keys()
        rows = np.fromiter((index.get(k, -1) for k in wanted), dtype=np.int64, count=len(wanted))
        if (rows < 0).any():
            i = int(np.flatnonzero(rows < 0)[0])
            raise DataError(f"{self.pack.shards[0]}: {int((rows < 0).sum())} row(s) of the table are not in the pack, "
                            f"e.g. row {i} ({wanted[i].split('|')[0]}); build the table from PackedFile.table()")
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img = self.pack.image(int(self.rows[index]))
        try:
            x = self.transform(img)
        except Exception as exc:
            raise DataError(f"{self.pack.shards[0]} sample {int(self.rows[index])}: the transform failed: "
                            f"{type(exc).__name__}: {exc}") from exc
        return x, int(self.nodes[index]), int(index)

    @staticmethod
    def worker_init_fn(worker_id: int) -> None:  # noqa: ARG004 - DataLoader signature
        """Optional ``DataLoader(worker_init_fn=...)``: drop any handle inherited from the parent process.

        Not required (handles are per process and opened on first use); provided for
        loaders that want the reset to be explicit.
        """
        info = torch.utils.data.get_worker_info()
        if info is not None and isinstance(info.dataset, PackedDataset):
            pack = info.dataset.pack
            pack._handles = _Handles(pack.shards, pack.encoding)
