"""S²-Attn on torch's CPU flash-attention kernel, with its own backward: the memory-lean fast path.

``lorabook.longlora.s2_attention(path="grouped")`` reshapes the groups into ``scaled_dot_product_attention`` calls
and lets autograd keep what each call needs: the key/value heads repeated for GQA, copies of the shifted heads'
groups, every call's output and the concatenated output; and the backward of each slice allocates a full-size
zero gradient. Its peak memory is above full flash attention's. Here every piece of the work is a *view* of q, k
and v, and the backward is the kernel's own (LongLoRA's flash path, ``cu_seqlens`` offsets, does the same on a GPU):

    for each batch row, each run of query heads that reads one key/value head (GQA), each of their groups:
        (1, heads, group, d) views of q, k, v: no copy, no repeated key/value heads (the kernel reads them)
        out[piece], lse = flash(q[piece], k[piece], v[piece])             lse: log-sum-exp, (1, heads, group)
    backward: dq[piece] = ..., dk[piece] += ..., dv[piece] += flash_backward(dout[piece], q, k, v, out, lse)

so a step keeps what full flash attention keeps: the inputs, one output and a log-sum-exp per query row. Shifted
heads: the groups [0, g/2), [g/2, 3g/2), …, [n − g/2, n) -- the two half-groups are pieces of their own (no roll).

CPU only (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``), no dropout;
``lorabook.longlora.s2_attention`` picks this path where it applies and the grouped one elsewhere.
Shapes: q (b, H, n, d); k, v (b, H_kv, n, d); n a multiple of g (the caller pads); the last dim of stride 1.
"""
from __future__ import annotations

import torch

__all__ = ["kernel_available", "s2_attention_kernel", "pieces", "head_runs", "DTYPES"]

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether ``s2_attention_kernel`` runs these tensors: CPU, a kernel dtype, no dropout, unit last stride."""
    return (_FLASH is not None and _FLASH_BACKWARD is not None and dropout_p == 0
            and all(t.device.type == "cpu" and t.dtype == q.dtype and t.stride(-1) == 1 for t in (q, k, v))
            and q.dtype in DTYPES)


def head_runs(lo: int, hi: int, per_kv: int) -> list[tuple[slice, slice]]:
    """Query heads [lo, hi) -> (query heads, key/value heads) runs: whole GQA groups together (the kernel repeats
    the key/value heads itself), a group cut by lo or hi on its own. 9 heads on 3, [4, 9): [4, 6) on key/value
    head 1, [6, 9) on head 2."""
    cuts = sorted({lo, hi} | {c for c in (-(-lo // per_kv) * per_kv, hi // per_kv * per_kv) if lo < c < hi})
    return [(slice(a, e), slice(a // per_kv, (e - 1) // per_kv + 1)) for a, e in zip(cuts, cuts[1:])]


def pieces(batch: int, heads: int, kv_heads: int, n: int, g: int, shift: bool) -> list[tuple]:
    """Every kernel call of one S²-Attn, one group each: (batch row, query heads, key/value heads, start, stop).

    Heads h < heads // 2 (all of them with shift=False): the groups [0, g), [g, 2g), … The others: [0, g/2),
    [g/2, 3g/2), …, [n − g/2, n). One group per call keeps each call's gradients small (they are added into
    the whole gradient as they come); the kernel's threads split the group's heads and query blocks."""
    split = heads // 2 if shift else heads
    bounds = {False: list(range(0, n + 1, g)), True: [0, *range(g // 2, n, g), n]}
    out = []
    for b in range(batch):
        for shifted, (lo, hi) in ((False, (0, split)), (True, (split, heads))):
            for q_heads, kv in head_runs(lo, hi, heads // kv_heads) if hi > lo else []:
                edges = bounds[shifted]
                out += [(b, q_heads, kv, start, stop) for start, stop in zip(edges, edges[1:])]
    return out


def _view(t: torch.Tensor, heads: slice, piece: tuple) -> torch.Tensor:
    """(b, heads, n, d) -> the piece's (1, heads, group, d) view: no copy."""
    b, _, _, start, stop = piece
    return t[b:b + 1, heads, start:stop]


class _S2Kernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g: int, causal: bool, shift: bool, scale):
        runs = pieces(q.shape[0], q.shape[1], k.shape[1], q.shape[2], g, shift)
        out, lses = torch.empty_like(q), []                                   # (b, H, n, d)
        for p in runs:
            o, lse = _FLASH(_view(q, p[1], p), _view(k, p[2], p), _view(v, p[2], p), 0.0, causal, scale=scale)
            _view(out, p[1], p).copy_(o)
            lses.append(lse)                                                  # (1, heads, group)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.runs, ctx.causal, ctx.scale = runs, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        dout = dout.contiguous()                   # a broadcast gradient (stride 0) is not a kernel input
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for p, lse in zip(ctx.runs, lses):
            grads = _FLASH_BACKWARD(_view(dout, p[1], p), _view(q, p[1], p), _view(k, p[2], p), _view(v, p[2], p),
                                    _view(out, p[1], p), lse, 0.0, ctx.causal, scale=ctx.scale)
            for acc, heads, grad in zip((dq, dk, dv), (p[1], p[2], p[2]), grads):
                _view(acc, heads, p).add_(grad)
        return dq, dk, dv, None, None, None, None


def s2_attention_kernel(q, k, v, g: int, causal: bool = True, shift: bool = True, scale=None) -> torch.Tensor:
    """S²-Attn on (b, H, n, d) / (b, H_kv, n, d) tensors with n % g == 0, arguments already checked
    (``lorabook.longlora.check_s2_args``) and ``kernel_available`` true -> (b, H, n, d)."""
    return _S2Kernel.apply(q, k, v, g, causal, shift, scale)
