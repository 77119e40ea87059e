"""Uncertainty task weighting (Kendall, Gal & Cipolla, "Multi-task learning using uncertainty to
weigh losses", CVPR 2018).

Each task has a learnable ``s_i = log sigma_i^2`` (initialised to ``init``, default 0) and

* ``form="regression"`` (default): ``L = sum_i exp(-s_i) * L_i + s_i``. This is Kendall's eq. 7
  (``1/(2 sigma^2) L + log sigma``) times 2; at the optimum ``exp(s_i) = L_i``.
* ``form="classification"``: ``L = sum_i exp(-s_i) * L_i + s_i / 2``, eq. 10's
  ``1/sigma^2 L + log sigma`` for a softmax likelihood with temperature ``sigma^2``; at the
  optimum ``exp(s_i) = 2 L_i``.

The ``s_i`` are ordinary parameters: the training loop adds ``weighting.parameters()`` to its
optimiser (without weight decay). A task whose loss is exactly 0 in a batch (the losses return a
connected zero when a task has no target) is left out of that step, regulariser included (else
``s_i`` would be pushed down by ``d/ds = 1`` on every batch without the task); its ``s_i`` stays in
the graph with a zero gradient. The ``s_i`` are not part of the DDP-wrapped model: under DDP the
training loop averages their gradients over the ranks before each optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .weighting import TaskWeighting, check_loss_keys, check_tasks, register_weighting


@register_weighting("uncertainty")
class UncertaintyWeighting(TaskWeighting):
    """Learned homoscedastic-uncertainty weights (module docstring).

    Options: ``tasks`` (required), ``form`` (``regression`` / ``classification``), ``init`` (initial
    ``s_i``, 0.0).
    """

    def __init__(self, tasks: Sequence[str] | None = None, form: str = "regression", init: float = 0.0) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks, "uncertainty weighting")
        if form not in ("regression", "classification"):
            raise ConfigError(f"uncertainty form={form!r} must be 'regression' or 'classification'")
        self.form = form
        self.reg = 1.0 if form == "regression" else 0.5
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def weights(self, losses: dict[str, Tensor] | Iterable[str]) -> dict[str, Tensor]:
        idx = {t: i for i, t in enumerate(self.tasks)}
        return {t: torch.exp(-self.log_vars[idx[t]]) for t in losses}

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        check_loss_keys(self.tasks, losses, "uncertainty weighting")
        total = self.log_vars.sum() * 0.0
        for i, t in enumerate(self.tasks):
            value = losses[t].float()
            s = self.log_vars[i]
            present = (value.detach() != 0).float()
            total = total + present * (torch.exp(-s) * value + self.reg * s)
        return total

    def current_weights(self) -> dict[str, float]:
        """``exp(-s_i)``, the factor on each loss."""
        return {t: float(v) for t, v in zip(self.tasks, torch.exp(-self.log_vars.detach()).tolist(), strict=True)}
