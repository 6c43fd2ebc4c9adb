"""torch.distributed for the training loop: started when torchrun launches more than one process.

    world, rank, local_rank = distributed()

With ``WORLD_SIZE`` > 1 in the environment (torchrun sets it, and ``RANK`` / ``LOCAL_RANK``) the default
process group starts -- NCCL on GPUs, gloo on the CPU -- and each process takes the GPU of its local rank.
With one process nothing starts and the loop runs as a plain single-device loop.
"""
from __future__ import annotations

import os

import torch

__all__ = ["distributed"]


def distributed() -> tuple[int, int, int]:
    """(world size, rank, local rank), starting torch.distributed when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return world, dist.get_rank(), local
