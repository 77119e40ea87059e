"""Learning-rate schedules as per-step multipliers (for torch.optim.lr_scheduler.LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 or constant."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f
