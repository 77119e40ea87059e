"""Losses for extra categorical attribute heads, and the composite loss that joins them to the
taxonomy loss.

An attribute head output is keyed ``"attr/<name>"`` (logits ``[B, n_classes]``); its targets
come through ``extra_targets={"attr/<name>": LongTensor[B]}`` with ``-1`` = missing.

``attribute_ce``: one cross-entropy per attribute, each its own task (so task weighting and the
logs see them separately), mean over the samples that have the attribute. Label smoothing is one
number for every attribute or ``{name: eps}`` per attribute (the config's
``loss.attribute_label_smoothing``): with ``C`` classes the target is ``1 - eps + eps / C`` on the
true class and ``eps / C`` on each other one, i.e. ``(1 - eps) * CE + eps * mean_c(-log p_c)``.

``composite``: the main taxonomy loss plus ``attribute_ce``, as one loss whose tasks are the
union, so the training loop calls a single loss. :func:`with_attribute_losses` wraps a loss in a
``CompositeLoss`` exactly when the model has attribute heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..models.heads.base import Head
from ..taxonomy import Taxonomy
from .base import LOSSES, Loss, register_loss

PREFIX = "attr/"


def attribute_outputs(head: Head) -> list[str]:
    """The head's attribute output keys (``attr/<name>``)."""
    return [t for t in head.tasks if t.startswith(PREFIX)]


@register_loss("attribute_ce")
class AttributeCrossEntropy(Loss):
    """Cross-entropy per attribute output; tasks are the ``attr/<name>`` keys.

    Options: ``attributes``: the attribute names (with or without ``attr/``), a list or the
    model's ``{name: n_classes}`` mapping (``model.attributes.n_classes``: attribute heads sit next
    to the taxonomic head, so the head alone does not know them); default: the head's own
    ``attr/`` outputs, if any. ``label_smoothing``: one number in [0, 1) for every attribute, or
    ``{name: eps}`` (names with or without ``attr/``; attributes not named: 0).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, attributes: Sequence[str] | Mapping[str, int] | None = None,
                 label_smoothing: float | Mapping[str, float] = 0.0) -> None:
        super().__init__(taxonomy, head)
        names = attribute_outputs(head) if attributes is None else list(attributes)
        keys = [a if a.startswith(PREFIX) else PREFIX + a for a in map(str, names)]
        if not keys:
            raise ConfigError("loss 'attribute_ce' needs the attribute names: loss.attributes=[...] (the model's "
                              "attribute heads, model.attributes), or a head with 'attr/<name>' outputs")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"loss.attributes lists an attribute twice: {keys}")
        self.keys = tuple(keys)
        self.smoothing: dict[str, float] = _smoothing_by_key(label_smoothing, self.keys)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.keys

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = {}
        for key in self.keys:
            if key not in outputs:
                raise ConfigError(f"the attribute loss expects the output {key!r}, the model gives {sorted(outputs)}; "
                                  "build the model with that attribute head (model.attributes)")
            logits = outputs[key].float()
            y = self._target(key, extra_targets, logits)
            total = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum", label_smoothing=self.smoothing[key])
            out[key] = total / (y >= 0).sum().clamp(min=1)
        return out

    @property
    def label_smoothing(self) -> float | dict[str, float]:
        """The smoothing: one number when every attribute has the same, else ``{"attr/<name>": eps}``."""
        values = set(self.smoothing.values())
        return values.pop() if len(values) == 1 else dict(self.smoothing)

    def extra_repr(self) -> str:
        return f"tasks={list(self.keys)}, label_smoothing={self.label_smoothing}"

    @staticmethod
    def _target(key: str, extra_targets: dict[str, Tensor] | None, logits: Tensor) -> Tensor:
        if extra_targets is None or key not in extra_targets:
            have = sorted(extra_targets) if extra_targets else []
            raise DataError(f"the attribute loss needs extra_targets[{key!r}] (LongTensor[batch], -1 = missing); "
                            f"got {have or 'no extra targets'}. Give the attribute column in the sample table, "
                            "or drop the attribute head.")
        y = extra_targets[key]
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise DataError(f"extra_targets[{key!r}] must hold integer class indices, got dtype {y.dtype}")
        if y.shape != logits.shape[:1]:
            raise DataError(f"extra_targets[{key!r}] has shape {tuple(y.shape)}, the batch has {logits.shape[0]} "
                            "samples")
        n = logits.shape[-1]
        bad = (y < -1) | (y >= n)
        if bool(bad.any()):
            raise DataError(f"extra_targets[{key!r}] holds {int(bad.sum())} value(s) outside -1..{n - 1} "
                            f"(the head has {n} classes): {torch.unique(y[bad])[:5].tolist()}")
        return y.long()


@register_loss("composite")
class CompositeLoss(Loss):
    """The main taxonomy loss plus one cross-entropy task per attribute output.

    Options: ``main`` (a loss name, ``{"name": ..., **options}`` or a built :class:`Loss`;
    default ``"ce"``), ``attributes`` (names or the model's ``{name: n_classes}``, as for
    ``attribute_ce``), ``attribute_label_smoothing`` (a number or ``{name: eps}``, as
    ``attribute_ce``'s ``label_smoothing``).
    """

    def __init__(self, taxonomy: Taxonomy, head: Head, main: str | dict[str, Any] | Loss = "ce",
                 attributes: Sequence[str] | Mapping[str, int] | None = None,
                 attribute_label_smoothing: float | Mapping[str, float] = 0.0) -> None:
        super().__init__(taxonomy, head)
        if isinstance(main, Loss):
            if main.head is not head:
                raise ConfigError("the main loss of a composite loss must be built for the same head")
            self.main = main
        else:
            cfg = {"name": main} if isinstance(main, str) else dict(main)
            name = cfg.pop("name", "ce")
            if name == "composite":
                raise ConfigError("a composite loss cannot contain another composite loss")
            self.main = LOSSES.create(name, taxonomy, head, **cfg)
        self.attributes = AttributeCrossEntropy(taxonomy, head, attributes, attribute_label_smoothing)
        clash = set(self.main.tasks) & set(self.attributes.tasks)
        if clash:
            raise ConfigError(f"task name(s) {sorted(clash)} are produced by both the main and the attribute loss")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.main.tasks) + tuple(self.attributes.tasks)

    def set_step(self, step: int) -> None:
        self.main.set_step(step)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor,
                extra_targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = dict(self.main(outputs, targets, extra_targets))
        out.update(self.attributes(outputs, targets, extra_targets))
        return out


def with_attribute_losses(loss: Loss, attributes: Sequence[str] | Mapping[str, int] | None,
                          label_smoothing: float | Mapping[str, float] = 0.0) -> Loss:
    """``loss`` itself when there are no attributes (None or empty) or it already covers them, else a
    :class:`CompositeLoss` of ``loss`` and ``attribute_ce`` over them. The training loop calls
    ``with_attribute_losses(loss, model.attributes.n_classes, cfg.loss.attribute_label_smoothing)``.

    ``label_smoothing``: one number for every attribute or ``{name: eps}`` (unnamed attributes: 0).
    Smoothing cannot be added to a loss that already covers the attributes (a ``composite`` or
    ``attribute_ce`` built with its own options): that is a ConfigError, not a silent no-op."""
    if not attributes:
        return loss
    if isinstance(loss, (CompositeLoss, AttributeCrossEntropy)):
        given = label_smoothing if isinstance(label_smoothing, Mapping) else {"": label_smoothing}
        if any(float(v) != 0.0 for v in given.values()):
            raise ConfigError(f"loss {loss.registry_name!r} already holds the attribute losses; give their label "
                              "smoothing as that loss's own option (composite: attribute_label_smoothing, "
                              "attribute_ce: label_smoothing), not loss.attribute_label_smoothing")
        return loss
    return CompositeLoss(loss.taxonomy, loss.head, main=loss, attributes=attributes,
                         attribute_label_smoothing=label_smoothing)


def _key(name: str) -> str:
    """``attr/<name>`` from ``<name>``, ``attr_<name>`` (the table column) or ``attr/<name>``."""
    if name.startswith(PREFIX):
        return name
    return PREFIX + (name[len("attr_"):] if name.startswith("attr_") else name)


def _smoothing_by_key(value: float | Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """``{key: eps}`` for every attribute key from one number or a per-attribute mapping (checked)."""
    if isinstance(value, Mapping):
        by_key: dict[str, float] = {}
        for name, eps in value.items():
            k = _key(str(name))
            if k not in keys:
                raise ConfigError(f"attribute label smoothing names attribute {str(name)!r}, which has no attribute "
                                  f"head; the attributes are: {', '.join(k[len(PREFIX):] for k in keys)}")
            by_key[k] = eps
        given = by_key
    else:
        given = dict.fromkeys(keys, value)
    out = {}
    for k in keys:
        eps = given.get(k, 0.0)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < 1.0:
            raise ConfigError(f"label smoothing of attribute {k[len(PREFIX):]!r} is {eps!r}; it must be a number "
                              "in [0, 1)")
        out[k] = float(eps)
    return out
