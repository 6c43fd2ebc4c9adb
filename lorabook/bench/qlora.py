"""``python -m lorabook.bench qlora-step``: one QLoRA training step, lorabook against peft on bitsandbytes.

The model: a random Llama of SmolLM2-135M's shape (``--quick``: the tiny test Llama), every linear layer but the
head in NF4 with double quantization and bf16 compute, LoRA r = 8 (α = 16) on all of them, batch 2 × 128 tokens.

    lorabook     ``lorabook.qlora.add_qlora`` (LinearNF4 + LoRALinear), checkpointing off
    peer         the same weights in ``bitsandbytes.nn.Linear4bit`` (nf4, compress_statistics, bf16 compute)
                 under ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))``

Timed: forward + backward + ``zero_grad`` (the optimizer is not the question here: ``bench paged`` times it).
``loss_diff`` is |loss_lorabook − loss_peer| on the same batch: the two dequantize to the same bf16 weights
(bit-exact NF4), so what differs is only the order of the LoRA arithmetic.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, step_batch, threads
from ..qlora import add_qlora

RANK, ALPHA = 8, 16


def bnb_qlora(model: nn.Module):
    """``model`` (in place) with bitsandbytes' Linear4bit for every linear but the head, then peft's LoRA."""
    import bitsandbytes as bnb
    import peft

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, layer.to(child.weight.device))  # .to quantizes (on CPU too)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _step(model: nn.Module, ids: torch.Tensor):
    def run() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    return run


@register("qlora-step")
def qlora_step(quick: bool = False) -> list[dict]:
    with threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' optional CPU kernel package; peft's deprecation notes
        return _qlora_step(quick)


def _qlora_step(quick: bool) -> list[dict]:
    import bitsandbytes
    import peft

    dev = bench_device()
    base, ids = step_batch(quick, dev)
    B, T = ids.shape
    torch.manual_seed(0)
    ours = add_qlora(copy.deepcopy(base), r=RANK, alpha=ALPHA, dropout=0.0, gradient_checkpointing=False).train()
    theirs = bnb_qlora(copy.deepcopy(base)).train()
    steps = {"lorabook": _step(ours, ids), "peer": _step(theirs, ids)}
    losses = {name: step() for name, step in steps.items()}
    repeat = 1 if quick else 2
    t = interleaved({name: (nothing, step, nothing) for name, step in steps.items()},
                    rounds=2 if quick else 5, repeat=repeat, warmup=1, device=dev)
    peer = f"peft {peft.__version__} + bitsandbytes {bitsandbytes.__version__}"
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return [row(f"QLoRA r8 all-linear, b{B} s{T}", "seconds", t["lorabook"].median, peer, t["peer"].median,
                paired_ratio=paired_ratio(t["lorabook"], t["peer"], repeat),
                loss_diff=abs(losses["lorabook"] - losses["peer"])),
            row(f"QLoRA r8 all-linear, b{B} s{T}", "trainable params", trainable(ours), peer, trainable(theirs))]
