"""One training loop for every lesson, its checkpoints, torch.distributed, and ``python -m lorabook.train``.

    loop.py         train(model, examples, tokenizer, steps=..., lr=...) -> History; prepare(model, method)
    checkpoint.py   save_checkpoint / load_checkpoint (read_checkpoint, then apply_checkpoint): one safetensors
                    file, resumable bit for bit, checked whole before any of it is loaded
    distributed.py  torchrun: the process group, ranks, DDP or FSDP (wrap), the launch command
    fsdp.py         FSDP2: shard the model (the 4-bit base's codes too), gather it whole, bytes per rank
    wire.py         bytes on the wire per step: counted at the collectives (WireCounter), computed (ring_bytes)
    __main__.py     python -m lorabook.train --method lora|qlora|... --model smollm2|tiny ...
"""
from .checkpoint import CKPT_NAME, Checkpoint, apply_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .distributed import STRATEGIES, distributed, free_port, torchrun_command, world_size
from .fsdp import local_bytes, shard
from .loop import (SCHEDULES, TRAIN_OPTIMIZERS, History, batch_indices, load_model, lr_at, make_optimizer, methods,
                   optimizer_step, prepare, token_loss_sum, train, trainable_parameters, validate)
from .merge import MERGEABLE, check_merge, merge
from .wire import WireCounter, ring_bytes

__all__ = ["CKPT_NAME", "Checkpoint", "apply_checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "STRATEGIES", "distributed", "free_port", "torchrun_command", "world_size", "local_bytes", "shard",
           "SCHEDULES", "TRAIN_OPTIMIZERS", "History", "batch_indices", "load_model", "lr_at", "make_optimizer",
           "methods", "optimizer_step", "prepare", "token_loss_sum", "train", "trainable_parameters", "validate",
           "WireCounter", "ring_bytes", "MERGEABLE", "check_merge", "merge"]
