"""Per-epoch metrics: a CSV file (rewritten atomically from the history) and the experiment trackers.

:class:`MetricLogger` keeps the history of epoch rows, rewrites ``metrics.csv`` after
every epoch and fans each row out to the trackers of :mod:`.tracking` (TensorBoard,
W&B, MLflow). ``metrics.csv`` is the source of truth: a tracker that fails while
logging (a network error, a full disk on the tracking server) is reported with a
warning and the training goes on; only starting a tracker may stop the run.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_text
from .tracking import Status, TensorBoardTracker, Tracker


class MetricLogger:
    """``metrics.csv`` plus trackers, for one run.

    ``trackers=None`` keeps the old behaviour: TensorBoard when ``tensorboard`` is
    true. A list (possibly empty) is used as given and ``tensorboard`` is ignored.
    ``write=False`` (DDP ranks other than 0) writes nothing and starts no tracker.
    ``config`` (the resolved config as plain data) and ``taxonomy_fingerprint`` are
    handed to every tracker when it starts. ``start_epoch > 0`` resumes: trackers that
    continue their earlier run get the new epochs only, the others first get the
    ``history`` rows up to ``start_epoch`` replayed.

    Use it as a context manager (or call :meth:`close`) so the trackers' runs end with
    status ``finished``, ``failed`` (an exception) or ``killed`` (KeyboardInterrupt).
    """

    def __init__(self, run_dir: Path, history: list[dict[str, Any]] | None = None, start_epoch: int = 0,
                 tensorboard: bool = True, write: bool = True, *, trackers: Sequence[Tracker] | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None,
                 taxonomy_fingerprint: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.write = write
        self.history: list[dict[str, Any]] = list(history or [])
        if trackers is None:
            trackers = [TensorBoardTracker()] if tensorboard and write else []
        self.trackers: list[Tracker] = list(trackers) if write else []
        self._closed = False
        started: list[Tracker] = []
        try:
            for t in self.trackers:
                continued = t.start(self.run_dir, run_name=run_name or self.run_dir.name, config=dict(config or {}),
                                    taxonomy_fingerprint=taxonomy_fingerprint, start_epoch=int(start_epoch))
                started.append(t)
                if start_epoch > 0 and not continued:  # e.g. a tracker added when resuming: backfill it
                    for row in self.history:
                        if "epoch" in row and int(row["epoch"]) <= start_epoch:
                            self._call(t, "log_metrics", _scalars(row), int(row["epoch"]))
        except BaseException:
            for t in started:
                self._call(t, "finish", "failed")
            self._closed = True
            raise

    # ---------------------------------------------------------------- logging
    def log(self, row: dict[str, Any]) -> None:
        """Append one epoch row (``epoch`` plus scalars), rewrite metrics.csv, send it to the trackers."""
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
        if "epoch" in row:
            step = int(row["epoch"])
            for t in self.trackers:
                self._call(t, "log_metrics", _scalars(row), step)

    def add_text(self, tag: str, text: str) -> None:
        """Free text (markdown) for every tracker (TensorBoard's text tab, files in W&B/MLflow)."""
        for t in self.trackers:
            self._call(t, "log_text", tag, text)

    def log_artifact(self, path: str | Path) -> None:
        """A file of the run (e.g. the final ``metrics.json``) for the trackers that store files."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot log {path}: no such file")
        for t in self.trackers:
            self._call(t, "log_artifact", path)

    def close(self, status: Status = "finished") -> None:
        """End every tracker's run with ``status``; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        for t in self.trackers:
            self._call(t, "finish", status)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    @property
    def writer(self) -> Any:
        """The TensorBoard SummaryWriter, if a TensorBoard tracker is running (else None)."""
        for t in self.trackers:
            if isinstance(t, TensorBoardTracker):
                return t.writer
        return None

    @staticmethod
    def _call(tracker: Tracker, method: str, *args: Any) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as exc:  # a tracker must not kill the training; metrics.csv has everything
            name = tracker.registry_name or type(tracker).__name__
            warnings.warn(f"tracker {name!r}: {method} failed ({type(exc).__name__}: {exc}); "
                          f"training continues and metrics.csv is complete", RuntimeWarning, stacklevel=3)


def _scalars(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "epoch"}


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v
