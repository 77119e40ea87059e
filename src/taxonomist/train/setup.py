"""From a config to the things the loop needs: the training taxonomy and the sample tables.

The training taxonomy is the user's tree restricted to what the training data
uses (plus ancestors), with label nodes chosen by ``taxonomy.label_nodes``.
Validation/test samples whose class was never seen in training are moved to
their nearest ancestor in the training tree (so they are scored as partial
truths) and counted in the report: nothing is silently dropped.

A training table with a split column is split as that column says (every row
must name its split); only a table without one is split by ``data.split``.
``prepare_data`` also runs the start-up checks that must not wait for the first
epoch: a resumed run folder's configuration (the changed keys are named) and
``checkpoint.best_metric`` (a key the metric suite reports for this tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from ..data import SampleTable, load_samples, split_samples
from ..errors import ConfigError, DataError
from ..taxonomy import Taxonomy, load
from ..taxonomy.transforms import restrict
from ..utils.io import remove_stale_temp_files
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
    notes: list[str] = []
    check_resume(cfg, notes)  # before any data is read: a refused resume costs nothing
    full = load_user_taxonomy(cfg)
    train = _load_table(cfg.data.train, full, cfg, notes)
    val = _load_table(cfg.data.val, full, cfg, notes) if cfg.data.val else None
    test = _load_table(cfg.data.test, full, cfg, notes) if cfg.data.test else None
    if has_split_column(train):
        train, val, test = split_from_column(cfg, train, val, test, notes)
    elif val is None and (cfg.data.split.val > 0 or cfg.data.split.test > 0):
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
    check_best_metric(cfg, tax)
    return PreparedData(tax, train, out_tables[0], out_tables[1], notes)


# ------------------------------------------------------------------ resuming a run folder
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_changes(old: Config, new: Config) -> list[str]:
    """``key: old -> new`` for each config key whose change blocks a resume (changes ``config_hash``)."""
    from .loop import config_hash  # the loop's hash decides; imported here to avoid a cycle

    base = config_hash(old)
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        one = old.model_dump(mode="json")  # the old config with only this key changed: does the hash move?
        node = one
        *parents, last = key.split(".")
        try:
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = b.get(key)
            neutral = config_hash(Config.model_validate(one)) == base
        except (ValidationError, TypeError, AttributeError):
            neutral = False
        if not neutral:
            changes.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return changes


def check_resume(cfg: Config, notes: list[str]) -> None:
    """Before resuming ``cfg.run_dir``: remove the temp files an interrupted atomic write left in its
    checkpoints folder, and refuse a changed configuration naming the keys that changed."""
    ckpt = cfg.run_dir / "checkpoints"
    stale = remove_stale_temp_files(ckpt)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write from {ckpt}: "
                     + ", ".join(p.name for p in stale[:5]) + (", ..." if len(stale) > 5 else ""))
    old_path = cfg.run_dir / "config.yaml"
    if not (ckpt / "last.pt").exists() or not old_path.exists():
        return
    try:
        old = Config.model_validate(yaml.safe_load(old_path.read_text()))
    except (ValidationError, yaml.YAMLError):
        return  # an older or hand-edited config.yaml: the loop's checkpoint hash still decides
    changes = config_changes(old, cfg)
    if changes:
        raise ConfigError(
            f"{cfg.run_dir} holds a run with a different configuration, so it cannot be resumed. Changed "
            f"(run folder -> now): {'; '.join(changes)}. Use another name (name=...), or delete {cfg.run_dir} "
            "to start over.")


# ------------------------------------------------------------------ the table's own split column
def has_split_column(table: SampleTable) -> bool:
    """True when any row of the table names its split (train/val/test)."""
    return bool((table.df["split"].astype(str) != "").any())


def split_from_column(cfg: Config, table: SampleTable, val: SampleTable | None, test: SampleTable | None,
                      notes: list[str]) -> tuple[SampleTable, SampleTable | None, SampleTable | None]:
    """(train, val, test) from the split column of data.train (docs/data.md, 'Splits').

    Every row must name its split: a row with an empty split is an error naming the first such rows
    (it would otherwise be trained on, or dropped, without the user having said so). Rows marked val
    (test) while data.val (data.test) is also given are an error too: two validation sets for one run.
    """
    marks = table.df["split"].astype(str).to_numpy()
    source = cfg.data.train
    empty = np.flatnonzero(marks == "")
    if len(empty):
        first = ", ".join(f"{table.df['path'].iloc[i]}" for i in empty[:5])
        raise DataError(f"{source}: the split column names the split of {len(marks) - len(empty)} rows but is empty "
                        f"for {len(empty)} (first: {first}). Give every row train, val or test, or remove the "
                        f"split column to have taxonomist split the table (data.split.val / data.split.test)")
    counts = {s: int((marks == s).sum()) for s in ("train", "val", "test")}
    for name, given in (("val", val), ("test", test)):
        if counts[name] and given is not None:
            raise ConfigError(f"data.train={source} marks {counts[name]} rows split={name}, and data.{name} is "
                              f"given too; use one of them (remove data.{name}, or mark those rows train)")
    if not counts["train"]:
        raise DataError(f"{source}: the split column marks no row 'train' ({counts['val']} val, {counts['test']} "
                        "test); mark the training rows train")
    train = table.subset("train")
    if val is None and counts["val"]:
        val = table.subset("val")
    if test is None and counts["test"]:
        test = table.subset("test")
    used = [f"train {counts['train']}"] + [f"{k} {counts[k]}" for k in ("val", "test") if counts[k]]
    note = f"{source}: split as its split column says: {' / '.join(used)} (data.split fractions not used)"
    if val is None:
        note += "; no validation rows and no data.val: no validation metrics, the last epoch is the result"
    notes.append(note)
    return train, val, test


# ------------------------------------------------------------------ checkpoint.best_metric
_COUNT_KEYS = ("n", "n_excluded", "n_samples", "n_unknown", "n_label_truth", "n_partial_truth")


def validation_metric_keys(cfg: Config, tax: Taxonomy) -> list[str]:
    """The keys validation reports for this taxonomy, ranks and attributes (without the sample counts).

    Computed by the metric suite itself on two dummy rows, so they are exactly the keys of an epoch's
    ``val/`` columns (per-level keys depend on the tree's ranks or depth and on ``ranks``).
    """
    from ..metrics import compute_metrics

    probs = np.full((2, tax.n_labels), 1.0 / tax.n_labels)
    truth = np.asarray(tax.label_ids)[[0, -1]]
    keys = [k for k in compute_metrics(tax, probs, truth, ranks=cfg.ranks) if k.rsplit("/", 1)[-1] not in _COUNT_KEYS]
    return keys + [f"attr/{name}/top1" for name in cfg.model.attributes]


def check_best_metric(cfg: Config, tax: Taxonomy) -> None:
    """checkpoint.best_metric must be a key validation reports: checked before any feature is computed."""
    name = cfg.checkpoint.best_metric
    keys = validation_metric_keys(cfg, tax)
    if name in keys:
        return
    plain = [k for k in keys if "/" not in k]
    per_level = [k for k in keys if "/" in k and not k.startswith("attr/")]
    levels = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in per_level))
    level_metrics = list(dict.fromkeys(k.rsplit("/", 1)[1] for k in per_level))
    attrs = [k for k in keys if k.startswith("attr/")]
    hint = " (without the 'val/' prefix)" if name.startswith("val/") else ""
    raise ConfigError(
        f"checkpoint.best_metric={name!r} is not a validation metric of this run{hint}; choose one of: "
        f"{', '.join(plain)}"
        + (f"; or <level>/<metric> with <level> one of {', '.join(levels)} and <metric> one of "
           f"{', '.join(level_metrics)} (e.g. {per_level[0]})" if per_level else "")
        + (f"; or {', '.join(attrs)}" if attrs else ""))
