"""Distributed data parallel under `torchrun`: the process group is detected from RANK / WORLD_SIZE / LOCAL_RANK.

gloo on CPU, nccl on CUDA. Every rank trains on its own random batches; DDP averages gradients, so the weights stay
identical on all ranks. Rank 0 alone writes checkpoints, logs and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """The torchrun layout from the environment (a single process when RANK is unset)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (when there is one); returns this rank's device."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(obj, info: DistInfo) -> list:
    """`obj` of every rank, in rank order (a one-element list without a process group)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


__all__ = ["DistInfo", "detect", "setup", "teardown", "all_reduce_sum", "broadcast_flag", "gather_objects"]
