"""Which process am I: torchrun's environment, PyTorch's process group, and the few collectives we need.

`torchrun --nproc_per_node N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` then joins the
process group (NCCL on CUDA, gloo on the CPU). A plain `python train.py` is a world of one, and every
collective below is then a no-op, so the training loop has no branches for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float | int) -> float:
        """The sum of a number over all processes."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.item()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def init(device_type: str) -> Dist:
    """Join torchrun's process group if there is one; a world of one otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local_rank)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
