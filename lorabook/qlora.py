"""QLoRA in one call (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the pieces of notebooks 02-06 put
together the way the paper trains.

The QLoRA layer (their eq. 5), for every linear layer of the decoder:

    Y = X · doubleDequant(c1, c2, W_NF4) + (α / r) · X Aᵀ Bᵀ       X (..., in), W (out, in), A (r, in), B (out, r)

``prepare_qlora(model)``, in place and in this order:

    1. every linear layer except the output head -> ``LinearNF4`` (NF4, blocksize 64, double quantization;
       computes in ``compute_dtype``, bf16 as in the paper)                          lorabook.quant.linear
    2. everything frozen; LoRA (r = 64, α = 16) on every linear layer but the head -- the paper finds that
       LoRA on all layers, not only q and v, is what matches 16-bit fine-tuning       lorabook.lora
    3. gradient checkpointing (non-reentrant, per decoder layer)                      lorabook.models
    4. a ``PagedAdamW`` over the LoRA parameters (lr 2e-4, no weight decay, the paper's) lorabook.paged

and returns ``(model, optimizer)``; ``add_qlora`` is steps 1-3 alone (``python -m lorabook.train --method
qlora --optimizer paged_adamw``). Adapters save in PEFT's format (``lorabook.lora.peft_format.save_adapter``) like any other
LoRA adapter: A and B do not depend on the base being 4-bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_flag, check_module
from .lora import add_lora, check_lora_targets
from .models import check_checkpointing, enable_checkpointing
from .paged import PagedAdamW
from .quant.linear import quantize_model
from .quant.nf4 import FLOAT_DTYPES, check_blocksize


def add_qlora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
              target_modules="all-linear", blocksize: int = 64, double_quant: bool = True,
              compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = True) -> nn.Module:
    """Steps 1-3 (NF4 base, LoRA, checkpointing), in place; returns the model. ``lorabook.train``'s "qlora" method.

    target_modules: as ``add_lora`` takes them; "all-linear" = every linear layer but the output head.
    Everything is checked before the model changes -- the arguments, every target, whether the model can
    checkpoint -- and every layer is quantized before any is swapped in (a NaN in the last layer's weight raises
    with the model as it was)."""
    check_module("model", model)
    if compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}")
    check_blocksize(blocksize)
    check_flag("double_quant", double_quant)
    check_flag("gradient_checkpointing", gradient_checkpointing)
    if gradient_checkpointing:
        check_checkpointing(model)  # step 3 cannot fail after steps 1-2 changed the model
    for name in check_lora_targets(model, target_modules, r, alpha, dropout):  # add_lora's checks, run first
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):  # e.g. GPT-2's Conv1D: quantize_model would leave it full precision
            raise ValueError(f"target {name} is a {type(module).__name__}; QLoRA quantizes nn.Linear layers only")
    quantize_model(model, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    add_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def prepare_qlora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
                  target_modules="all-linear", blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = True,
                  lr: float = 2e-4, weight_decay: float = 0.0, page_bytes: int = 2 ** 20,
                  budget_bytes: int | None = None) -> tuple[nn.Module, PagedAdamW]:
    """NF4 base + LoRA + gradient checkpointing (``add_qlora``) + a ``PagedAdamW`` over A and B; in place.

    Every argument is checked before the model changes."""
    check_module("model", model)
    PagedAdamW([nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=weight_decay, page_bytes=page_bytes,
               budget_bytes=budget_bytes)  # raises for bad optimizer settings, before the model changes
    add_qlora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, blocksize=blocksize,
              double_quant=double_quant, compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]  # the LoRA A and B matrices
    optimizer = PagedAdamW(trainable, lr=lr, weight_decay=weight_decay, page_bytes=page_bytes,
                           budget_bytes=budget_bytes)
    return model, optimizer
