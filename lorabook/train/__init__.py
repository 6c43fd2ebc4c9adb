"""One training loop for every lesson, its checkpoints, torch.distributed, and ``python -m lorabook.train``.

    loop.py         train(model, examples, tokenizer, steps=..., lr=...) -> History; prepare(model, method)
    checkpoint.py   save_checkpoint / load_checkpoint (read_checkpoint, then apply_checkpoint): one safetensors
                    file, resumable bit for bit, checked whole before any of it is loaded
    distributed.py  torchrun: the process group, ranks
    __main__.py     python -m lorabook.train --method lora|qlora|... --model smollm2|tiny ...
"""
from .checkpoint import CKPT_NAME, Checkpoint, apply_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .distributed import distributed, world_size
from .loop import (SCHEDULES, TRAIN_OPTIMIZERS, History, batch_indices, load_model, lr_at, make_optimizer, methods,
                   optimizer_step, prepare, token_loss_sum, train, trainable_parameters, validate)

__all__ = ["CKPT_NAME", "Checkpoint", "apply_checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "distributed", "world_size", "SCHEDULES", "TRAIN_OPTIMIZERS", "History", "batch_indices", "load_model",
           "lr_at",
           "make_optimizer", "methods", "optimizer_step", "prepare", "token_loss_sum", "train", "trainable_parameters",
           "validate"]
