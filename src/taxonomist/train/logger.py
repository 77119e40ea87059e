"""Per-epoch metrics: a CSV file (rewritten atomically from the history) and TensorBoard."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_text


class MetricLogger:
    def __init__(self, run_dir: Path, history: list[dict[str, Any]] | None = None, start_epoch: int = 0,
                 tensorboard: bool = True, write: bool = True) -> None:
        self.csv_path = run_dir / "metrics.csv"
        self.write = write
        self.history: list[dict[str, Any]] = list(history or [])
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_epoch or None)

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.write:
            return
        keys: list[str] = []
        for r in self.history:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in self.history:
            w.writerow({k: _fmt(r.get(k)) for k in keys})
        atomic_write_text(self.csv_path, buf.getvalue())
        if self.writer is not None:
            step = int(row["epoch"])
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def add_text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v
