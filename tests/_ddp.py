"""Helpers shared by the DDP tests: CPU process groups (gloo) started with torch.multiprocessing,
and small real-image tables that keep multi-process runs cheap.

A worker started by :func:`spawn` runs ``fn(rank, world, port, *args)`` in a fresh process; it
calls :func:`dist_env` first, so that ``taxonomist.train.distributed.init_distributed`` (and so a
``Trainer``) joins the group as it would under torchrun.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give process ``rank`` of ``world`` on this machine."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})


def spawn(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes and wait; an exception in any of
    them is raised here (with the worker's traceback). ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def subset_tables(small: Path, out: Path, n_classes: int, n_train: int = 2, n_val: int = 1,
                  columns: Callable[[pd.DataFrame, str], pd.DataFrame] | None = None) -> Path:
    """train.csv / val.csv under ``out`` with the first ``n_train`` (``n_val``) rows of each of the
    first ``n_classes`` classes (name order) of the ``small`` tables (real demo images).
    ``columns(df, split)``: adds columns (e.g. ``attr_<name>``) before writing."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        df = pd.read_csv(small / f"{split}.csv")
        keep = sorted(df["label"].unique())[:n_classes]
        df = df[df["label"].isin(keep)].groupby("label", sort=True).head(n).reset_index(drop=True)
        if columns is not None:
            df = columns(df, split)
        df.to_csv(out / f"{split}.csv", index=False)
    return out
