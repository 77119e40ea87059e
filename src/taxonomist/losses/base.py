"""The loss interface and its registry.

A loss is built as ``create_loss(name, taxonomy, head, **options)`` and called
as ``loss(outputs, target_nodes, extra_targets=None) -> dict[str, Tensor]``: one
scalar per task. ``extra_targets`` carries targets that are not taxonomy nodes,
by output key (e.g. ``{"attr/colour": LongTensor[B]}``, ``-1`` = missing); losses
that do not use them ignore them.
``target_nodes`` are node ids at any depth (``-1`` = unlabelled, ignored): a
label node means "this label", a node above labels is a partial label ("one of
the labels under this node"). A target with no label at or below it cannot be
trained on and is an error naming the node.

A task with no usable target in the batch still returns a zero that is
connected to the graph (every head output gets a zero gradient), so DDP never
sees a parameter left out of the loss.

Add a loss with ``@register_loss("name")`` on a :class:`Loss` subclass whose
constructor is ``(taxonomy, head, **options)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DataError
from ..models.heads.base import Head
from ..models.registry import Registry
from ..models.tree_tensors import covered_nodes, describe_nodes
from ..taxonomy import Taxonomy

LOSSES: Registry[Loss] = Registry("loss")


def register_loss(name: str):
    """Class decorator registering a :class:`Loss` subclass under ``name``."""
    return LOSSES.register(name)


def create_loss(name: str, taxonomy: Taxonomy, head: Head, **cfg: Any) -> Loss:
    """Build the loss registered as ``name`` for ``head``; unknown names/options raise ConfigError."""
    return LOSSES.create(name, taxonomy, head, **cfg)


def list_losses() -> list[str]:
    """Names of the registered losses."""
    return LOSSES.names()


def loss_options(name: str) -> dict[str, Any]:
    """Options of a loss with their defaults."""
    return LOSSES.options(name, skip=2)


def connected_zero(outputs: dict[str, Tensor]) -> Tensor:
    """A float32 zero that depends on every output (zero gradients, never NaN for finite outputs)."""
    parts = [v.float().sum() * 0.0 for v in outputs.values()]
    if not parts:
        raise ValueError("no outputs")
    return torch.stack(parts).sum()


class Loss(nn.Module, ABC):
    """Base class: keeps the taxonomy and a reference to the head (not a sub-module,
    so the head's parameters are neither duplicated nor saved with the loss), and
    validates targets."""

    registry_name: ClassVar[str] = ""

    def __init__(self, taxonomy: Taxonomy, head: Head) -> None:
        super().__init__()
        if head.taxonomy.fingerprint != taxonomy.fingerprint:
            raise ValueError("the loss and the head were built on different taxonomies "
                             f"({taxonomy.fingerprint} vs {head.taxonomy.fingerprint})")
        self.taxonomy = taxonomy
        self.__dict__["head"] = head
        self.register_buffer("_covered", torch.from_numpy(covered_nodes(taxonomy)), persistent=False)
        self.check_on_device = True
        """Check targets on an accelerator in every forward (one host sync per call). The training loop
        turns it off after checking every training target once on the CPU (:func:`check_target_ids`);
        targets on the CPU are always checked (no sync)."""

    head: Head

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Names of the scalars ``forward`` returns."""

    @abstractmethod
    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-task scalar losses (float32) from the head's outputs, target node ids ``[B]``
        (any depth, ``-1`` = unlabelled) and optional non-taxonomy targets by output key."""

    def set_step(self, step: int) -> None:
        """The training step (micro-batches so far), for losses with a schedule; the loop calls it
        before every forward. Default: no schedule."""

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """The head's normalised label log-probabilities, float32 ``[B, n_labels]``."""
        return self.head.label_log_probs(outputs).float()

    def check_targets(self, targets: Tensor) -> None:
        """Raise DataError for target ids outside the tree or with no label at or below them
        (on an accelerator only while :attr:`check_on_device`)."""
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise DataError(f"target nodes must be integer node ids, got dtype {targets.dtype}")
        if targets.device.type != "cpu" and not self.check_on_device:
            return
        n = self.taxonomy.n_nodes
        out_of_range = (targets < -1) | (targets >= n)
        uncovered = (targets >= 0) & ~self._covered[targets.clamp(0, n - 1)]
        bad = out_of_range | uncovered
        if bool(bad.any()):
            _raise_bad_targets(self.taxonomy, targets[bad].cpu().numpy())


def check_target_ids(taxonomy: Taxonomy, ids: np.ndarray, where: str = "") -> None:
    """The check of :meth:`Loss.check_targets` on a numpy array of target node ids (a whole split, once);
    ``where`` names the data in the error (e.g. ``"training data"``)."""
    ids = np.asarray(ids)
    n = taxonomy.n_nodes
    bad = (ids < -1) | (ids >= n)
    inside = (ids >= 0) & ~bad
    bad[inside] = ~covered_nodes(taxonomy)[ids[inside]]
    if bad.any():
        _raise_bad_targets(taxonomy, ids[bad], where)


def _raise_bad_targets(taxonomy: Taxonomy, ids: np.ndarray, where: str = "") -> None:
    n = taxonomy.n_nodes
    at = f" in the {where}" if where else ""
    outside = ids[(ids < -1) | (ids >= n)]
    if len(outside):
        raise DataError(f"{len(outside)} target(s){at} are not node ids of this taxonomy (0..{n - 1}, or -1 "
                        f"for unlabelled): {np.unique(outside)[:5].tolist()}")
    raise DataError(
        f"{len(ids)} target(s){at} have no label node at or below them, so no prediction can match them: "
        f"{describe_nodes(taxonomy, ids)}. These nodes sit below the label nodes: relabel those "
        "samples to a label above them, or make them labels (taxonomy.label_nodes=observed).")


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the rows where ``valid``; 0 (still connected to ``values``) when none is.

    Rows that are not valid are selected away with ``torch.where`` (zero gradient); compute them
    from a harmless stand-in (e.g. a clamped target) so their own backward stays finite.
    """
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp(min=1)
