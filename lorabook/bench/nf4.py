"""``python -m lorabook.bench nf4``: NF4 quantize and dequantize, lorabook against bitsandbytes in the same run.

For a 4096×4096 weight (``--quick``: 512×512), blocksize 64, in fp32 and in bf16, we time

    quantize     lorabook ``quantize_nf4``    vs bitsandbytes ``quantize_4bit(quant_type="nf4")``   goal ratio ≤ 1.0
                                              vs a naive one: argmin |x / absmax - level| over the 16 levels
    dequantize   lorabook ``dequantize_nf4``  vs bitsandbytes ``dequantize_4bit``                   goal ratio ≤ 1.0
                 (the compiled kernel)        vs lorabook's own PyTorch path (the fallback), and vs the kernel's
                                              portable loop (no AVX-512)
                                              vs a naive one: unpack the nibbles, index the levels, multiply
    bandwidth    dequantize's bytes (packed codes and absmax read, the weight written) per second, as a fraction
                 of this machine's memcpy bandwidth (a ``clone`` of the dequantized weight: read + write)

Every comparison row says whether the two results are bit-for-bit the same (``exact``). The variants run in
interleaved rounds (``lorabook.bench.harness.interleaved``) on one CPU thread -- bitsandbytes too: its C kernels use
OpenMP through the system's libgomp, which ``torch.set_num_threads`` does not reach, so ``_bnb_threads`` sets it;
``paired_ratio`` is the median of the within-round ratios, the steadier number on a busy machine.

What bitsandbytes' CPU path does: quantize_4bit is plain PyTorch (bucketize against the level midpoints);
dequantize_4bit is one C loop over the bytes (OpenMP, AVX-512 permutes where the CPU has them). Ours
(``lorabook.quant.cpu_kernel``) is one C loop too: per block a 16-entry table of ``level · absmax`` already rounded to the
output dtype, then one AVX-512 permute per 16 (fp32) or 32 (bf16) values. Both write a freshly allocated output,
whose first touch (page faults: the kernel zeroing each 4 KB page) costs about as much as the loop itself; the
memcpy row pays it too. The PyTorch fallback makes two passes: an ``index_select`` into a table of level pairs,
then one multiply per block.
"""
from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager

import torch

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, threads
from ..quant import cpu_kernel
from ..quant.nf4 import codebook, dequantize_nf4, quantize_nf4


def naive_quantize(w: torch.Tensor, blocksize: int = 64, chunk: int = 2 ** 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious way: scale each block by its absmax, take the nearest of the 16 levels by argmin, pack.

    Returns (packed (numel / 2,) uint8, absmax (n_blocks,) fp32); needs numel to be a multiple of blocksize."""
    levels = codebook("nf4").to(w.device)
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1)
    codes = torch.cat([(part[:, None] - levels).abs().argmin(dim=1) for part in scaled.split(chunk)])  # (n,)
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def naive_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype, blocksize: int = 64) -> torch.Tensor:
    """The obvious way: split every byte into its two nibbles, look both up in the 16 levels, multiply by absmax."""
    levels = codebook("nf4").to(packed.device)
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()  # (n,)
    values = levels[codes].view(-1, blocksize) * absmax[:, None]
    return values.reshape(shape).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


@contextmanager
def _bnb_threads():
    """Run bitsandbytes' OpenMP loops on as many threads as torch uses (libgomp: its own thread count)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the soname libbitsandbytes_cpu links; torch bundles its own copy
    except OSError:  # another OpenMP runtime (macOS, Windows): leave it alone
        yield
        return
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(torch.get_num_threads())
    try:
        yield
    finally:
        gomp.omp_set_num_threads(before)


@register("nf4")
def nf4_bench(quick: bool = False) -> list[dict]:
    with threads(), _bnb_threads():
        return _nf4_bench(quick)


def _nf4_bench(quick: bool) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an optional CPU kernel package bitsandbytes looks for
        import bitsandbytes
        import bitsandbytes.functional as bnbf

    dev = bench_device()
    side = 512 if quick else 4096
    peer = f"bitsandbytes {bitsandbytes.__version__}"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(side, side, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype).to(dev)
        case = f"{side}x{side} {str(dtype).removeprefix('torch.')} bs64"
        q = quantize_nf4(w)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        naive_packed, naive_absmax = naive_quantize(w)
        exact_q = torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
        naive_same = torch.equal(q.packed, naive_packed) and torch.equal(q.absmax, naive_absmax)

        t = interleaved({"lorabook": (nothing, lambda: quantize_nf4(w), nothing),
                         "bnb": (nothing, lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4"), nothing),
                         "naive": (nothing, lambda: naive_quantize(w), nothing)},
                        rounds=2 if quick else 3, repeat=1 if quick else 2, warmup=1, device=dev)
        repeat = 1 if quick else 2
        rows += [row(f"{case}: quantize", "seconds", t["lorabook"].median, peer, t["bnb"].median, exact=exact_q,
                     goal="<= 1.0", paired_ratio=paired_ratio(t["lorabook"], t["bnb"], repeat)),
                 row(f"{case}: quantize", "seconds", t["lorabook"].median, "naive argmin", t["naive"].median,
                     exact=naive_same)]

        ours = dequantize_nf4(q)
        theirs = bnbf.dequantize_4bit(packed, state)
        naive = naive_dequantize(q.packed, q.absmax, w.shape, dtype)
        exact_d = torch.equal(_bits(ours), _bits(theirs))
        out_bytes = ours.numel() * ours.element_size()
        variants = {"lorabook": lambda: dequantize_nf4(q),
                    "bnb": lambda: bnbf.dequantize_4bit(packed, state),
                    "torch path": lambda: dequantize_nf4(q, backend="torch"),
                    "naive": lambda: naive_dequantize(q.packed, q.absmax, w.shape, dtype),
                    "memcpy": lambda: ours.clone()}
        if cpu_kernel.available():
            variants["portable loop"] = lambda: _portable(q)
        t = interleaved({name: (nothing, fn, nothing) for name, fn in variants.items()},
                        rounds=3 if quick else 7, repeat=2 if quick else 3, warmup=1, device=dev)
        repeat = 2 if quick else 3
        moved = q.packed.numel() + q.absmax.numel() * 4 + out_bytes  # bytes a dequantize has to touch
        gbps = lambda s: moved / s / 1e9  # noqa: E731
        kernel = "compiled" if cpu_kernel.available() and dev.type == "cpu" else "pytorch"
        rows += [row(f"{case}: dequantize", "seconds", t["lorabook"].median, peer, t["bnb"].median,
                     exact=exact_d, goal="<= 1.0", paired_ratio=paired_ratio(t["lorabook"], t["bnb"], repeat),
                     lorabook_path=kernel),
                 row(f"{case}: dequantize", "seconds", t["lorabook"].median, "lorabook pytorch path",
                     t["torch path"].median, exact=torch.equal(_bits(ours), _bits(variants["torch path"]())))]
        if "portable loop" in t:
            rows.append(row(f"{case}: dequantize", "seconds", t["lorabook"].median, "lorabook portable C loop",
                            t["portable loop"].median, exact=torch.equal(_bits(ours), _bits(_portable(q)))))
        rows += [row(f"{case}: dequantize", "seconds", t["lorabook"].median, "naive byte lookup",
                     t["naive"].median, exact=torch.equal(_bits(ours), _bits(naive))),
                 row(f"{case}: dequantize", "GB/s", gbps(t["lorabook"].median), "memcpy (clone)",
                     2 * out_bytes / t["memcpy"].median / 1e9, bitsandbytes_gbps=gbps(t["bnb"].median))]
    return rows


def _portable(q) -> torch.Tensor:
    """The compiled kernel without AVX-512, into a fresh output like the others."""
    out = torch.empty(q.shape, dtype=q.dtype)
    cpu_kernel.dequantize_into(q.packed, q.absmax, codebook(q.codebook), out.view(-1), q.blocksize, simd=False)
    return out
