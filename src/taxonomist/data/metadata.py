"""Per-sample metadata (place, time, depth, ...): encoding, fusion with image features, masking.

**Encoding** (:class:`MetadataEncoder`): each *field* reads one or two
SampleTable columns (``meta_<name>`` numbers or, for dates and times,
``attr_<name>`` text) and yields a few numbers plus one *mask* bit (1 = present):

=================  =========================  ====================================================
kind               columns                    encoding
=================  =========================  ====================================================
``latlon``         latitude, longitude (deg)  ``sphere`` (default): the point on the unit sphere
                                              ``(cos φ cos λ, cos φ sin λ, sin φ)``; ``sincos``:
                                              ``(sin πλ/180, cos πλ/180, sin πφ/90, cos πφ/90)``,
                                              the encoding of Mac Aodha et al., "Presence-Only
                                              Geographical Priors", ICCV 2019 (note: it maps both
                                              poles to the same point)
``day_of_year``    day 1..366, or a date      ``(sin 2π(d-1)/365.25, cos 2π(d-1)/365.25)``: day 1
                   text (``2019-05-03``)      and day 366 are neighbours
``time_of_day``    hours 0..24, or a time     ``(sin 2πh/24, cos 2πh/24)``
                   text (``14:30``)
``cyclic``         a number with a period     ``(sin 2πx/period, cos 2πx/period)``
``numeric``        any number (depth,         ``(x - mean) / std`` with mean and std fitted on
                   elevation, temperature)    the training rows (population std)
=================  =========================  ====================================================

**Which fields** (:meth:`MetadataEncoder.from_spec`, ``data.metadata.columns``): a
list of column names, whose kinds are inferred from the names, and/or mappings
that give the kind, ``{name: month, kind: cyclic, period: 12}``,
``{kind: latlon, columns: [lat, lon], encoding: sincos}``; or ``"auto"`` (every
``meta_`` column and the date/time-named ``attr_`` columns, inferred). Inference
(bare name, lower case; :func:`infer_kind`): a latitude name (``lat``,
``latitude``, ``decimallatitude``) with a longitude name (``lon``, ``lng``,
``long``, ``longitude``, ``decimallongitude``) -> one ``latlon`` field; ``doy``,
``day_of_year``, ``date``, ``eventdate`` -> ``day_of_year``; ``time``, ``hour``,
``time_of_day``, ``eventtime`` -> ``time_of_day``; ``month`` -> ``cyclic`` with
period 12; ``day`` is ambiguous (of the year or of the month) and is an error
asking for the kind; anything else -> ``numeric``. ``from_spec(..., log=print)``
prints the kind every field got and whether it was given or inferred.

A missing value (NaN / empty cell) gives zeros and mask 0; a value that is
present but invalid (latitude 95, day 400, an unparseable date) is a DataError
naming the row and column, never a silent mask. The fitted encoder is saved
with :meth:`MetadataEncoder.to_json` and restored with ``from_json`` for
inference.

**Fusion** (:class:`MetadataFusion`): the encoded values (zeroed where masked)
and the mask are embedded by a small MLP (Linear-ReLU-Linear-ReLU) and joined
with the image features either by concatenation (``[f, e]``; Tang et al.,
"Improving Image Classification with Location Context", ICCV 2015, and Mac
Aodha et al. 2019 combine image and location this way) or by a per-channel gate
``f * 2 sigmoid(W e + b)`` (multiplicative conditioning in the spirit of FiLM,
Perez et al., AAAI 2018; the gate is 1 when ``W e + b = 0``, and the output keeps
the image feature size). ``metadata=None`` means "no metadata" and is exactly
the same as a fully masked input.

**Masking** (:class:`MetadataMasker`): during training, metadata is hidden at
random with a scheduled probability (``mode="all"``: every component of a
sample at once; ``"components"``: each component independently), so the model
also works when metadata is missing; :func:`metadata_ablation` evaluates with
the metadata, without it, and without each component.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import ConfigError, DataError
from .augment import ProbabilitySchedule
from .table import ATTR_PREFIX, META_PREFIX, SampleTable

FIELD_KINDS: tuple[str, ...] = ("latlon", "day_of_year", "time_of_day", "cyclic", "numeric")
LATLON_ENCODINGS: tuple[str, ...] = ("sphere", "sincos")
FORMAT_NAME = "taxonomist-metadata-encoder"
FORMAT_VERSION = 1
DAYS_PER_YEAR = 365.25

_LAT_NAMES = ("lat", "latitude", "decimallatitude", "decimal_latitude")
_LON_NAMES = ("lon", "lng", "long", "longitude", "decimallongitude", "decimal_longitude")
_DOY_NAMES = ("doy", "day_of_year", "dayofyear", "date", "eventdate", "event_date")
_TOD_NAMES = ("time", "time_of_day", "hour", "eventtime", "event_time")
_MONTH_NAMES = ("month",)
#: Names that could mean two kinds: inferring either would be a silent guess, so their kind must be given.
AMBIGUOUS_NAMES: dict[str, str] = {
    "day": "a day of the year (1..366) or a day of the month (1..31)",
}
#: How a single column's kind is inferred from its name (bare, lower case): (kind, period, names, why), in
#: this order; lat/lon names pair into one latlon field, AMBIGUOUS_NAMES are errors, anything else is numeric.
SINGLE_COLUMN_RULES: tuple[tuple[str, float, tuple[str, ...], str], ...] = (
    ("day_of_year", 0.0, _DOY_NAMES, "a date / day-of-year name"),
    ("time_of_day", 0.0, _TOD_NAMES, "a time name"),
    ("cyclic", 12.0, _MONTH_NAMES, "a month name"),
)


def infer_kind(column: str) -> tuple[str, float, str]:
    """``(kind, period, reason)`` of a single column from its name (not lat/lon, which come in pairs):
    :data:`SINGLE_COLUMN_RULES`, else ``numeric``.

    Raises ConfigError for an ambiguous name (:data:`AMBIGUOUS_NAMES`), asking for the kind.
    """
    b = _bare(column).lower()
    if b in AMBIGUOUS_NAMES:
        raise ConfigError(f"metadata column {column!r}: the name {b!r} is ambiguous ({AMBIGUOUS_NAMES[b]}), so "
                          f"its kind is not guessed; give it: {{name: {_bare(column)}, kind: day_of_year}}, "
                          f"{{name: {_bare(column)}, kind: cyclic, period: 31}} or {{name: {_bare(column)}, "
                          "kind: numeric}")
    for kind, period, names, why in SINGLE_COLUMN_RULES:
        if b in names:
            return kind, period, f"{b!r} is {why}"
    return "numeric", 0.0, "not a lat/lon, date, time or month name"


def describe_field(f: MetaField) -> str:
    """``numeric, column meta_depth`` / ``cyclic (period 12), column month`` / ``latlon (sphere), columns ...``."""
    what = {"latlon": f"latlon ({f.encoding})", "cyclic": f"cyclic (period {f.period:g})"}.get(f.kind, f.kind)
    cols = f"column {f.columns[0]}" if len(f.columns) == 1 else f"columns {', '.join(f.columns)}"
    return f"{what}, {cols}"


_SPEC_KEYS = ("name", "kind", "columns", "period", "encoding")


def _field_from_mapping(entry: Mapping[str, Any], i: int, latlon_encoding: str) -> MetaField:
    """A MetaField from ``{name, kind, columns, period, encoding}`` (None values already dropped)."""
    where = f"metadata column {i} ({dict(entry)})"
    unknown = sorted(set(entry) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; the keys are: {', '.join(_SPEC_KEYS)}")
    kind = str(entry["kind"])
    if kind not in FIELD_KINDS:
        raise ConfigError(f"{where}: kind {kind!r}; choose one of: {', '.join(FIELD_KINDS)}")
    if "period" in entry and kind != "cyclic":
        raise ConfigError(f"{where}: period is for kind cyclic only")
    if "encoding" in entry and kind != "latlon":
        raise ConfigError(f"{where}: encoding is for kind latlon only")
    if kind == "latlon":
        cols = entry.get("columns")
        if not isinstance(cols, (list, tuple)) or len(cols) != 2:
            raise ConfigError(f"{where}: kind latlon takes columns: [LATITUDE, LONGITUDE]")
        return MetaField("latlon", tuple(cols), name=str(entry.get("name") or ""),
                         encoding=str(entry.get("encoding", latlon_encoding)))
    if "columns" in entry:
        raise ConfigError(f"{where}: columns is for kind latlon only; give the column as name")
    if not entry.get("name"):
        raise ConfigError(f"{where}: kind {kind} needs the column as name")
    if kind == "cyclic" and "period" not in entry:
        raise ConfigError(f"{where}: kind cyclic needs a period (e.g. 12 for months, 360 for degrees)")
    return MetaField(kind, (str(entry["name"]),), period=float(entry.get("period", 0.0)))


@dataclass
class MetaField:
    """One metadata component: ``kind``, its source ``columns`` (full names) and fitted state."""

    kind: str
    columns: tuple[str, ...]
    name: str = ""
    encoding: str = "sphere"
    period: float = 0.0
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ConfigError(f"metadata field {self.name or self.columns}: kind {self.kind!r}; choose one of: "
                              f"{', '.join(FIELD_KINDS)}")
        self.columns = tuple(str(c) for c in self.columns)
        need = 2 if self.kind == "latlon" else 1
        if len(self.columns) != need:
            raise ConfigError(f"metadata field {self.name or self.columns}: kind {self.kind!r} takes {need} column(s) "
                              f"({'latitude, longitude' if need == 2 else 'one'}), got {list(self.columns)}")
        if not self.name:
            self.name = "latlon" if self.kind == "latlon" else _bare(self.columns[0])
        if self.kind == "latlon" and self.encoding not in LATLON_ENCODINGS:
            raise ConfigError(f"metadata field {self.name!r}: encoding {self.encoding!r}; choose one of: "
                              f"{', '.join(LATLON_ENCODINGS)}")
        if self.kind == "cyclic" and not (self.period > 0 and math.isfinite(self.period)):
            raise ConfigError(f"metadata field {self.name!r}: a cyclic field needs period > 0 "
                              f"(e.g. 12 for months), got {self.period!r}")

    @property
    def dim(self) -> int:
        """Number of encoded values."""
        if self.kind == "latlon":
            return 3 if self.encoding == "sphere" else 4
        return 1 if self.kind == "numeric" else 2


def _bare(column: str) -> str:
    for prefix in (META_PREFIX, ATTR_PREFIX):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def _find_column(df: pd.DataFrame, column: str) -> str:
    """The table column for ``column`` (full name, or a bare name: meta_ first, then attr_)."""
    for c in (column, META_PREFIX + column, ATTR_PREFIX + column):
        if c in df.columns:
            return c
    have = [c for c in df.columns if c.startswith((META_PREFIX, ATTR_PREFIX))]
    raise DataError(f"metadata column {column!r} is not in the sample table (its metadata columns: {have}); load "
                    "the table with metadata_columns=[...] / attribute_columns=[...]")


def _numbers(df: pd.DataFrame, col: str, what: str) -> np.ndarray:
    if col.startswith(META_PREFIX) or pd.api.types.is_numeric_dtype(df[col]):
        return df[col].to_numpy(dtype=np.float64)
    text = df[col].fillna("").astype(str).str.strip()
    vals = pd.to_numeric(text.where(text != "", None), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(vals) & (text != "").to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"metadata column {col!r} row {i}: {text.iloc[i]!r} is not a number ({what}); "
                        f"{int(bad.sum())} such cell(s)")
    return vals


def _day_of_year(df: pd.DataFrame, col: str) -> np.ndarray:
    """Day of year (1..366, fractional allowed) from numbers or date text."""
    if col.startswith(META_PREFIX) or pd.api.types.is_numeric_dtype(df[col]):
        return df[col].to_numpy(dtype=np.float64)
    text = df[col].fillna("").astype(str).str.strip()
    if text.map(lambda s: s == "" or re.fullmatch(r"[-+]?\d+(\.\d*)?", s) is not None).all():
        return _numbers(df, col, "a day of year")
    # the calendar date as written (a time-zone offset must not move it to another day)
    day = text.str.extract(r"^(\d{4}-\d{2}-\d{2})")[0].fillna(text)
    dates = pd.to_datetime(day.where(day != "", None), errors="coerce", format="mixed")
    bad = dates.isna().to_numpy() & (text != "").to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"metadata column {col!r} row {i}: {text.iloc[i]!r} is not a date (use ISO text such as "
                        f"2019-05-03, or a day-of-year number); {int(bad.sum())} such cell(s)")
    return dates.dt.day_of_year.to_numpy(dtype=np.float64, na_value=np.nan)


def _hours(df: pd.DataFrame, col: str) -> np.ndarray:
    """Hours since midnight from numbers or time text (``14:30``, ``14:30:05``, an ISO datetime)."""
    if col.startswith(META_PREFIX) or pd.api.types.is_numeric_dtype(df[col]):
        return df[col].to_numpy(dtype=np.float64)
    text = df[col].fillna("").astype(str).str.strip()
    out = np.full(len(text), np.nan)
    hm = text.str.extract(r"(?:^|[T ])(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?")
    has = hm[0].notna().to_numpy()
    out[has] = (hm[0][has].astype(float) + hm[1][has].astype(float) / 60
                + hm[2][has].fillna("0").astype(float) / 3600).to_numpy()
    plain = ~has & (text != "").to_numpy()
    if plain.any():
        out[plain] = _numbers(df.loc[plain], col, "hours or HH:MM")
    return out


def _check_range(values: np.ndarray, lo: float, hi: float, col: str, what: str) -> None:
    bad = ~np.isnan(values) & ((values < lo) | (values > hi) | ~np.isfinite(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"metadata column {col!r} row {i}: {float(values[i])!r} is outside {lo}..{hi} ({what}); "
                        f"{int(bad.sum())} such value(s). Fix the cells or leave them empty (missing)")


@dataclass
class EncodedMetadata:
    """``values`` float32 [N, D] (zeros where masked) and ``mask`` float32 [N, K] (1 = present)."""

    values: np.ndarray
    mask: np.ndarray

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.values).to(device), torch.from_numpy(self.mask).to(device)


@dataclass
class MetadataEncoder:
    """Encode metadata columns of a SampleTable (see the module docstring)."""

    fields: list[MetaField] = field(default_factory=list)

    # ------------------------------------------------------------ building
    @classmethod
    def from_spec(cls, spec: str | Sequence[Any] = "auto", table: SampleTable | None = None, *,
                  latlon_encoding: str = "sphere", log: Callable[[str], None] | None = None) -> MetadataEncoder:
        """Build the fields from a spec, as ``data.metadata.columns`` gives it (kinds: :func:`infer_kind`).

        ``spec``: ``"auto"`` (every ``meta_*`` column of ``table`` plus its date/time-named ``attr_*``
        columns, kinds inferred), or a list whose entries are a column name (kind inferred from the name)
        or a mapping ``{name, kind, period, encoding, columns}`` (a pydantic model with ``model_dump`` is
        accepted too): ``{name: month, kind: cyclic, period: 12}``,
        ``{kind: latlon, columns: [lat, lon], encoding: sincos}``; a mapping without ``kind`` is inferred.
        ``latlon_encoding``: the encoding of a lat/lon pair found by inference. ``log``: called with one
        line per field saying which kind it got and whether that was given or inferred.

        An ambiguous name (``day``: of the year or of the month?) is a ConfigError that asks for the kind.
        """
        if isinstance(spec, str):
            if spec != "auto":
                raise ConfigError(f"metadata columns={spec!r}: give 'auto' or a list of column names / "
                                  "{name, kind, ...} mappings")
            if not isinstance(table, SampleTable):
                raise ConfigError("metadata columns='auto' needs the training table to find its meta_ columns")
            entries: list[Any] = list(table.meta_columns) + [c for c in table.attr_columns
                                                             if _bare(c).lower() in _DOY_NAMES + _TOD_NAMES]
        else:
            entries = list(spec)
        # (field, how) in the order of the entries; a lat/lon pair takes the place of its first column
        slots: list[tuple[MetaField, str] | str] = []
        lat: list[str] = []
        lon: list[str] = []
        for i, entry in enumerate(entries):
            if hasattr(entry, "model_dump"):
                entry = entry.model_dump()
            if isinstance(entry, Mapping):
                entry = {str(k): v for k, v in entry.items() if v is not None}
                if "kind" not in entry:  # {name: x} is the name x; other options need the kind they belong to
                    if set(entry) != {"name"}:
                        raise ConfigError(f"metadata column {i} ({entry}): {', '.join(sorted(set(entry) - {'name'}))}"
                                          f" needs an explicit kind (one of: {', '.join(FIELD_KINDS)})")
                    entry = str(entry["name"])
            if isinstance(entry, str):
                col = entry
                b = _bare(col).lower()
                if b in _LAT_NAMES or b in _LON_NAMES:
                    (lat if b in _LAT_NAMES else lon).append(col)
                    if len(lat) + len(lon) == 1:
                        slots.append("latlon")
                    continue
                kind, period, rule = infer_kind(col)
                slots.append((MetaField(kind, (col,), period=period), f"inferred: {rule}"))
            elif isinstance(entry, Mapping):
                slots.append((_field_from_mapping(entry, i, latlon_encoding), "given"))
            else:
                raise ConfigError(f"metadata column {i}: {entry!r} is neither a column name nor a "
                                  "{name, kind, ...} mapping")
        if len(lat) > 1 or len(lon) > 1:
            many = lat if len(lat) > 1 else lon
            raise ConfigError(f"metadata has several {'latitude' if len(lat) > 1 else 'longitude'} columns "
                              f"{many}; give the pair explicitly: {{kind: latlon, columns: [LAT, LON]}}")
        if lat or lon:
            if not (lat and lon):
                raise DataError(f"metadata has {'latitude' if lat else 'longitude'} column {(lat or lon)[0]!r} "
                                f"without its {'longitude' if lat else 'latitude'}; add it, or give the fields "
                                "explicitly")
            pair = (MetaField("latlon", (lat[0], lon[0]), encoding=latlon_encoding),
                    "inferred: a latitude and a longitude name")
            slots = [pair if s == "latlon" else s for s in slots]
        resolved = [s for s in slots if not isinstance(s, str)]
        if not resolved:
            raise DataError("no metadata columns to encode: load the table with metadata_columns=[...] (or give "
                            "the table meta_<name> columns)")
        names = [f.name for f, _ in resolved]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"metadata fields {dup} are given more than once (each field needs its own name)")
        if log is not None:
            for f, how in resolved:
                log(f"metadata field {f.name!r}: {describe_field(f)} ({how})")
        return cls([f for f, _ in resolved])

    @classmethod
    def auto(cls, table: SampleTable | Sequence[str], *, latlon_encoding: str = "sphere") -> MetadataEncoder:
        """Infer one field per metadata column from its name (:func:`infer_kind`, lat/lon pairs).

        ``table``: a SampleTable (its ``meta_*`` columns and date/time-named ``attr_*`` columns) or column
        names. Same as ``from_spec("auto", table)`` / ``from_spec(names)``.
        """
        if isinstance(table, SampleTable):
            return cls.from_spec("auto", table, latlon_encoding=latlon_encoding)
        return cls.from_spec([str(c) for c in table], latlon_encoding=latlon_encoding)

    def describe(self) -> list[str]:
        """One line per field: its name, kind and columns (what the encoder does with each)."""
        return [f"{f.name}: {describe_field(f)}" for f in self.fields]

    @property
    def dim(self) -> int:
        """Number of encoded values D."""
        return sum(f.dim for f in self.fields)

    @property
    def n_components(self) -> int:
        """Number of mask components K (one per field)."""
        return len(self.fields)

    @property
    def component_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def component_index(self) -> np.ndarray:
        """Component of each encoded value: int64 [D]."""
        return np.repeat(np.arange(len(self.fields)), [f.dim for f in self.fields]).astype(np.int64)

    @property
    def fitted(self) -> bool:
        return all(f.mean is not None for f in self.fields if f.kind == "numeric")

    # ------------------------------------------------------------ fit / transform
    def _raw(self, df: pd.DataFrame, f: MetaField) -> list[np.ndarray]:
        cols = [_find_column(df, c) for c in f.columns]
        if f.kind == "latlon":
            lat, lon = _numbers(df, cols[0], "latitude"), _numbers(df, cols[1], "longitude")
            _check_range(lat, -90, 90, cols[0], "latitude in degrees")
            _check_range(lon, -180, 360, cols[1], "longitude in degrees")
            return [lat, lon]
        if f.kind == "day_of_year":
            d = _day_of_year(df, cols[0])
            _check_range(d, 1, 367, cols[0], "day of year, 1 = 1 January")
            return [d]
        if f.kind == "time_of_day":
            h = _hours(df, cols[0])
            _check_range(h, 0, 24, cols[0], "hours since midnight")
            return [h]
        return [_numbers(df, cols[0], f.kind)]

    def fit(self, table: SampleTable) -> MetadataEncoder:
        """Fit the numeric fields' mean and std on ``table`` (the training rows); returns self."""
        for f in self.fields:
            if f.kind != "numeric":
                self._raw(table.df, f)  # validate
                continue
            (x,) = self._raw(table.df, f)
            ok = np.isfinite(x)
            if not ok.any():
                raise DataError(f"metadata field {f.name!r}: no value in the {len(x)} training rows, so it cannot "
                                "be standardised; drop the column or fill some values")
            f.mean = float(x[ok].mean())
            std = float(x[ok].std())
            if not std > 0:
                warnings.warn(f"metadata field {f.name!r} is constant ({f.mean}) in the training rows; it carries "
                              "no information (std set to 1)", stacklevel=2)
                std = 1.0
            f.std = std
        return self

    def transform(self, table: SampleTable) -> EncodedMetadata:
        """Encode every row: values [N, D] and mask [N, K] (see the module docstring)."""
        if not self.fitted:
            raise ConfigError("MetadataEncoder.transform before fit: call fit(train_table) first (numeric fields "
                              "are standardised with the training mean and std)")
        n = len(table)
        values = np.zeros((n, self.dim), dtype=np.float32)
        mask = np.zeros((n, len(self.fields)), dtype=np.float32)
        j = 0
        for k, f in enumerate(self.fields):
            raw = self._raw(table.df, f)
            ok = np.logical_and.reduce([np.isfinite(r) for r in raw])
            enc = self._encode(f, [np.where(ok, r, 0.0) for r in raw])
            values[:, j:j + f.dim] = np.where(ok[:, None], enc, 0.0)
            mask[:, k] = ok
            j += f.dim
        return EncodedMetadata(values, mask)

    def fit_transform(self, table: SampleTable) -> EncodedMetadata:
        return self.fit(table).transform(table)

    @staticmethod
    def _encode(f: MetaField, raw: list[np.ndarray]) -> np.ndarray:
        if f.kind == "latlon":
            lat, lon = np.deg2rad(raw[0]), np.deg2rad(raw[1])
            if f.encoding == "sphere":
                return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
            return np.stack([np.sin(lon), np.cos(lon), np.sin(2 * lat), np.cos(2 * lat)], axis=1)
        if f.kind == "numeric":
            assert f.mean is not None and f.std is not None
            return ((raw[0] - f.mean) / f.std)[:, None]
        if f.kind == "day_of_year":
            angle = 2 * np.pi * (raw[0] - 1.0) / DAYS_PER_YEAR
        elif f.kind == "time_of_day":
            angle = 2 * np.pi * raw[0] / 24.0
        else:
            angle = 2 * np.pi * raw[0] / f.period
        return np.stack([np.sin(angle), np.cos(angle)], axis=1)

    # ------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "fields": [dict(asdict(f), columns=list(f.columns)) for f in self.fields]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> MetadataEncoder:
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ConfigError(f"not a metadata encoder (expected \"format\": {FORMAT_NAME!r})")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise ConfigError(f"metadata encoder format version {data.get('version')} is newer than this taxonomist")
        known = {"kind", "columns", "name", "encoding", "period", "mean", "std"}
        out = []
        for i, d in enumerate(data.get("fields", [])):
            unknown = sorted(set(d) - known)
            if unknown:
                raise ConfigError(f"metadata encoder field {i}: unknown key(s) {unknown}")
            out.append(MetaField(**{**d, "columns": tuple(d["columns"])}))
        return cls(out)


# ----------------------------------------------------------------------------- masking
class MetadataMasker:
    """Hide metadata at random during training with a scheduled probability.

    ``mode="all"``: each sample loses all its components with probability p(step);
    ``"components"``: each component of each sample is dropped independently with p(step).
    Returns a new mask (components already missing stay missing).
    """

    def __init__(self, prob: float | ProbabilitySchedule | dict[str, Any] = 0.5, mode: str = "all",
                 seed: int | None = None) -> None:
        if mode not in ("all", "components"):
            raise ConfigError(f"metadata masking mode={mode!r}; choose 'all' or 'components'")
        self.schedule = ProbabilitySchedule.of(prob)
        self.mode = mode
        self.generator = torch.Generator()
        self.generator.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))

    def __call__(self, mask: torch.Tensor, step: int | float = 0) -> torch.Tensor:
        p = self.schedule(step)
        shape = (mask.shape[0], 1) if self.mode == "all" else tuple(mask.shape)
        keep = torch.rand(shape, generator=self.generator) >= p
        return mask * keep.to(device=mask.device, dtype=mask.dtype)


# ----------------------------------------------------------------------------- fusion
class MetadataFusion(nn.Module):
    """Embed encoded metadata and fuse it with image features (see the module docstring).

    Args:
        image_dim: F, size of the image features.
        component_index: component of each encoded value (``MetadataEncoder.component_index``), length D.
        hidden: width of the MLP's hidden layer; embed_dim: E, size of the metadata embedding.
        mode: ``"concat"`` (output F + E) or ``"gate"`` (output F).
        dropout: dropout on the embedding (training only).
    """

    def __init__(self, image_dim: int, component_index: Sequence[int] | np.ndarray, *, hidden: int = 64,
                 embed_dim: int = 32, mode: str = "concat", dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in ("concat", "gate"):
            raise ConfigError(f"metadata fusion mode={mode!r}; choose 'concat' or 'gate'")
        comp = torch.as_tensor(np.asarray(component_index, dtype=np.int64))
        if comp.ndim != 1 or len(comp) == 0:
            raise ConfigError("metadata fusion: component_index must list the component of each encoded value")
        self.register_buffer("component_index", comp, persistent=False)
        self.meta_dim = int(len(comp))
        self.n_components = int(comp.max()) + 1
        self.image_dim = int(image_dim)
        self.mode = mode
        self.embed = nn.Sequential(nn.Linear(self.meta_dim + self.n_components, hidden), nn.ReLU(),
                                   nn.Linear(hidden, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.gate = nn.Linear(embed_dim, self.image_dim) if mode == "gate" else None
        self.out_features = self.image_dim + embed_dim if mode == "concat" else self.image_dim

    @classmethod
    def from_encoder(cls, encoder: MetadataEncoder, image_dim: int, **kwargs: Any) -> MetadataFusion:
        return cls(image_dim, encoder.component_index, **kwargs)

    def forward(self, features: torch.Tensor, metadata: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [B, F]; ``metadata`` [B, D] and ``mask`` [B, K] (None: no metadata, all masked)."""
        b = features.shape[0]
        if metadata is None:
            metadata = features.new_zeros((b, self.meta_dim))
            mask = features.new_zeros((b, self.n_components))
        elif mask is None:
            mask = features.new_ones((b, self.n_components))
        if metadata.shape != (b, self.meta_dim) or mask.shape != (b, self.n_components):
            raise ConfigError(f"metadata fusion: expected metadata [{b}, {self.meta_dim}] and mask "
                              f"[{b}, {self.n_components}], got {tuple(metadata.shape)} and {tuple(mask.shape)}")
        mask = mask.to(features.dtype)
        values = metadata.to(features.dtype) * mask[:, self.component_index]
        e = self.embed(torch.cat([values, mask], dim=1))
        if self.gate is None:
            return torch.cat([features, e], dim=1)
        return features * (2.0 * torch.sigmoid(self.gate(e)))


# ----------------------------------------------------------------------------- evaluation
def metadata_ablation(predict: Callable[[torch.Tensor], Any], mask: torch.Tensor,
                      component_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``predict(mask)`` with the metadata as given, without any, and (with names) without each component.

    Returns ``{"with": ..., "without": ..., "without_<name>": ...}``: compare the
    metrics of each to see what the model gets from the metadata and whether it
    still works when metadata is missing.
    """
    out: dict[str, Any] = {"with": predict(mask), "without": predict(torch.zeros_like(mask))}
    for k, name in enumerate(component_names or []):
        m = mask.clone()
        m[:, k] = 0
        out[f"without_{name}"] = predict(m)
    return out
