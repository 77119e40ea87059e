"""Training dynamics kept outside the loop body: the weight EMA and early stopping.

EMA: ``ema_t = decay * ema_{t-1} + (1 - decay) * w_t`` after every optimiser step, on
parameters and buffers (torch.optim.swa_utils.AveragedModel with an EMA average
function). Validation, the best checkpoint and the exported bundle use the
averaged weights.

Early stopping: stop when the monitored validation metric has not improved by more
than ``delta`` for ``patience`` epochs. Its state is the epoch of the best value, which
the checkpoint stores, so a resumed run stops at the same epoch as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (use it for evaluation)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


class EarlyStopping:
    """``step(epoch, value) -> True`` when training should stop (see the module docstring)."""

    def __init__(self, patience: int, delta: float = 0.0, mode: str = "min", best_epoch: int = 0,
                 best: float | None = None) -> None:
        if patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {patience}")
        self.patience, self.delta, self.mode = int(patience), float(delta), mode
        self.best_epoch, self.best = best_epoch, best

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.delta if self.mode == "min" else value > self.best + self.delta

    def step(self, epoch: int, value: float | None) -> bool:
        if value is None:
            return False
        if self.improved(value):
            self.best, self.best_epoch = value, epoch
            return False
        return epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best": self.best}
