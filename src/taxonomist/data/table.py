"""SampleTable: the one internal data model for labelled (or unlabelled) images.

A thin dataclass around a pandas DataFrame with one row per sample:

=============  ===========  ====================================================
column         dtype        meaning
=============  ===========  ====================================================
``path``       str          absolute image path
``box_x`` ..   float64      optional crop box ``box_x, box_y, box_w, box_h`` in
``box_h``                   pixels from the top-left corner; NaN = whole image
``label``      str          the label as the user gave it (name or key; "" = none)
``node``       int64        node id in the taxonomy, ``-1`` = unlabelled
``split``      str          ``"train"``, ``"val"``, ``"test"`` or ``""``
``meta_<x>``   float64      optional numeric metadata
``attr_<x>``   str          optional categorical attributes
=============  ===========  ====================================================

Every source (image folder, CSV/TSV, COCO JSON) produces this table, and
everything downstream (splitting, datasets, feature cache) consumes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import DataError

if TYPE_CHECKING:
    from ..taxonomy import Taxonomy
    from .report import LoadReport

BOX_COLUMNS: tuple[str, ...] = ("box_x", "box_y", "box_w", "box_h")
CORE_COLUMNS: tuple[str, ...] = ("path", *BOX_COLUMNS, "label", "node", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test", "")
META_PREFIX = "meta_"
ATTR_PREFIX = "attr_"


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Check the columns and coerce dtypes; returns a new frame with a 0..n-1 index."""
    missing = [c for c in ("path",) if c not in df.columns]
    if missing:
        raise DataError(f"a SampleTable needs the column(s) {missing}; got {list(df.columns)}")
    extra = [c for c in df.columns if c not in CORE_COLUMNS
             and not (isinstance(c, str) and (c.startswith(META_PREFIX) or c.startswith(ATTR_PREFIX)))]
    if extra:
        raise DataError(f"unknown SampleTable column(s) {extra}: allowed are {list(CORE_COLUMNS)} and "
                        f"'{META_PREFIX}<name>' (numeric) / '{ATTR_PREFIX}<name>' (categorical) columns")
    n = len(df)
    out = pd.DataFrame(index=pd.RangeIndex(n))
    out["path"] = df["path"].astype(str).to_numpy(dtype=object)
    for c in BOX_COLUMNS:
        out[c] = df[c].to_numpy(dtype=np.float64) if c in df.columns else np.full(n, np.nan)
    out["label"] = (df["label"].fillna("").astype(str).to_numpy(dtype=object) if "label" in df.columns
                    else np.full(n, "", dtype=object))
    if "node" in df.columns:
        node = pd.to_numeric(df["node"], errors="coerce").to_numpy(dtype=np.float64)
        bad_node = np.isnan(node) | (node < -1) | (node != np.floor(node))
        if bad_node.any():
            i = int(np.flatnonzero(bad_node)[0])
            raise DataError(f"SampleTable row {i}: node {df['node'].iloc[i]!r} is not an integer >= -1")
        out["node"] = node.astype(np.int64)
    else:
        out["node"] = np.full(n, -1, dtype=np.int64)
    split = (df["split"].fillna("").astype(str).to_numpy(dtype=object) if "split" in df.columns
             else np.full(n, "", dtype=object))
    bad = ~np.isin(split.astype(str), SPLITS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"SampleTable row {i}: split {split[i]!r} is not one of {SPLITS}")
    out["split"] = split
    for c in df.columns:
        if isinstance(c, str) and c.startswith(META_PREFIX):
            out[c] = pd.to_numeric(df[c], errors="raise").to_numpy(dtype=np.float64)
        elif isinstance(c, str) and c.startswith(ATTR_PREFIX):
            out[c] = df[c].fillna("").astype(str).to_numpy(dtype=object)
    return out


def box_strings(boxes: np.ndarray) -> list[str]:
    """Canonical text of each crop box (``""`` for the whole image); used in keys and hashes."""
    whole = np.isnan(boxes).all(axis=1)
    return ["" if w else ",".join(repr(float(v)) for v in b) for w, b in zip(whole, boxes)]


@dataclass(eq=False)
class SampleTable:
    """One row per sample (see the module docstring for the columns).

    ``report`` is the :class:`~taxonomist.data.report.LoadReport` of the loader that
    made the table (None for derived tables).
    """

    df: pd.DataFrame
    report: LoadReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.df = _normalise(self.df)

    # ------------------------------------------------------------- building
    @classmethod
    def build(cls, paths: Sequence[str] | np.ndarray, *, labels: Sequence[str] | np.ndarray | None = None,
              nodes: Sequence[int] | np.ndarray | None = None, boxes: np.ndarray | None = None,
              split: Sequence[str] | np.ndarray | str | None = None,
              meta: Mapping[str, Sequence[float] | np.ndarray] | None = None,
              attrs: Mapping[str, Sequence[str] | np.ndarray] | None = None,
              report: LoadReport | None = None) -> SampleTable:
        """A table from column arrays (``meta``/``attrs`` keys without their prefix)."""
        n = len(paths)
        cols: dict[str, Any] = {"path": np.asarray(paths, dtype=object)}
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
            for j, c in enumerate(BOX_COLUMNS):
                cols[c] = b[:, j]
        if labels is not None:
            cols["label"] = np.asarray(labels, dtype=object)
        if nodes is not None:
            cols["node"] = np.asarray(nodes, dtype=np.int64)
        if split is not None:
            cols["split"] = np.full(n, split, dtype=object) if isinstance(split, str) else np.asarray(split, dtype=object)
        for k, v in (meta or {}).items():
            cols[META_PREFIX + k] = np.asarray(v, dtype=np.float64)
        for k, v in (attrs or {}).items():
            cols[ATTR_PREFIX + k] = np.asarray(v, dtype=object)
        return cls(pd.DataFrame(cols), report=report)

    @classmethod
    def concat(cls, tables: Iterable[SampleTable]) -> SampleTable:
        frames = [t.df for t in tables]
        if not frames:
            return cls.build([])
        return cls(pd.concat(frames, ignore_index=True))

    # ------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        splits = self.df["split"].value_counts().to_dict()
        return f"SampleTable(n={len(self)}, labelled={int((self.df['node'] >= 0).sum())}, splits={splits})"

    def nodes(self) -> np.ndarray:
        """Node id of every sample (int64, -1 = unlabelled)."""
        return self.df["node"].to_numpy(dtype=np.int64, copy=True)

    def paths(self) -> np.ndarray:
        return self.df["path"].to_numpy(dtype=object, copy=True)

    def boxes(self) -> np.ndarray:
        """[N, 4] float64 crop boxes (x, y, w, h); rows of NaN mean the whole image."""
        return self.df[list(BOX_COLUMNS)].to_numpy(dtype=np.float64, copy=True)

    @property
    def has_boxes(self) -> bool:
        return bool(self.df["box_x"].notna().any())

    @property
    def meta_columns(self) -> list[str]:
        return [c for c in self.df.columns if c.startswith(META_PREFIX)]

    @property
    def attr_columns(self) -> list[str]:
        return [c for c in self.df.columns if c.startswith(ATTR_PREFIX)]

    def metadata(self) -> np.ndarray:
        """[N, n_meta] float32 array of the ``meta_*`` columns (in column order)."""
        return self.df[self.meta_columns].to_numpy(dtype=np.float32)

    def sample_keys(self) -> list[str]:
        """``path|box`` of every row: the identity of a sample (duplicates share it)."""
        return [f"{p}|{b}" for p, b in zip(self.df["path"], box_strings(self.boxes()))]

    # ------------------------------------------------------------- derived tables
    def select(self, rows: np.ndarray | Sequence[int] | slice) -> SampleTable:
        """Rows by position (int array, boolean mask or slice), index reset."""
        if isinstance(rows, slice):
            return SampleTable(self.df.iloc[rows])
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return SampleTable(self.df.iloc[rows.astype(np.int64)])

    def subset(self, split: str | Sequence[str]) -> SampleTable:
        """The rows of one split (or of several)."""
        wanted = [split] if isinstance(split, str) else list(split)
        bad = [s for s in wanted if s not in SPLITS]
        if bad:
            raise DataError(f"unknown split(s) {bad}; splits are {[s for s in SPLITS if s]} (or '' for unassigned)")
        return self.select(self.df["split"].isin(wanted).to_numpy())

    def with_nodes(self, nodes: np.ndarray | Sequence[int]) -> SampleTable:
        """A copy with the ``node`` column replaced (e.g. after restricting the taxonomy)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.shape != (len(self),):
            raise DataError(f"with_nodes: expected {len(self)} node ids, got shape {nodes.shape}")
        df = self.df.copy()
        df["node"] = nodes
        return SampleTable(df)

    def with_split(self, split: np.ndarray | Sequence[str] | str) -> SampleTable:
        df = self.df.copy()
        df["split"] = np.full(len(self), split, dtype=object) if isinstance(split, str) else np.asarray(split, object)
        return SampleTable(df)

    # ------------------------------------------------------------- files
    def to_csv(self, path: str | Path) -> Path:
        """Write every column (floats at full precision; NaN as an empty cell). Atomic."""
        from ..utils.io import atomic_write_text

        return atomic_write_text(path, self.df.to_csv(index=False, na_rep="", float_format=None))

    @classmethod
    def from_csv(cls, path: str | Path) -> SampleTable:
        """Read a file written by :meth:`to_csv` (the internal format, not a user sample table)."""
        path = Path(path)
        try:
            header = pd.read_csv(path, nrows=0).columns
            floats = [c for c in header if c in BOX_COLUMNS or c.startswith(META_PREFIX)]
            df = pd.read_csv(path, dtype={c: str for c in header if c not in floats and c != "node"} | {"node": "int64"},
                             keep_default_na=False, na_values={c: [""] for c in floats})
        except (ValueError, pd.errors.ParserError) as exc:
            raise DataError(f"{path}: not a SampleTable CSV written by SampleTable.to_csv ({exc})") from None
        return cls(df)

    # ------------------------------------------------------------- summary
    def describe(self, taxonomy: Taxonomy | None = None) -> dict[str, Any]:
        """Counts per split, per label (largest first) and, with a taxonomy, per node depth."""
        df = self.df
        out: dict[str, Any] = {
            "n_samples": len(df),
            "n_labelled": int((df["node"] >= 0).sum()),
            "n_labels": int(df.loc[df["node"] >= 0, "node"].nunique()),
            "with_box": int(df["box_x"].notna().sum()),
            "per_split": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
            "per_label": {str(k): int(v) for k, v in df["label"].value_counts().items()},
        }
        if taxonomy is not None:
            nodes = self.nodes()
            labelled = nodes[nodes >= 0]
            if len(labelled) and labelled.max() >= taxonomy.n_nodes:
                raise DataError(f"node id {int(labelled.max())} is not in this taxonomy ({taxonomy.n_nodes} nodes)")
            depth = np.bincount(taxonomy.depth[labelled], minlength=0)
            out["per_depth"] = {int(d): int(c) for d, c in enumerate(depth) if c}
            out["n_at_internal_nodes"] = int((~taxonomy.is_leaf[labelled]).sum())
        return out

    def summary(self, taxonomy: Taxonomy | None = None, top: int = 10) -> str:
        """:meth:`describe` as a few printable lines."""
        d = self.describe(taxonomy)
        lines = [f"{d['n_samples']} samples ({d['n_labelled']} labelled, {d['n_labels']} classes, "
                 f"{d['with_box']} with a crop box)",
                 "per split: " + ", ".join(f"{k or '(none)'} {v}" for k, v in d["per_split"].items())]
        if "per_depth" in d:
            lines.append("per depth: " + ", ".join(f"{k}: {v}" for k, v in d["per_depth"].items()))
        per_label = list(d["per_label"].items())
        if per_label:
            lines.append("largest classes: " + ", ".join(f"{k or '(none)'} {v}" for k, v in per_label[:top]))
            lines.append("smallest classes: " + ", ".join(f"{k or '(none)'} {v}" for k, v in per_label[::-1][:top]))
        return "\n".join(lines)
