"""From a config to the things the loop needs: the training taxonomy and the sample tables.

The training taxonomy is the user's tree restricted to what the training data
uses (plus ancestors), with label nodes chosen by ``taxonomy.label_nodes``.
Validation/test samples whose class was never seen in training are moved to
their nearest ancestor in the training tree (so they are scored as partial
truths) and counted in the report: nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import SampleTable, load_samples, split_samples
from ..errors import ConfigError, DataError
from ..taxonomy import Taxonomy, load
from ..taxonomy.transforms import restrict
from .config import Config


@dataclass
class PreparedData:
    taxonomy: Taxonomy
    train: SampleTable
    val: SampleTable | None
    test: SampleTable | None
    notes: list[str] = field(default_factory=list)


def flat_taxonomy_from_folder(root: Path) -> Taxonomy:
    """A one-level tree (root -> each sub-folder name) for image folders without a tree file."""
    names = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no label sub-folders found; give taxonomy.path or a folder of <label>/ folders")
    return Taxonomy.from_parents([-1] + [0] * len(names), ["root"] + names)


def load_user_taxonomy(cfg: Config) -> Taxonomy:
    if cfg.taxonomy.path:
        return load(cfg.taxonomy.path, format=cfg.taxonomy.format)
    train = Path(cfg.data.train)
    if train.is_dir():
        return flat_taxonomy_from_folder(train)
    raise ConfigError("taxonomy.path is required unless data.train is an image folder (a flat tree is then "
                      "built from its sub-folder names)")


def _load_table(source: str, tax: Taxonomy, cfg: Config, notes: list[str]) -> SampleTable:
    table = load_samples(source, tax, image_root=cfg.data.image_root, on_error=cfg.data.on_error,
                         verify_images=cfg.data.verify_images)
    report = getattr(table, "report", None)
    if report is not None and (not report.ok or report.notes):
        notes.append(f"{source}:\n{report}")
    return table


def nearest_kept_ancestor(tax: Taxonomy, old_to_new: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Map nodes of ``tax`` through ``old_to_new``; removed nodes go to their nearest kept ancestor."""
    cur = np.asarray(nodes, dtype=np.int64).copy()
    valid = cur >= 0
    out = np.full(len(cur), -1, dtype=np.int64)
    pending = valid.copy()
    while pending.any():
        mapped = old_to_new[cur[pending]]
        idx = np.flatnonzero(pending)
        hit = mapped >= 0
        out[idx[hit]] = mapped[hit]
        pending[idx[hit]] = False
        cur[idx[~hit]] = tax.parent[cur[idx[~hit]]]
    return out


def prepare_data(cfg: Config) -> PreparedData:
    full = load_user_taxonomy(cfg)
    notes: list[str] = []
    train = _load_table(cfg.data.train, full, cfg, notes)
    val = _load_table(cfg.data.val, full, cfg, notes) if cfg.data.val else None
    test = _load_table(cfg.data.test, full, cfg, notes) if cfg.data.test else None
    if val is None and (cfg.data.split.val > 0 or cfg.data.split.test > 0):
        split = split_samples(train, val=cfg.data.split.val, test=cfg.data.split.test, seed=cfg.data.split.seed)
        train, val = split.subset("train"), split.subset("val")
        if cfg.data.split.test > 0 and test is None:
            test = split.subset("test")
        notes.append(f"split {len(split)} samples into train {len(train)} / val {len(val)}"
                     + (f" / test {len(test)}" if test is not None else "") + f" (seed {cfg.data.split.seed})")
    train_nodes = train.nodes()
    if (train_nodes < 0).any():
        raise DataError(f"{cfg.data.train}: {(train_nodes < 0).sum()} training samples have no label")
    observed = np.unique(train_nodes)

    if cfg.taxonomy.restrict_to_observed:
        res = restrict(full, observed)
        tax, old_to_new = res.taxonomy, res.old_to_new
        dropped = full.n_nodes - tax.n_nodes
        if dropped:
            notes.append(f"taxonomy restricted to the {tax.n_nodes} nodes the training data uses "
                         f"(of {full.n_nodes}; {dropped} unused nodes left out)")
    else:
        tax, old_to_new = full, np.arange(full.n_nodes)

    new_observed = old_to_new[observed]
    mode = cfg.taxonomy.label_nodes
    if mode == "observed":
        tax = tax.with_labels(new_observed)
    elif mode == "leaves":
        tax = tax.with_labels(tax.leaves)
    else:  # "file": the tree file's own label nodes; every observed node must be a label or above one
        covered = tax.subtree_sum(tax.is_label.astype(np.float64)) > 0
        bad = new_observed[~covered[new_observed]]
        if len(bad):
            raise ConfigError(f"taxonomy.label_nodes=file, but {len(bad)} training classes have no label node at or "
                              f"below them (e.g. {', '.join(map(str, tax.names[bad[:5]]))}); use label_nodes=observed")
    n_internal = int((~tax.is_leaf[tax.label_ids]).sum())
    notes.append(f"{tax.n_labels} label nodes ({n_internal} internal), tree depth {tax.max_depth}")
    partial = ~tax.is_label[new_observed]
    if partial.any():
        notes.append(f"{int(partial.sum())} training classes sit above the label nodes and train as partial labels")

    train = train.with_nodes(old_to_new[train_nodes])
    out_tables = []
    for name, table in (("val", val), ("test", test)):
        if table is None:
            out_tables.append(None)
            continue
        nodes = table.nodes()
        mapped = nearest_kept_ancestor(full, old_to_new, nodes)
        moved = (nodes >= 0) & (old_to_new[np.maximum(nodes, 0)] < 0)
        if moved.any():
            classes = sorted({str(full.names[n]) for n in nodes[moved]})
            notes.append(f"{int(moved.sum())} {name} samples of {len(classes)} classes never seen in training are "
                         f"scored at their nearest trained ancestor ({', '.join(classes[:5])}"
                         f"{', ...' if len(classes) > 5 else ''})")
        out_tables.append(table.with_nodes(mapped))
    return PreparedData(tax, train, out_tables[0], out_tables[1], notes)
