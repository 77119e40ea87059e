"""Attribute heads: one linear classifier per categorical attribute on the shared embedding.

The design documents' generic multi-head model: one shared backbone and neck, named
heads each with its own class count (life stage, sex, view, ...), each trained with its
own criterion and loss weight. :class:`AttributeHeads` adds them next to the taxonomic
head; its outputs are keyed ``"attr/<name>"`` (logits ``[B, n_classes]``) and merged into
the model's outputs dict, so a loss and the task weighting see them like any other task.
Targets for them travel separately from the taxonomy targets (class indices, ``-1`` =
missing); see the attribute loss in ``taxonomist.losses``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from ...errors import ConfigError

ATTRIBUTE_PREFIX = "attr/"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def attribute_key(name: str) -> str:
    """Output (and task) key of an attribute: ``"attr/<name>"``."""
    return f"{ATTRIBUTE_PREFIX}{name}"


class AttributeHeads(nn.Module):
    """``{name: n_classes}`` -> one ``Linear(in_features, n_classes)`` per attribute.

    ``forward(h)`` returns ``{"attr/<name>": logits}``. Names are letters, digits, ``_``
    or ``-`` starting with a letter; every attribute needs at least 2 classes.
    Options: ``dropout`` on the input (0).
    """

    def __init__(self, in_features: int, attributes: Mapping[str, int], dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(attributes, Mapping) or not attributes:
            raise ConfigError("model.attributes must be a non-empty mapping of attribute name -> number of classes, "
                              "e.g. {life_stage: 3, sex: 2}")
        for name, n in attributes.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"model.attributes: attribute name {name!r} must start with a letter and contain "
                                  "only letters, digits, '_' or '-'")
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ConfigError(f"model.attributes.{name}={n!r} must be an integer >= 2 (its number of classes)")
        self.in_features = int(in_features)
        self.n_classes: dict[str, int] = {str(k): int(v) for k, v in attributes.items()}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = nn.ModuleDict({k: nn.Linear(self.in_features, v) for k, v in self.n_classes.items()})

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(attribute_key(k) for k in self.n_classes)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        h = self.dropout(features)
        return {attribute_key(k): layer(h) for k, layer in self.heads.items()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, attributes={self.n_classes}"
