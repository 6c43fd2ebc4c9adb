"""``python -m lorabook.bench s2attn``: LongLoRA's S²-Attn against full causal attention, forward + backward.

SmolLM2-135M's attention shapes: 9 query heads, 3 key/value heads (GQA), head_dim 64, batch 1, fp32, at 1024 /
2048 / 4096 / 8192 tokens (``--quick``: 256 / 512). One step is the attention's forward and backward (the
gradient of q, k and v for a fixed upstream gradient):

    lorabook   ``lorabook.longlora.s2_attention`` with group = n / 4, half of the heads shifted by half a group;
               its default path: on a CPU the flash kernel on views with its own backward
               (``lorabook.longlora_kernel``), elsewhere the grouped path; and beside it ``path="grouped"`` (every
               group a batch entry of one ``scaled_dot_product_attention``, under autograd)
    peer       torch's ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``: full causal attention,
               as a transformers model runs it for an unpadded batch. On a CPU (and a GPU) this is a flash kernel:
               it never stores the n x n scores, so its memory is already O(n) -- S²-Attn saves time here, and
               bytes only where it keeps less than the flash kernel does (the kernel path; the grouped one keeps more)
    eager      the same attention with the scores materialized (SDPA's math backend, like transformers' "eager"),
               the O(n²)-memory attention LongLoRA's memory claim is against; up to 4096 tokens

Rows: seconds of the step (median over interleaved rounds, ``paired_ratio`` beside it), the peak bytes of one
step (torch's MemTracker, ``lorabook.memory.step_peak``), and the FLOP ratio (``lorabook.longlora.attention_flops``:
full / S²-Attn, the limit the time ratio approaches; above 4 because the shifted heads' two half-groups score
fewer pairs than one whole group).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, threads
from ..longlora import attention_flops, s2_attention
from ..memory import step_peak

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
EAGER, EAGER_MAX = "full causal, scores materialized (SDPA math)", 4096  # 8k: ~10 GB of n x n scores and grads


def _inputs(n: int, device) -> tuple[nn.ParameterList, torch.Tensor]:
    """q (1, 9, n, 64), k and v (1, 3, n, 64) as parameters (so their gradients are what a step makes), and the
    upstream gradient (1, 9, n, 64); seeded."""
    g = torch.Generator().manual_seed(n)
    qkv = nn.ParameterList([torch.randn(1, h, n, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)])
    return qkv.to(device), torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device)


def _steps(qkv: nn.ParameterList, grad: torch.Tensor, n: int) -> dict:
    q, k, v = qkv

    def s2():
        s2_attention(q, k, v, n // 4).backward(grad)

    def grouped():
        s2_attention(q, k, v, n // 4, path="grouped").backward(grad)

    def full():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

    def eager():
        with sdpa_kernel(SDPBackend.MATH):
            full()
    return {"s2": s2, "grouped": grouped, "full": full, "eager": eager}


def _zero_grads(qkv: nn.ParameterList) -> None:
    for p in qkv:
        p.grad = None


@register("s2attn")
def bench_s2attn(quick: bool = False) -> list[dict]:
    with threads():
        return _bench(quick)


def _bench(quick: bool) -> list[dict]:
    dev = bench_device()
    rows = []
    for n in (256, 512) if quick else (1024, 2048, 4096, 8192):
        qkv, grad = _inputs(n, dev)
        steps = _steps(qkv, grad, n)
        rounds, repeat = (2, 1) if quick or n >= 4096 else (3, 2)
        if n > EAGER_MAX:
            del steps["eager"]
        t = interleaved({name: (lambda: _zero_grads(qkv), fn, nothing) for name, fn in steps.items()},
                        rounds=rounds, repeat=repeat, warmup=1, device=dev)
        flop_ratio = attention_flops(n, HEAD_DIM, HEADS) / attention_flops(n, HEAD_DIM, HEADS, n // 4)
        case = f"attention fwd+bwd, {n} tokens, 9/3 heads x 64"
        s2_case, grouped_case = f"{case}: S2-Attn group {n // 4}", f"{case}: S2-Attn grouped path, group {n // 4}"
        rows.append(row(s2_case, "seconds", t["s2"].median, "full causal SDPA", t["full"].median,
                        paired_ratio=paired_ratio(t["s2"], t["full"], repeat), flop_ratio=flop_ratio))
        rows.append(row(grouped_case, "seconds", t["grouped"].median, "full causal SDPA", t["full"].median,
                        paired_ratio=paired_ratio(t["grouped"], t["full"], repeat)))
        peaks = {}
        for name, fn in steps.items():
            _zero_grads(qkv)
            peaks[name] = step_peak(fn, qkv, grad)["Total"]
        rows.append(row(s2_case, "bytes", peaks["s2"], "full causal SDPA", peaks["full"]))
        rows.append(row(grouped_case, "bytes", peaks["grouped"], "full causal SDPA", peaks["full"]))
        if "eager" in steps:
            rows.append(row(s2_case, "bytes", peaks["s2"], EAGER, peaks["eager"]))
            rows.append(row(s2_case, "seconds", t["s2"].median, EAGER, t["eager"].median,
                            paired_ratio=paired_ratio(t["s2"], t["eager"], repeat)))
    return rows
