"""The fast PyTorch paths of ``lorabook.quant.nf4`` (QLoRA, Dettmers et al. 2023, sec. 3,
https://arxiv.org/abs/2305.14314): the same answers as its readable functions, bit for bit, in fewer passes.

``nf4.nearest_code_reference`` and ``nf4.dequantize_4bit_reference`` are the formulas as a student reads them:

    nearest:     code = order[bucketize(x, midpoints)]           a binary search over the 15 midpoints per value
    dequantize:  w = level[unpack(packed)] · absmax[i // bs]     unpack, index, expand absmax, multiply, round

This module computes the same with lookup tables (any device; ``nf4`` dispatches here with backend "fast" /
"torch"). ``lorabook.quant.cpu_kernel`` is the third way, a compiled loop for the CPU.

    nearest_code(scaled (n,) fp32, levels (16,)) -> (n,) uint8     two lookups in 2^16-entry tables + one compare,
        in steps of 2^16 values so the temporaries stay in cache
    dequantize_into(packed (ceil(n/2),) uint8, absmax (n_blocks,) fp32, levels (16,), out (n,), blocksize)
        one index_select into a 256-entry table of level pairs (a byte -> its two fp32 levels), then one multiply
        per block, chunk by chunk so the fp32 values are scaled while still in cache

The tables are built once per codebook, from its 16 levels, and cached.
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["nearest_code", "dequantize_into", "nearest_tables", "pair_table", "DECODE_CHUNK", "NEAREST_CHUNK"]

DECODE_CHUNK = 2 ** 18  # values per step: a multiple of every blocksize; their fp32 values (1 MB) stay in cache
NEAREST_CHUNK = 2 ** 16  # values per step of nearest_code on the CPU


def _key(levels: torch.Tensor) -> tuple[float, ...]:
    """A hashable stand-in for the 16 levels (fp32 -> Python float is exact, and so is the way back)."""
    return tuple(levels.tolist())


# ---- nearest level: tables over the top 16 bits of a float32 ------------------------------------------------

@lru_cache(maxsize=None)
def nearest_tables(levels: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tables over the top 16 bits of a float32 that give the index of its nearest level (ties go lower).

    The 2^16 values sharing the top 16 bits form an interval of the reals that contains at most one midpoint
    between two levels. So  sorted_index(x) = below[cell] + (x > midpoint[cell])  (+inf when the cell has none),
    which equals ``torch.bucketize(x, midpoints)``, the rule bitsandbytes uses, for every float but a NaN.
    Returns (below (65536,) uint8, midpoint (65536,) fp32, order: sorted position -> code, or None if sorted)."""
    code = torch.tensor(levels, dtype=torch.float32)
    order = torch.argsort(code)  # the call bitsandbytes makes; FP4's code order is not sorted
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # (15,) fp32
    top = torch.arange(2 ** 16, dtype=torch.int32) << 16  # each cell's bit pattern with the low 16 bits 0 …
    first, last = top.view(torch.float32), (top | 0xFFFF).view(torch.float32)  # … and all 1
    last = torch.where(torch.isnan(last), first, last)  # ±inf share a cell with NaN payloads: keep ±inf's answer
    a, b = torch.bucketize(first, midpoints), torch.bucketize(last, midpoints)
    below, above = torch.minimum(a, b), torch.maximum(a, b)
    if (above - below).max() > 1:
        raise AssertionError("two midpoints share a 16-bit cell")  # cannot happen for nf4 / fp4 / int4
    midpoint = torch.where(above > below, midpoints[below.clamp(max=14)], torch.tensor(float("inf")))
    identity = torch.equal(order, torch.arange(16))
    return below.to(torch.uint8), midpoint, None if identity else order.to(torch.uint8)


def nearest_code(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The code of the nearest of ``levels`` (16,) fp32 (any device) for every value of an fp32 tensor, ties to the
    lower level.

    (...) fp32 -> (...) uint8, equal to ``nf4.nearest_code_reference`` for every non-NaN input. Two table lookups
    and a comparison per value instead of a binary search; on the CPU ``NEAREST_CHUNK`` values at a time, so the
    step's temporaries (cells, midpoints, comparisons: 0.6 MB) stay in cache instead of each being a fresh 4n or
    n bytes."""
    device, flat = scaled.device, scaled.reshape(-1)
    below, midpoint, order = (None if t is None else t.to(device) for t in nearest_tables(_key(levels)))
    n = flat.numel()
    step = min(n, NEAREST_CHUNK) if device.type == "cpu" else n  # on an accelerator: one step, few launches
    codes = torch.empty(n, dtype=torch.uint8, device=device)  # (n,)
    cell = torch.empty(step, dtype=torch.int32, device=device)  # this step's top 16 bits, 0 … 65535
    mid = torch.empty(step, device=device)  # this step's cell midpoints
    above = torch.empty(step, dtype=torch.bool, device=device)  # value > its cell's midpoint
    for start in range(0, n, max(step, 1)):
        x = flat[start:start + step]
        m = x.numel()
        c, out = cell[:m], codes[start:start + m]
        torch.bitwise_right_shift(x.view(torch.int32), 16, out=c).bitwise_and_(0xFFFF)
        torch.index_select(below, 0, c, out=out)  # the sorted index of the cell's lower level ...
        out += torch.gt(x, torch.index_select(midpoint, 0, c, out=mid[:m]), out=above[:m])  # ... + 1 past it
        if order is not None:  # sorted position -> code
            torch.index_select(order, 0, c.copy_(out), out=out)
    return codes.view(scaled.shape)


# ---- dequantize: a byte -> its two levels at once -----------------------------------------------------------

@lru_cache(maxsize=None)
def pair_table(levels: tuple[float, ...]) -> torch.Tensor:
    """(256,) float64 views of level pairs: entry b holds (level[b >> 4], level[b & 15]), the two fp32 values
    byte b decodes to. One 8-byte element per byte, so one ``index_select`` decodes a whole byte (2 KB: in L1)."""
    code = torch.tensor(levels, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.float64).view(-1)


def _decode(packed: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor, index: torch.Tensor) -> None:
    """Write the levels of (nbytes,) packed codes into ``out`` (2 · nbytes,) fp32, high nibble first.

    index: an int32 scratch buffer of at least nbytes entries (index_select wants int32 or int64 indices)."""
    index = index[:packed.numel()]
    index.copy_(packed)  # (nbytes,) uint8 -> int32
    torch.index_select(pairs, 0, index, out=out.view(torch.float64))


def dequantize_into(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, out: torch.Tensor,
                    blocksize: int) -> None:
    """out[i] = dtype(levels[codes[i]] · absmax[i // blocksize]) for the n = out.numel() codes in ``packed``.

    packed (ceil(n / 2),) uint8, absmax (ceil(n / blocksize),) fp32 and out (n,) fp32/bf16/fp16 on one device,
    levels (16,) fp32 anywhere (its values build a cached table) -- the arguments of ``cpu_kernel.dequantize_into``,
    which ``nf4.dequantize_4bit`` has checked (shapes that do not fit make the PyTorch ops below raise)."""
    n, device = out.numel(), out.device
    pairs = pair_table(_key(levels)).to(device)
    chunk = min(n + n % 2, DECODE_CHUNK)
    index = torch.empty(chunk // 2, dtype=torch.int32, device=device)  # scratch for _decode
    buffer = torch.empty(chunk, device=device) if out.dtype != torch.float32 or n % 2 else None
    for start in range(0, n, DECODE_CHUNK):  # chunk by chunk: the fp32 values are scaled while still in cache
        stop = min(start + DECODE_CHUNK, n)
        m = stop - start
        # decode straight into an fp32 output; into the fp32 buffer for another dtype or an odd count
        values = out[start:stop] if buffer is None else buffer[:m + m % 2]
        _decode(packed[start // 2:(stop + 1) // 2], pairs, values, index)
        values = values[:m]  # an odd count has one padding value more
        first, full = start // blocksize, m // blocksize  # this chunk's first block, its complete blocks
        values[:full * blocksize].view(full, blocksize).mul_(absmax[first:first + full, None])
        if m % blocksize:
            values[full * blocksize:].mul_(absmax[-1])  # the last, partial block
        if buffer is not None:
            out[start:stop] = values  # rounds fp32 to dtype once
