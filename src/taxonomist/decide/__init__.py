"""Decision rules: turn label probabilities into one node per sample, at any depth.

``decide(tax, label_probs, method, **options) -> Decision``:

* ``argmax``: the most probable label.
* ``threshold`` (``threshold=0.8`` or ``{"species": 0.55, ...}``, ``default=None``):
  climb from the top label to the first node whose summed probability reaches
  its threshold.
* ``crm`` (``metric="path"|"lca_height"|"rank_steps"``, ``ranks=None``,
  ``candidates="all"|"labels"|ids``): minimise the expected tree distance.
* ``darts`` (``lam=0.0``): maximise ``(info_gain + lam) * p``.

Fitting on validation data: :func:`fit_temperature`, :func:`fit_thresholds`,
:func:`fit_darts_lambda`. Details and examples: docs/decisions.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..taxonomy import Taxonomy
from .argmax import argmax_decision
from .base import Decision
from .calibrate import fit_darts_lambda, fit_temperature, fit_thresholds
from .crm import crm_decision, expected_distances
from .darts import darts_decision, info_gain
from .threshold import FATHOMNET_THRESHOLDS, node_thresholds, threshold_decision

#: registry of decision rules: name -> function(tax, label_probs, **options)
DECISION_RULES: dict[str, Callable[..., Decision]] = {
    "argmax": argmax_decision,
    "threshold": threshold_decision,
    "crm": crm_decision,
    "darts": darts_decision,
}


def _options(fn: Callable[..., Decision]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("tax", "label_probs")]


def decide(tax: Taxonomy, label_probs: Any, method: str = "argmax", **options: Any) -> Decision:
    """Apply the decision rule ``method`` to every row of ``label_probs`` (``[N, n_labels]``).

    Raises :class:`ConfigError` for an unknown method or option (the message
    lists the allowed ones).
    """
    fn = DECISION_RULES.get(method)
    if fn is None:
        raise ConfigError(f"unknown decision method {method!r}; choose one of {', '.join(DECISION_RULES)}")
    allowed = _options(fn)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(f"decision method {method!r} has no option(s) {unknown}; its options are "
                          f"{', '.join(allowed) or '(none)'}")
    return fn(tax, label_probs, **options)


__all__ = [
    "decide", "Decision", "DECISION_RULES",
    "argmax_decision", "threshold_decision", "crm_decision", "darts_decision",
    "expected_distances", "info_gain", "node_thresholds", "FATHOMNET_THRESHOLDS",
    "fit_temperature", "fit_thresholds", "fit_darts_lambda",
]
