"""Flat metrics, per rank (or per depth level) and at the label level.

Per level ``r`` (a rank such as ``genus``, or ``level<d>`` for an unranked tree):

* the probability of each node at that level is the summed probability of its
  subtree (``label_probs @ M``, the taxonomy's marginalisation matrix);
* the level's prediction is the most probable node of that level, its top-k the
  k most probable (ties broken by lower node id, i.e. ``argsort`` stable order);
* the level's truth is the truth node's ancestor-or-self at that level. Samples
  whose truth stops above the level (a photo known only to family has no genus),
  or whose lineage skips it, are excluded from that level's scores and counted
  in ``n_excluded``.

Balanced accuracy is the mean per-class recall over the classes present in the
truth, and macro-F1 the mean per-class F1 over the classes present in the truth
or the predictions, with F1 = 0 for a class never predicted correctly — the
definitions of scikit-learn's ``balanced_accuracy_score`` and
``f1_score(average="macro", zero_division=0)`` (Brodersen et al., ICPR 2010;
Sokolova & Lapalme, 2009).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..taxonomy import Taxonomy
from ._common import (
    CHUNK_ELEMS,
    Levels,
    LevelScan,
    check_label_probs,
    check_nodes,
    known_mask,
    resolve_levels,
    scan_nodes,
    stable_position,
)


@dataclass(frozen=True)
class LevelPredictions:
    """Per-sample predictions at one level.

    ``truth``/``pred`` are node ids (``truth = -1`` for excluded samples),
    ``confidence`` the predicted node's probability, and ``position`` the place
    of the true node in the level's probability ranking (0 = top-1; -1 when excluded).
    """

    name: str
    nodes: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    position: np.ndarray

    @property
    def included(self) -> np.ndarray:
        return self.truth >= 0

    def topk_accuracy(self, k: int) -> float:
        inc = self.included
        return float(np.mean(self.position[inc] < k)) if inc.any() else float("nan")


def level_predictions(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray,
                      ranks: Sequence[str] | None = None, levels: Levels | None = None,
                      chunk_elems: int = CHUNK_ELEMS) -> list[LevelPredictions]:
    """Argmax, confidence and truth position at every level.

    One marginalisation per row chunk gives the probability of every node; each
    level then reads its own columns.
    """
    label_probs = check_label_probs(tax, label_probs)
    truth = check_nodes(tax, truth, "truth", n=len(label_probs))
    levels = levels or resolve_levels(tax, ranks)
    nodes, truths, tcols = level_truths(tax, truth, levels)
    scans, _ = scan_nodes(tax, label_probs, nodes, tcols, chunk_elems=chunk_elems)
    return level_results(levels, nodes, truths, scans)


def level_truths(tax: Taxonomy, truth: np.ndarray, levels: Levels
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per level: its node ids, each sample's truth at that level (-1 excluded) and its column."""
    known = known_mask(truth)
    n = len(truth)
    nodes_l, truths, tcols = [], [], []
    for j in range(len(levels.names)):
        nodes = levels.nodes(j)
        t = np.where(known, levels.view[np.maximum(truth, 0), j], -1) if len(nodes) else np.full(n, -1)
        loc = np.full(tax.n_nodes, -1, dtype=np.int64)
        loc[nodes] = np.arange(len(nodes))
        nodes_l.append(nodes)
        truths.append(t)
        tcols.append(np.where(t >= 0, loc[np.maximum(t, 0)], -1))
    return nodes_l, truths, tcols


def level_results(levels: Levels, nodes: list[np.ndarray], truths: list[np.ndarray],
                  scans: list[LevelScan]) -> list[LevelPredictions]:
    return [LevelPredictions(name, nodes[j], truths[j], scans[j].pred, scans[j].confidence, scans[j].position)
            for j, name in enumerate(levels.names)]


@dataclass(frozen=True)
class ClassReport:
    """Per-class counts and scores at one level (arrays aligned with ``node``)."""

    name: str
    node: np.ndarray
    support: np.ndarray
    n_pred: np.ndarray
    tp: np.ndarray

    @property
    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_pred > 0, self.tp / np.maximum(self.n_pred, 1), np.nan)

    @property
    def recall(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.support > 0, self.tp / np.maximum(self.support, 1), np.nan)

    @property
    def f1(self) -> np.ndarray:
        den = self.support + self.n_pred
        return np.where(den > 0, 2 * self.tp / np.maximum(den, 1), np.nan)

    def balanced_accuracy(self) -> float:
        """Mean recall over the classes present in the truth."""
        r = self.recall[self.support > 0]
        return float(r.mean()) if len(r) else float("nan")

    def macro_f1(self) -> float:
        """Mean F1 over classes in the truth or the predictions (F1 = 2TP / (2TP + FP + FN))."""
        f = self.f1[(self.support + self.n_pred) > 0]
        return float(f.mean()) if len(f) else float("nan")

    def to_dict(self) -> dict[str, list]:
        """JSON-ready columns (NaN -> None)."""
        def clean(a: np.ndarray) -> list:
            return [None if not np.isfinite(x) else float(x) for x in a]
        return {"node": self.node.tolist(), "support": self.support.tolist(), "n_pred": self.n_pred.tolist(),
                "tp": self.tp.tolist(), "precision": clean(self.precision), "recall": clean(self.recall),
                "f1": clean(self.f1)}


def class_report(tax: Taxonomy, lp: LevelPredictions) -> ClassReport:
    """Per-class support / predicted count / true positives at one level, by node id (bincounts)."""
    inc = lp.included
    t, p = lp.truth[inc], lp.pred[inc]
    support = np.bincount(t, minlength=tax.n_nodes)
    n_pred = np.bincount(p, minlength=tax.n_nodes)
    tp = np.bincount(t[t == p], minlength=tax.n_nodes)
    nodes = lp.nodes
    return ClassReport(lp.name, nodes, support[nodes], n_pred[nodes], tp[nodes])


def per_class_report(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray,
                     ranks: Sequence[str] | None = None) -> dict[str, ClassReport]:
    """Per-class precision/recall/F1 by node id for every level (``report[level].precision`` ...)."""
    return {lp.name: class_report(tax, lp) for lp in level_predictions(tax, label_probs, truth, ranks)}


def label_positions(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray,
                    chunk_elems: int = CHUNK_ELEMS) -> np.ndarray:
    """Position of the true label in each row's label ranking (0 = argmax); -1 if truth is not a label."""
    label_probs = check_label_probs(tax, label_probs)
    truth = check_nodes(tax, truth, "truth", n=len(label_probs))
    col = np.where(known_mask(truth), tax.label_index[np.maximum(truth, 0)], -1)
    out = np.empty(len(truth), dtype=np.int64)
    rows = max(1, chunk_elems // max(tax.n_labels, 1))
    for lo in range(0, len(truth), rows):
        hi = min(len(truth), lo + rows)
        out[lo:hi] = stable_position(label_probs[lo:hi], col[lo:hi])
    return out


def topk_accuracy(tax: Taxonomy, label_probs: np.ndarray, truth: np.ndarray, k: int = 1) -> float:
    """Label-level top-k accuracy over the samples whose truth is a label node (NaN if none)."""
    pos = label_positions(tax, label_probs, truth)
    inc = pos >= 0
    return float(np.mean(pos[inc] < k)) if inc.any() else float("nan")
