"""``python -m lorabook.bench qalora``: what QA-LoRA's exact merge buys at inference, in time and bytes.

The model: a random Llama of SmolLM2-135M's shape (``--quick``: the tiny test Llama). Its decoder stack
(``model.model``: the embedding, 30 decoder layers, the final norm; not the 49152-wide head, which no variant
quantizes) runs one forward at batch 1, in three forms:

    lorabook   QA-LoRA merged: every linear layer but the head group-wise INT4 (groups of 64), the adapter in the
               zero points -- one ``LinearGroupwise`` per layer, nothing else; bf16 compute
    peer       QLoRA unmerged, as QLoRA serves it: NF4 + double quantization (``LinearNF4``) + the LoRA branch
               (r = 8, B trained away from zero); bf16 compute
    base       the fp32 model as loaded (torch's fp32 GEMM; on a CPU without bf16 matrix instructions torch's
               own bf16 GEMM is a slow generic loop, which the quantized layers avoid, ``compute_linear``)

Rows: seconds of the forward (1 token, and 64 tokens: decoding vs a short prompt), QA-LoRA vs QLoRA and vs the
fp32 base; bytes of the quantized linear layers, INT4 (groups of 64) against their fp16 bytes and against NF4.
``merge_rel_diff``: ‖h_merged − h_unmerged‖ / ‖h_unmerged‖ of the QA-LoRA stack's last hidden states, merged vs
not, in bf16 (the exact fp32 equality is a test, tests/test_qalora.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, smollm2_shaped, threads
from ..lora import lora_layers
from ..qalora import add_qalora, merge_qalora, qalora_layers
from ..qlora import add_qlora
from ..quant.groupwise import LinearGroupwise
from ..quant.linear import LinearNF4

RANK, ALPHA, GROUP = 8, 16, 64


def _trained(Bs) -> None:
    """Every B away from zero (seeded), as after fine-tuning: an unmerged adapter then does real work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B in Bs:
            B.copy_(torch.randn(B.shape, generator=g) * 0.01)


def _linear_bytes(model: nn.Module, kind: type) -> int:
    return sum(m.nbytes for m in model.modules() if isinstance(m, kind))


@register("qalora")
def bench_qalora(quick: bool = False) -> list[dict]:
    with threads(), torch.no_grad():
        return _bench(quick)


def _bench(quick: bool) -> list[dict]:
    dev = bench_device()
    base = smollm2_shaped(quick=quick).eval()
    group = 16 if quick else GROUP
    head = base.get_output_embeddings()
    fp16_bytes = sum(2 * m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear) and m is not head)
    torch.manual_seed(0)
    r = 2 if quick else RANK
    qa = add_qalora(copy.deepcopy(base), bits=4, group_size=group, r=r, alpha=ALPHA, compute_dtype=torch.bfloat16)
    _trained(m.lora_B for m in qalora_layers(qa).values())
    ql = add_qlora(copy.deepcopy(base), r=r, alpha=ALPHA, dropout=0.0,
                   gradient_checkpointing=False).eval()
    _trained(m.lora_B[m.active_adapter] for m in lora_layers(ql).values())
    rows = []
    for tokens in (1, 64):
        ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        unmerged = qa.model(ids.to(dev)).last_hidden_state
        merged = merge_qalora(copy.deepcopy(qa)).to(dev).eval()
        diff = (merged.model(ids).last_hidden_state.float() - unmerged.float()).norm() / unmerged.float().norm()
        runs = {"qalora": lambda m=merged, i=ids: m.model(i), "qlora": lambda i=ids: ql.model(i),
                "fp32": lambda i=ids: base.model(i)}
        repeat = 2 if quick else 5
        t = interleaved({name: (nothing, run, nothing) for name, run in runs.items()},
                        rounds=2 if quick else 5, repeat=repeat, warmup=1, device=dev)
        case = f"decoder stack fwd, batch 1 x {tokens} token{'s' if tokens > 1 else ''}"
        rows.append(row(f"{case}: QA-LoRA INT4 g{group} merged", "seconds", t["qalora"].median,
                        f"QLoRA unmerged (NF4+DQ + LoRA r{r})", t["qlora"].median, merge_rel_diff=float(diff),
                        paired_ratio=paired_ratio(t["qalora"], t["qlora"], repeat)))
        rows.append(row(f"{case}: QA-LoRA INT4 g{group} merged", "seconds", t["qalora"].median, "fp32 base",
                        t["fp32"].median, paired_ratio=paired_ratio(t["qalora"], t["fp32"], repeat)))
    merged = merge_qalora(copy.deepcopy(qa))
    int4 = _linear_bytes(merged, LinearGroupwise)
    rows.append(row(f"linear layers' bytes, INT4 g{group} (codes + fp16 scale + fp32 zero)", "bytes", int4,
                    "fp16 weights", fp16_bytes))
    rows.append(row(f"linear layers' bytes, INT4 g{group}", "bytes", int4, "NF4 + double quant (blocks of 64)",
                    _linear_bytes(ql, LinearNF4)))
    return rows
