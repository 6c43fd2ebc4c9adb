"""``python -m lorabook.bench qlora-step``: one QLoRA training step, lorabook against peft on bitsandbytes.

The model: a random Llama of SmolLM2-135M's shape (``--quick``: the tiny test Llama), every linear layer but the
head in NF4 with double quantization and bf16 compute, LoRA r = 8 (α = 16) on all of them, batch 4 × 128 tokens.

    lorabook     ``lorabook.qlora.add_qlora`` (LinearNF4 + LoRALinear), checkpointing off
    peer         the same weights in ``bitsandbytes.nn.Linear4bit`` (nf4, compress_statistics, bf16 compute)
                 under ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))``

Timed: forward + backward + ``zero_grad`` (the optimizer is not the question here: ``bench paged`` times it).
Peak memory of that step ("bytes"): torch's MemTracker over one step of each (``lorabook.memory.step_peak``),
bitsandbytes' quantization state (not a parameter or buffer) handed to it so that it is counted too.
``loss_diff`` is |loss_lorabook − loss_peer| on the same batch: the two dequantize to the same bf16 weights
(bit-exact NF4), so what differs is only the order of the LoRA arithmetic (and, on a CPU without bf16 matrix
instructions, of the base's sums: there ``lorabook.quant.linear.compute_linear`` accumulates a bf16 GEMM in fp32
BLAS; on one with them, and on a GPU, both use torch's bf16 GEMM).

A second case times that choice alone: one bf16 layer of SmolLM2's MLP shape (576 -> 1536, 2 × 128 tokens),
forward ``x Wᵀ`` and backward ``g W``, by ``compute_linear``'s fp32 sums ("fp32-accumulate") against torch's own
bf16 GEMM ("native"); "auto" takes the second where ``cpu_has_bf16_matmul()`` (the row says which).
``max_ulp_diff`` is the largest difference between the two, in units of bf16's last place.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, step_batch, threads
from ..qlora import add_qlora
from ..quant.linear import compute_linear, cpu_has_bf16_matmul

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


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """bitsandbytes' block constants (absmax codes, the second-level absmax, code tables): attributes of each
    ``Params4bit.quant_state``, neither parameters nor buffers, so MemTracker must be handed them to count them."""
    tensors = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if isinstance(value, torch.Tensor):
                    tensors[id(value)] = value
    return list(tensors.values())


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

    from ..memory import step_peak

    dev = bench_device()
    base, ids = step_batch(quick, dev, batch=4)
    B, T = ids.shape
    torch.manual_seed(0)
    ours = add_qlora(copy.deepcopy(base), r=RANK, alpha=ALPHA, dropout=0.0, gradient_checkpointing=False).train()
    theirs = bnb_qlora(copy.deepcopy(base)).train()
    steps = {"lorabook": _step(ours, ids), "peer": _step(theirs, ids)}
    losses = {name: step() for name, step in steps.items()}
    peaks = {"lorabook": step_peak(steps["lorabook"], ours, ids)["Total"],
             "peer": step_peak(steps["peer"], theirs, ids, *quant_state_tensors(theirs))["Total"]}
    repeat = 1 if quick else 2
    t = interleaved({name: (nothing, step, nothing) for name, step in steps.items()},
                    rounds=2 if quick else 3, repeat=repeat, warmup=1, device=dev)
    peer = f"peft {peft.__version__} + bitsandbytes {bitsandbytes.__version__}"
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return [row(f"QLoRA r8 all-linear, b{B} s{T}", "seconds", t["lorabook"].median, peer, t["peer"].median,
                paired_ratio=paired_ratio(t["lorabook"], t["peer"], repeat),
                loss_diff=abs(losses["lorabook"] - losses["peer"])),
            row(f"QLoRA r8 all-linear, b{B} s{T}", "bytes", peaks["lorabook"], peer, peaks["peer"]),
            row(f"QLoRA r8 all-linear, b{B} s{T}", "trainable params", trainable(ours), peer, trainable(theirs)),
            _gemm_row(quick, dev)]


def _gemm_row(quick: bool, dev) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens, d_in, d_out = (64, 64, 192) if quick else (256, 576, 1536)  # SmolLM2's up_proj: 576 -> 1536
    x, w, grad = (torch.randn(*shape, generator=g).bfloat16().to(dev)
                  for shape in ((tokens, d_in), (d_out, d_in), (tokens, d_out)))

    def layer(backend: str):
        return lambda: (compute_linear(x, w, backend=backend), compute_linear(grad, w.t(), backend=backend))
    runs = {"fp32-accumulate": layer("fp32-accumulate"), "native": layer("native")}
    outputs = {name: run() for name, run in runs.items()}
    ulp = lambda t: torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - 7)  # noqa: E731
    max_ulp = max(((a.float() - b.float()).abs() / ulp(b)).max().item()
                  for a, b in zip(outputs["fp32-accumulate"], outputs["native"]))
    repeat = 1 if quick else 3
    t = interleaved({name: (nothing, run, nothing) for name, run in runs.items()},
                    rounds=2 if quick else 5, repeat=repeat, warmup=1, device=dev)
    return row(f"bf16 linear fwd+bwd {d_in}->{d_out}, {tokens} tokens, fp32 sums", "seconds",
               t["fp32-accumulate"].median, f"torch {torch.__version__.split('+')[0]} bf16 GEMM", t["native"].median,
               paired_ratio=paired_ratio(t["fp32-accumulate"], t["native"], repeat), max_ulp_diff=max_ulp,
               auto="native" if cpu_has_bf16_matmul() else "fp32-accumulate")
