"""Task weighting: per-task losses -> the one scalar that is back-propagated.

``StaticWeighting`` is the weighted sum ``L = sum_t w_t * L_t`` with fixed
weights (default 1 for every task; e.g. 1.0 for the main task and 0.5 for
auxiliary ones, FIELD_NOTES.md "generic multi-head models").

Dynamic schemes (GradNorm, Chen et al. 2018; uncertainty weighting, Kendall et
al. 2018) subclass :class:`TaskWeighting`, register with
``@register_weighting("name")`` and may keep learnable parameters (the training
loop must then add ``weighting.parameters()`` to the optimiser) or adjust their
weights in :meth:`TaskWeighting.update`, called once per optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.registry import Registry

WEIGHTINGS: Registry[TaskWeighting] = Registry("task weighting")


def register_weighting(name: str):
    """Class decorator registering a :class:`TaskWeighting` subclass under ``name``."""
    return WEIGHTINGS.register(name)


def create_weighting(name: str = "static", **cfg: Any) -> TaskWeighting:
    """Build the task weighting registered as ``name`` (unknown names/options raise ConfigError)."""
    return WEIGHTINGS.create(name, **cfg)


def list_weightings() -> list[str]:
    return WEIGHTINGS.names()


class TaskWeighting(nn.Module):
    """Base class: ``forward(losses) -> total``; ``weights()`` for logging; ``update`` hook."""

    registry_name: ClassVar[str] = ""

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        if not losses:
            raise ValueError("no task losses to combine")
        w = self.weights(losses)
        return sum((w[k] * v for k, v in losses.items()), start=torch.zeros((), device=_device(losses)))

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, Tensor | float]:
        """The weight of each task (plain numbers or tensors)."""
        raise NotImplementedError

    def update(self, losses: dict[str, Tensor], *, shared_parameters: Iterable[nn.Parameter] | None = None,
               step: int = 0) -> None:
        """Adjust dynamic weights after a step (static weighting: nothing to do)."""


def _device(losses: dict[str, Tensor]) -> torch.device:
    return next(iter(losses.values())).device


@register_weighting("static")
class StaticWeighting(TaskWeighting):
    """Fixed weights by task name; tasks not named get ``default`` (1.0).

    A weight for a task the loss does not produce is an error (a typo would
    otherwise silently train with weight 1).
    """

    def __init__(self, weights: dict[str, float] | None = None, default: float = 1.0) -> None:
        super().__init__()
        self.task_weights = {str(k): float(v) for k, v in (weights or {}).items()}
        self.default = float(default)
        bad = {k: v for k, v in self.task_weights.items() if not v >= 0.0}
        if bad or not self.default >= 0.0:
            raise ConfigError(f"loss.task_weights must be >= 0, got {bad or {'default': self.default}}")

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, float]:
        tasks = list(losses)
        unknown = sorted(set(self.task_weights) - set(tasks))
        if unknown:
            raise ConfigError(f"loss.task_weights names unknown task(s) {unknown}; the loss produces: "
                              f"{', '.join(tasks)}")
        return {t: self.task_weights.get(t, self.default) for t in tasks}
