"""Packed HDF5 data for training at scale: ``pack_table`` / ``pack_source`` write it,
``PackedFile`` and ``PackedDataset`` read it. Layout: :mod:`.format`; see docs/scale.md."""

from .format import ENCODINGS, FORMAT_NAME, resolve_shards, shard_names
from .read import PackedDataset, PackedFile
from .write import PackResult, pack_source, pack_table

__all__ = ["pack_table", "pack_source", "PackResult", "PackedFile", "PackedDataset", "resolve_shards",
           "shard_names", "ENCODINGS", "FORMAT_NAME"]
