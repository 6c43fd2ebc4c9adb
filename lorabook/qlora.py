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
qlora --optimizer paged_adamw``). Adapters save in PEFT's format (``lorabook.lora.peft_format.save_adapter``) like
any other LoRA adapter: A and B do not depend on the base being 4-bit.

Merging. The adapter was trained against the 4-bit base, so it belongs with dequant(W4), not with the 16-bit
weights the base was quantized from (a common mistake with peft and unsloth, which costs accuracy):

    merge_qlora(model)                    W ← dequant(W4) + ΔW              an nn.Linear in the weight's dtype
    merge_qlora(model, requantize=True)   W4 ← NF4(dequant(W4) + ΔW)        a LinearNF4 again (peft's 4-bit merge)

ΔW = (α / r) · B A is added in fp32 (``merged_weight``; ``requantized_weight`` is the NF4 of that sum). The
re-quantized merge is 4-bit again, at the price of a new rounding -- which, for an adapter whose ΔW is smaller than
half the gap between NF4 levels, rounds most of ΔW away (notebook 07 §4 measures it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_flag, check_module
from .lora import LoRALinear, active_adapter, adapter_names, add_lora, check_lora_targets, lora_layers
from .models import check_checkpointing, enable_checkpointing
from .paged import PagedAdamW
from .quant.linear import LinearNF4, quantize_model
from .quant.nf4 import FLOAT_DTYPES, check_blocksize, dequantize_4bit, quantize_4bit


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


def merged_weight(layer: LoRALinear, adapter_name: str | None) -> torch.Tensor:
    """dequant(W4) + ΔW of a LoRA layer on a LinearNF4, in fp32 (out, in); ΔW = 0 where the layer lacks the
    adapter (a new tensor, outside autograd)."""
    with torch.no_grad():
        W = dequantize_4bit(layer.base.quantized, torch.float32)  # (out, in)
        if adapter_name in layer.lora_A:
            W = W + layer.delta_weight(adapter_name).float()
    return W


def merge_qlora(model: nn.Module, requantize: bool = False, adapter_name: str | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the QLoRA adapter ``adapter_name`` (default: the active one) into the 4-bit base, in place; returns
    the model with every LoRA-on-LinearNF4 layer replaced by a plain layer (the other adapters are dropped):

        requantize=False   nn.Linear with weight dequant(W4) + ΔW in ``dtype`` (default: the dtype the weight
                           had before it was quantized)
        requantize=True    LinearNF4 of dequant(W4) + ΔW: the layer's blocksize, codebook, double quantization
                           and compute dtype

    Every new layer is built before any is swapped in: on an error the model is unchanged."""
    check_module("model", model)
    check_flag("requantize", requantize)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES} or None, got {dtype}")
    layers = lora_layers(model)
    on_4bit = {path: m for path, m in layers.items() if isinstance(m.base, LinearNF4)}
    if not on_4bit:
        raise ValueError("model has no LoRA layer on a 4-bit base (LinearNF4): nothing for merge_qlora to merge"
                         + (f" (its LoRA layers wrap {type(next(iter(layers.values())).base).__name__}: use "
                            "merge_lora or merge_and_unload)" if layers else
                            " -- was it merged already? merge_qlora replaces those layers by plain ones"))
    others = [path for path in layers if path not in on_4bit]
    if others:
        raise ValueError(f"merge_qlora merges LoRA on 4-bit layers; {others[:3]} carry LoRA on other layers: "
                         "merge those with merge_lora first")
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name is None or name not in adapter_names(model):
        raise ValueError(f"unknown adapter_name {name!r}: the model has {adapter_names(model)}"
                         if name is not None else f"no adapter is active; pass adapter_name (one of "
                         f"{adapter_names(model)})")
    replacements = {path: _merged_layer(m, name, requantize, dtype) for path, m in on_4bit.items()}
    for path, layer in replacements.items():
        model.set_submodule(path, layer)
    return model


def requantized_weight(layer: LoRALinear, adapter_name: str | None, merged: torch.Tensor | None = None):
    """NF4(dequant(W4) + ΔW) of a LoRA layer on a LinearNF4: a QuantizedTensor with the layer's blocksize, codebook
    and double quantization (``merged``: that layer's ``merged_weight``, if already computed)."""
    base = layer.base
    W = merged_weight(layer, adapter_name) if merged is None else merged  # (out, in) fp32
    with torch.no_grad():
        return quantize_4bit(W.to(base.weight_dtype), blocksize=base.blocksize, codebook=base.codebook,
                             double_quant=base.weight_absmax_codes is not None)


def _merged_layer(layer: LoRALinear, adapter_name: str, requantize: bool, dtype) -> nn.Module:
    base = layer.base
    if requantize:
        return LinearNF4(requantized_weight(layer, adapter_name), base.bias, compute_dtype=base.compute_dtype)
    W = merged_weight(layer, adapter_name)  # (out, in) fp32
    with torch.no_grad():
        dtype = base.weight_dtype if dtype is None else dtype
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=W.device,
                           dtype=dtype)
        merged.weight.copy_(W)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
    return merged
