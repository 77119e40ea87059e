"""Task weighting: per-task losses -> the one scalar that is back-propagated.

The interface the training loop uses (every scheme, static or dynamic)::

    weighting = create_weighting(name, tasks=loss.tasks, **options)
    extra = list(weighting.parameters())          # non-empty only for learnable schemes
                                                  # ("uncertainty"): add them to the optimiser
    for step, batch in enumerate(micro_batches):  # step counts micro-batches (forward passes)
        losses = loss(outputs, targets)           # {task: scalar}
        if weighting.needs_shared_parameters:     # GradNorm
            weighting.update(losses, model.last_shared_parameters(), step)
        else:
            weighting.update(losses, None, step)  # a no-op for static / uncertainty
        total = weighting(losses)                 # AFTER update: this step already uses the new weights
        total.backward()
    log(weighting.current_weights())              # {task: float}
    checkpoint["weighting"] = weighting.state_dict()

``update`` must come before ``weighting(losses)`` and before ``backward``: GradNorm measures
the per-task gradient norms on the live graph with ``torch.autograd.grad(...,
retain_graph=True)``, which neither frees the graph nor touches ``.grad``.

``StaticWeighting`` is the weighted sum ``L = sum_t w_t * L_t`` with fixed weights (default 1
for every task; e.g. 1.0 for the main task and 0.5 for auxiliary ones, FIELD_NOTES.md
"generic multi-head models"). ``gradnorm`` (Chen et al., ICML 2018) and ``uncertainty``
(Kendall et al., CVPR 2018) live in their own modules and register here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    """Build the task weighting registered as ``name`` (unknown names/options raise ConfigError).

    Give ``tasks=loss.tasks``: dynamic schemes need it, ``static`` uses it to check its weights.
    """
    return WEIGHTINGS.create(name, **cfg)


def list_weightings() -> list[str]:
    return WEIGHTINGS.names()


def check_tasks(tasks: Sequence[str] | None, what: str) -> tuple[str, ...]:
    """Validate a task list (non-empty, unique names)."""
    if tasks is None or isinstance(tasks, str):
        raise ConfigError(f"{what} needs the list of task names: create_weighting(..., tasks=loss.tasks)")
    tasks = tuple(str(t) for t in tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"{what}: tasks must be a non-empty list of distinct names, got {list(tasks)}")
    return tasks


class TaskWeighting(nn.Module):
    """Base class (module docstring): ``forward(losses) -> total``, ``update(losses, shared, step)``,
    ``current_weights()``; state in ``state_dict()``."""

    registry_name: ClassVar[str] = ""
    needs_shared_parameters: ClassVar[bool] = False
    """True when :meth:`update` needs the last shared layer's parameters (GradNorm)."""

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        if not losses:
            raise ValueError("no task losses to combine")
        w = self.weights(losses)
        return sum((w[k] * v for k, v in losses.items()), start=torch.zeros((), device=_device(losses)))

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, Tensor | float]:
        """The weight of each task (plain numbers or tensors)."""
        raise NotImplementedError

    def current_weights(self) -> dict[str, float]:
        """The weights as plain floats, for logging (``{task: weight}``)."""
        raise NotImplementedError

    def update(self, losses: dict[str, Tensor], shared_parameters: Iterable[nn.Parameter] | None = None,
               step: int = 0) -> None:
        """Adjust dynamic weights; call every micro-step before ``forward`` and ``backward``
        (static weighting: nothing to do)."""


def _device(losses: dict[str, Tensor]) -> torch.device:
    return next(iter(losses.values())).device


def check_loss_keys(tasks: Sequence[str], losses: dict[str, Tensor], what: str) -> None:
    """The losses must be exactly the configured tasks."""
    if set(losses) != set(tasks):
        raise ConfigError(f"{what} was built for tasks {list(tasks)} but got losses for {list(losses)}; "
                          "build it with tasks=loss.tasks")


@register_weighting("static")
class StaticWeighting(TaskWeighting):
    """Fixed weights by task name; tasks not named get ``default`` (1.0).

    A weight for a task the loss does not produce is an error (a typo would
    otherwise silently train with weight 1): at construction when ``tasks`` is
    given, else at the first call.
    """

    def __init__(self, weights: dict[str, float] | None = None, default: float = 1.0,
                 tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.task_weights = {str(k): float(v) for k, v in (weights or {}).items()}
        self.default = float(default)
        bad = {k: v for k, v in self.task_weights.items() if not v >= 0.0}
        if bad or not self.default >= 0.0:
            raise ConfigError(f"loss.task_weights must be >= 0, got {bad or {'default': self.default}}")
        self.tasks = None if tasks is None else check_tasks(tasks, "static weighting")
        if self.tasks is not None:
            self.weights(self.tasks)

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, float]:
        tasks = list(losses)
        unknown = sorted(set(self.task_weights) - set(tasks))
        if unknown:
            raise ConfigError(f"loss.task_weights names unknown task(s) {unknown}; the loss produces: "
                              f"{', '.join(tasks)}")
        return {t: self.task_weights.get(t, self.default) for t in tasks}

    def current_weights(self) -> dict[str, float]:
        if self.tasks is None:
            return dict(self.task_weights)
        return self.weights(self.tasks)


def _register_builtin() -> None:
    from . import gradnorm, uncertainty  # noqa: F401  (registration side effect)


_register_builtin()
