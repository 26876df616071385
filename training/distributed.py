"""What each process does in a multi-process (DDP) run: its rank, collectives on small values, rank-0 progress bars.

Every helper is a no-op on a single process, so training code calls them unconditionally. NCCL moves only CUDA
tensors and gloo CPU ones, so small collectives go through `collective_device()`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def collective_device() -> torch.device:
    """Where a tensor must live to take part in a collective of the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over processes, on `tensor`'s own device (itself on one process)."""
    if not is_distributed():
        return tensor
    reduced = tensor.to(collective_device())
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def broadcast_from_rank0(value: int) -> int:
    """Rank 0's `value` on every rank: a safeguard where all ranks must make the same choice."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=collective_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def global_mean(value: float | None) -> float | None:
    """Mean of ``value`` over the ranks that have one (``None``: this rank has none); ``None`` if no rank has one.

    Every rank receives the same float, and every rank must call this, with or without a value: that keeps the
    collectives matched when only some ranks measured something.
    """
    total, count = (0.0, 0.0) if value is None else (float(value), 1.0)
    total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / count if count else None


def main_process_progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A progress bar on the main process only (every rank printing one is noise)."""
    return tqdm(iterable, desc=desc, total=total, disable=rank_and_world_size()[0] != 0)


__all__ = [
    "all_reduce_sum",
    "broadcast_from_rank0",
    "collective_device",
    "global_mean",
    "is_distributed",
    "main_process_progress",
    "rank_and_world_size",
]
