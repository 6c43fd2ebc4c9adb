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

import contextlib
import os
import socket
import sys

import torch

from .._checks import check_positive_int

__all__ = ["STRATEGIES", "distributed", "world_size", "wrap", "gradient_sync", "free_port", "torchrun_command"]

STRATEGIES = ("ddp", "fsdp")  # DistributedDataParallel, or FSDP2's fully_shard (lorabook.train.fsdp)


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


def wrap(model: torch.nn.Module, strategy: str, local_rank: int = 0) -> torch.nn.Module:
    """The module the loop runs forward and backward through: "ddp" wraps ``model`` in DistributedDataParallel
    (the NF4 codes and rotary tables are the same on every rank, so buffers are not re-sent each forward); "fsdp"
    shards ``model`` itself (``lorabook.train.fsdp.shard``) and returns it."""
    if strategy == "fsdp":
        from .fsdp import shard
        return shard(model)
    from torch.nn.parallel import DistributedDataParallel
    on_gpu = next(model.parameters()).device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[local_rank] if on_gpu else None, broadcast_buffers=False)


def gradient_sync(net: torch.nn.Module, sync: bool):
    """A context in which backward reduces gradients over the ranks only if ``sync``: FSDP2's
    ``set_requires_gradient_sync``, DDP's ``no_sync``; a plain module (one process) has nothing to reduce."""
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: the setting holds until set again
        net.set_requires_gradient_sync(sync)
    elif not sync and hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    return contextlib.nullcontext()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for torchrun's rendezvous on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str], port: int | None = None) -> list[str]:
    """The command that runs ``python -m lorabook.train *args`` as ``nproc`` processes on this machine, with this
    Python: ``torchrun --nproc_per_node N --master_addr 127.0.0.1 --master_port P -m lorabook.train ...``."""
    check_positive_int("nproc", nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port or free_port()), "-m", "lorabook.train", *map(str, args)]
