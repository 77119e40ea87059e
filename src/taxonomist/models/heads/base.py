"""The head interface and its registry.

A head turns a feature vector into raw outputs (``dict[str, Tensor]`` by task
name) and knows how to read them as a distribution over the taxonomy's label
nodes. Everything downstream (losses, metrics, decisions, the bundle) uses only:

* ``forward(features) -> dict[str, Tensor]``
* ``label_log_probs(outputs) -> Tensor[B, n_labels]``: log-probabilities over
  ``taxonomy.label_ids`` (rows sum to 1 after ``exp``)
* ``node_probs(outputs) -> Tensor[B, n_nodes]``: the probability of every node,
  i.e. the mass of its subtree; by default ``exp(label_log_probs) @ M`` with
  ``M = taxonomy.marginalization_matrix()``.

A head that needs the training targets inside its forward (a margin on the true
class, ArcFace) sets ``uses_targets = True`` and takes ``forward(features, targets=None)``
(target node ids at any depth, ``-1`` = unlabelled); :class:`TaxonomistModel` then passes
them on.

Add a head with ``@register_head("name")`` on a :class:`Head` subclass whose
constructor is ``(taxonomy, in_features, **options)``; ``create_head`` validates
the options and ``list_heads`` shows it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from ...taxonomy import Taxonomy, TaxonomyError
from ..registry import Registry
from ..tree_tensors import Marginalizer

HEADS: Registry[Head] = Registry("head")


def register_head(name: str):
    """Class decorator registering a :class:`Head` subclass under ``name``."""
    return HEADS.register(name)


def create_head(name: str, taxonomy: Taxonomy, in_features: int, **cfg: Any) -> Head:
    """Build the head registered as ``name``; unknown names/options raise ConfigError."""
    return HEADS.create(name, taxonomy, int(in_features), **cfg)


def list_heads() -> list[str]:
    """Names of the registered heads."""
    return HEADS.names()


def head_options(name: str) -> dict[str, Any]:
    """Options of a head with their defaults (for docs and `taxonomist list heads`)."""
    return HEADS.options(name, skip=2)


class Head(nn.Module, ABC):
    """Base class of every head. Subclasses set up their layers and implement
    :meth:`forward` and :meth:`label_log_probs`; :meth:`node_probs` comes for free.

    ``tasks`` lists the output keys (the task names the losses and logs use).
    The taxonomy is kept as a plain attribute (not in the state dict); all tensors
    derived from it are non-persistent buffers.
    """

    registry_name: ClassVar[str] = ""
    uses_targets: ClassVar[bool] = False
    """True for heads whose ``forward(features, targets=None)`` uses the target node ids."""

    def __init__(self, taxonomy: Taxonomy, in_features: int) -> None:
        super().__init__()
        if taxonomy.n_labels == 0:
            raise TaxonomyError("the taxonomy has no label nodes; a head needs at least one label to predict "
                                "(check taxonomy.label_nodes and the training data)")
        self.taxonomy = taxonomy
        self.in_features = int(in_features)
        self.n_labels = taxonomy.n_labels
        self.n_nodes = taxonomy.n_nodes
        self.marginalizer = Marginalizer(taxonomy)

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Names of the outputs ``forward`` returns."""

    @abstractmethod
    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """[B, in_features] -> raw outputs by task name."""

    @abstractmethod
    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """Normalised log-probabilities over label nodes, [B, n_labels], float32."""

    def target_log_likelihood(self, outputs: dict[str, Tensor], targets: Tensor) -> Tensor | None:
        """``log P(target | x)`` per sample, [B] float32, or None where the head has no shortcut.

        ``targets`` are node ids >= 0 (the caller clamps ``-1``). For a label target it is
        ``label_log_probs[:, label_index[t]]``; for a partial target (a node above the labels) the
        log of the summed probability of the labels under it. A head whose structure gives this
        without the full ``[B, n_labels]`` distribution (a path product, a tree recursion) returns
        it, and ``ce`` (without label smoothing) uses it instead of :meth:`label_log_probs`; it
        must equal the value computed from :meth:`label_log_probs` (tests check every head that
        has one). Default: None.
        """
        return None

    def label_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.label_log_probs(outputs).exp()

    def node_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        """Probability of every node (its subtree's label mass), [B, n_nodes]; the root is 1."""
        return self.marginalizer(self.label_probs(outputs))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_labels={self.n_labels}, tasks={list(self.tasks)}"
