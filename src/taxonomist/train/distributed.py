"""PyTorch DDP plumbing for `torchrun --nproc-per-node N -m taxonomist train CONFIG`.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and the rendezvous for several
machines); without them everything here is a no-op single process. The backend
is NCCL on CUDA and gloo on CPU (CI tests DDP on CPU with gloo).

Conventions: ``train.batch_size`` is the *global* batch; each rank takes an equal
slice of every global batch of the per-epoch permutation, so N processes see the
same batches as one process. Only rank 0 writes logs, checkpoints and bundles,
and only rank 0 *reads* the run folder (resume state, ``batch_size.json``, the
best checkpoint): it broadcasts what it read, so the run folder need not be on a
file system the other machines see. Validation predictions are gathered on rank 0,
which computes the metrics and broadcasts the few numbers the other ranks need.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

#: default timeout of every collective operation (minutes), ``train.dist_timeout_min``
DEFAULT_TIMEOUT_MIN = 60.0
#: devices on which torch's SyncBatchNorm runs (it raises on CPU and MPS)
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_min: float | None = DEFAULT_TIMEOUT_MIN
                     ) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun prepared (if any); returns the info and this rank's device.

    ``timeout_min``: how long any collective (a barrier while the other ranks extract features, a
    broadcast while rank 0 reads a checkpoint) may wait before the job fails; None: torch's default
    (10 minutes for NCCL). A process group that is already initialised keeps its own timeout.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_min is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=float(timeout_min))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return DistInfo(rank, world, local), device


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of one global batch of indices."""
    return batch[info.rank::info.world_size] if info.enabled else batch


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for the random draws of one rank in one epoch (dropout, augmentation, mixup,
    metadata masking): different for every (seed, epoch, rank), the same when a run is resumed."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch), int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of a small tensor over the ranks (returned on the tensor's own device)."""
    if not info.enabled:
        return values
    buf = values.to(_comm_device())
    dist.all_reduce(buf)
    return buf.to(values.device)


def gather_rows(local: np.ndarray, info: DistInfo, max_bytes: int = 256 << 20) -> np.ndarray | None:
    """Concatenate per-rank row blocks (rank order) on rank 0; the other ranks get None.

    Tensor ``gather`` to rank 0 only (not an all-gather of pickled arrays): every rank pads its rows
    to the longest block, and the blocks travel in pieces of at most ``max_bytes`` on rank 0 (the
    world's rows of one piece), so the receive buffer stays bounded on the GPU whatever the size of
    the validation set. Every rank must pass the same trailing shape and dtype.
    """
    if not info.enabled:
        return local
    dev = _comm_device()
    counts = torch.zeros(info.world_size, dtype=torch.int64)
    counts[info.rank] = len(local)
    counts = all_reduce_sum(counts, info).tolist()
    longest = max(counts)
    tail_shape = tuple(local.shape[1:])
    row_bytes = max(1, int(np.prod(tail_shape, dtype=np.int64)) * local.dtype.itemsize)
    step = max(1, max_bytes // (row_bytes * info.world_size))
    src = torch.from_numpy(np.ascontiguousarray(local))
    parts: list[list[np.ndarray]] = [[] for _ in range(info.world_size)]
    for lo in range(0, longest, step):
        n = min(step, longest - lo)
        piece = torch.zeros((n, *tail_shape), dtype=src.dtype)
        mine = src[lo:lo + n]
        piece[:len(mine)] = mine
        piece = piece.to(dev)
        recv = [torch.empty_like(piece) for _ in range(info.world_size)] if info.is_main else None
        dist.gather(piece, recv, dst=0)
        if recv is not None:
            for r, t in enumerate(recv):
                keep = max(0, min(n, counts[r] - lo))
                if keep:
                    parts[r].append(t[:keep].cpu().numpy())
    if not info.is_main:
        return None
    blocks = [b for r in range(info.world_size) for b in parts[r]]
    return np.concatenate(blocks) if blocks else local[:0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """One small picklable object from every rank, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small objects)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def broadcast_state(state: dict[str, Any] | None, info: DistInfo) -> dict[str, Any] | None:
    """Rank 0's state dict (a checkpoint: model, optimiser, ...) on every rank, one top-level entry
    at a time, so the pickled copy in flight is never larger than the largest entry."""
    if not info.enabled:
        return state
    keys = broadcast_object(None if state is None else list(state), info)
    if keys is None:
        return None
    return {k: broadcast_object(state[k] if info.is_main and state is not None else None, info) for k in keys}


def on_main(fn: Callable[[], T], info: DistInfo, share: bool = True, state: bool = False) -> T | None:
    """Run ``fn`` on rank 0 only; an exception it raises is raised on every rank (not left to hang
    the others in their next collective). ``share``: broadcast the result (``state``: a large dict,
    entry by entry, see :func:`broadcast_state`); otherwise the other ranks get None."""
    if not info.enabled:
        return fn()
    value: Any = None
    failure: tuple[str, str] | None = None
    error: BaseException | None = None
    if info.is_main:
        try:
            value = fn()
        except Exception as exc:
            error, failure = exc, (type(exc).__name__, str(exc))
    failure = broadcast_object(failure, info)
    if failure is not None:
        if error is not None:
            raise error
        from ..errors import ConfigError, DataError

        kinds: dict[str, type[Exception]] = {"ConfigError": ConfigError, "DataError": DataError}
        name, msg = failure
        raise kinds[name](msg) if name in kinds else RuntimeError(f"rank 0 failed: {name}: {msg}")
    if not share:
        return value
    return broadcast_state(value, info) if state else broadcast_object(value, info)  # type: ignore[arg-type]


def shared_dir_group(folder: str | Path, info: DistInfo) -> tuple[int, int]:
    """(this rank's position, number of ranks) among the ranks that see the same ``folder``.

    Every rank writes its own probe file in ``folder`` (no two ranks write the same file); after a
    barrier each rank lists the probes it sees. On a file system shared by all machines that is
    every rank; on a per-machine folder (local disk), the ranks of this machine. The probes are
    removed again. Single process: (0, 1).
    """
    if not info.enabled:
        return 0, 1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(uuid.uuid4().hex if info.is_main else None, info)
    mine = folder / f".probe-{token}-{info.rank}"
    mine.write_text(str(os.getpid()))
    try:
        barrier(info)
        seen = [r for r in range(info.world_size) if (folder / f".probe-{token}-{r}").exists()]
        everyone = all_gather_objects(seen, info)  # also the sync point: every rank has looked
    finally:
        mine.unlink(missing_ok=True)
    group = everyone[info.rank]
    if info.rank not in group:  # cannot see its own file: treat it as alone
        return 0, 1
    return group.index(info.rank), len(group)


def convert_sync_batchnorm(model: nn.Module, info: DistInfo, device: torch.device) -> tuple[nn.Module, int, str]:
    """``train.sync_batchnorm``: BatchNorm layers -> SyncBatchNorm, so that under DDP the batch statistics
    are those of the global batch (as in one process) instead of each rank's share.

    Returns (model, number of layers converted, a note). Converted only under DDP on a device where
    SyncBatchNorm runs (CUDA; torch's SyncBatchNorm raises on CPU); the parameters and buffers are
    kept (same Parameter objects, same state-dict keys), so checkpoints and bundles are unchanged.
    """
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
               for m in model.modules())
    if not info.enabled:
        return model, 0, "train.sync_batchnorm: one process, nothing to synchronise"
    if device.type not in SYNC_BN_DEVICES:
        return model, 0, (f"train.sync_batchnorm is ignored on {device.type}: torch's SyncBatchNorm needs a GPU "
                          "(each rank normalises with its own share of the batch)")
    if n_bn == 0:
        return model, 0, "train.sync_batchnorm: the model has no BatchNorm layer"
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, n_bn, f"train.sync_batchnorm: {n_bn} BatchNorm layer(s) synchronised over {info.world_size} processes"
