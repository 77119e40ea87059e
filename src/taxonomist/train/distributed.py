"""PyTorch DDP plumbing for `torchrun --nproc-per-node N -m taxonomist train CONFIG`.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and the rendezvous for several
machines); without them everything here is a no-op single process. The backend
is NCCL on CUDA and gloo on CPU (CI tests DDP on CPU with gloo).

Conventions: ``train.batch_size`` is the *global* batch; each rank takes an equal
slice of every global batch of the per-epoch permutation, so N processes see the
same batches as one process. Only rank 0 writes logs, checkpoints and bundles;
validation predictions are gathered from all ranks before metrics are computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun prepared (if any); returns the info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of one global batch of indices."""
    return batch[info.rank::info.world_size] if info.enabled else batch


def gather_rows(local: np.ndarray, info: DistInfo) -> np.ndarray:
    """Concatenate per-rank row blocks (rank order) on every rank."""
    if not info.enabled:
        return local
    parts: list[np.ndarray | None] = [None] * info.world_size
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if p is not None and len(p)] or [local[:0]])


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
