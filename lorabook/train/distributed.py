"""torch.distributed for the training loop: started when torchrun launches more than one process.

    world, rank, local_rank = distributed()

With ``WORLD_SIZE`` > 1 in the environment (torchrun sets it, and ``RANK`` / ``LOCAL_RANK``) the default
process group starts -- NCCL on GPUs, gloo on the CPU -- and each process takes the GPU of its local rank.
With one process nothing starts and the loop runs as a plain single-device loop.

The loop's ``batch_size`` is the global micro-batch: each of the N ranks takes batch_size / N examples, and the
loss of a step is normalised by the answer tokens of the whole global batch (summed over ranks), so N processes
compute the gradient one process would with the same global batch -- the per-rank token mean that transformers
#34191 fixed would weight a rank's short answers more.
"""
from __future__ import annotations

import os

import torch

__all__ = ["distributed", "world_size"]


def world_size() -> int:
    """How many processes torchrun launched (``WORLD_SIZE``; 1 without torchrun), starting nothing."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not a positive integer")
    return int(value)


def distributed() -> tuple[int, int, int]:
    """(world size, rank, local rank), starting torch.distributed when launched by torchrun with WORLD_SIZE > 1."""
    world = world_size()
    if world == 1:
        return 1, 0, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return world, dist.get_rank(), local
