"""Categorical attribute targets (``attr_<name>`` table columns) for attribute heads.

An attribute is any per-sample category trained beside the taxonomy (life stage,
sex, image view, ...). Its classes are the distinct non-empty values of the
training table's ``attr_<name>`` column, sorted; an empty cell means "unknown"
(target ``-1``, ignored by the loss). A value in a validation table that the
training table never had is unknown too, and counted in the returned notes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from .table import ATTR_PREFIX, SampleTable

OUTPUT_PREFIX = "attr/"


def _column(table: SampleTable, name: str, where: str) -> pd.Series:
    bare = bare_name(name)
    col = ATTR_PREFIX + bare
    if col not in table.df.columns:
        have = ", ".join(table.attr_columns) or "none"
        raise DataError(f"{where}: model.attributes names {bare!r} but the table has no {col!r} column "
                        f"(attribute columns: {have}); add the column or remove the attribute")
    return table.df[col]


def _values(series: pd.Series) -> np.ndarray:
    """Values as strings with missing cells (NaN, None, blank) as ''."""
    s = series.astype("string").fillna("").str.strip()
    return s.to_numpy(dtype=object)


def bare_name(name: str) -> str:
    return name[len(ATTR_PREFIX):] if name.startswith(ATTR_PREFIX) else name


def attribute_vocab(table: SampleTable, names: Sequence[str], where: str = "training data") -> dict[str, list[str]]:
    """``{name: sorted class values}`` from the training table; each attribute needs at least two values."""
    vocab: dict[str, list[str]] = {}
    for name in names:
        vals = _values(_column(table, name, where))
        classes = sorted({v for v in vals if v})
        if len(classes) < 2:
            raise DataError(f"{where}: attribute {bare_name(name)!r} has {len(classes)} distinct value(s) "
                            f"({classes}); a classifier needs at least two")
        vocab[bare_name(name)] = classes
    return vocab


def attribute_targets(table: SampleTable, vocab: dict[str, list[str]],
                      where: str = "data") -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({"attr/<name>": LongTensor[N]}, notes)``; ``-1`` = unknown (empty or unseen value)."""
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for name, classes in vocab.items():
        vals = _values(_column(table, name, where))
        codes = pd.Index(classes).get_indexer(vals).astype(np.int64)  # -1 for '' and unseen values
        unseen = (codes < 0) & (vals != "")
        if unseen.any():
            examples = sorted(set(vals[unseen]))[:5]
            notes.append(f"{where}: {int(unseen.sum())} value(s) of attribute {name!r} never seen in training "
                         f"({', '.join(examples)}) are treated as unknown")
        out[OUTPUT_PREFIX + name] = torch.from_numpy(codes)
    return out, notes


def attribute_accuracy(logits: dict[str, torch.Tensor] | dict[str, np.ndarray],
                       targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top-1 accuracy per attribute over the samples whose attribute is known (``attr/<name>/top1``)."""
    out: dict[str, float] = {}
    for key, y in targets.items():
        pred = torch.as_tensor(logits[key]).argmax(dim=1)
        known = y >= 0
        if known.any():
            out[f"{key}/top1"] = float((pred[known] == y[known]).double().mean())
    return out
