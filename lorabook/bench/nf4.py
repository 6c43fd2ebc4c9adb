"""``python -m lorabook.bench nf4``: NF4 quantize and dequantize, lorabook against bitsandbytes in the same run.

For a 4096×4096 weight (``--quick``: 512×512), blocksize 64, in fp32 and in bf16, we time

    quantize     lorabook ``quantize_nf4``    vs bitsandbytes ``quantize_4bit(quant_type="nf4")``   goal ratio ≤ 1.0
                                              vs lorabook's readable path (``backend="reference"``: bucketize
                                              against the 15 midpoints)
    dequantize   lorabook ``dequantize_nf4``  vs bitsandbytes ``dequantize_4bit``                   goal ratio ≤ 1.0
                 (the compiled kernel)        vs lorabook's fast PyTorch path (the fallback), vs the kernel's
                                              portable loop (no AVX-512), vs the kernel on 4 KB pages
                                              vs lorabook's readable path (``backend="reference"``: unpack the
                                              nibbles, index the levels, multiply by each block's absmax)
    bandwidth    dequantize's bytes (packed codes and absmax read, the weight written) per second, as a fraction
                 of this machine's memcpy bandwidth (a ``clone`` of the dequantized weight: read + write)

Every comparison row says whether the two results are bit-for-bit the same (``exact``). The variants run in
interleaved rounds (``lorabook.bench.harness.interleaved``) on one CPU thread -- bitsandbytes too: its C kernels use
OpenMP through the system's libgomp, which ``torch.set_num_threads`` does not reach, so ``_bnb_threads`` sets it;
``paired_ratio`` is the median of the within-round ratios, the steadier number on a busy machine.

What bitsandbytes' CPU path does: quantize_4bit is plain PyTorch (bucketize against the level midpoints);
dequantize_4bit is one C loop over the bytes (OpenMP, AVX-512 permutes where the CPU has them). Ours
(``lorabook.quant.cpu_kernel``) is one C loop too: per block a 16-entry table of ``level · absmax`` already rounded
to the output dtype, then one AVX-512 permute per 16 (fp32) or 32 (bf16) values. Both write a freshly allocated output,
whose first touch (page faults: the operating system zeroing each 4 KB page) costs several times the loop itself;
lorabook asks for 2 MB pages on it (``cpu_kernel.empty_huge_pages``), and the "4 KB pages" row is the same
kernel without that advice. The memcpy row (a ``clone``) pays 4 KB faults too. The PyTorch fallback makes two
passes: an ``index_select`` into a table of level pairs, then one multiply per block.
"""
from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager

import torch

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, threads
from ..quant import cpu_kernel
from ..quant.codebooks import codebook
from ..quant.nf4 import dequantize_nf4, quantize_nf4


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
        reference = quantize_nf4(w, backend="reference")
        exact_q = torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
        reference_same = torch.equal(q.packed, reference.packed) and torch.equal(q.absmax, reference.absmax)

        t = interleaved({"lorabook": (nothing, lambda: quantize_nf4(w), nothing),
                         "bnb": (nothing, lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4"), nothing),
                         "reference": (nothing, lambda: quantize_nf4(w, backend="reference"), nothing)},
                        rounds=2 if quick else 3, repeat=1 if quick else 2, warmup=1, device=dev)
        repeat = 1 if quick else 2
        rows += [row(f"{case}: quantize", "seconds", t["lorabook"].median, peer, t["bnb"].median, exact=exact_q,
                     goal="<= 1.0", paired_ratio=paired_ratio(t["lorabook"], t["bnb"], repeat)),
                 row(f"{case}: quantize", "seconds", t["lorabook"].median, "lorabook reference path",
                     t["reference"].median, exact=reference_same)]

        ours = dequantize_nf4(q)
        theirs = bnbf.dequantize_4bit(packed, state)
        reference = dequantize_nf4(q, backend="reference")
        exact_d = torch.equal(_bits(ours), _bits(theirs))
        out_bytes = ours.numel() * ours.element_size()
        variants = {"lorabook": lambda: dequantize_nf4(q),
                    "bnb": lambda: bnbf.dequantize_4bit(packed, state),
                    "torch path": lambda: dequantize_nf4(q, backend="torch"),
                    "reference": lambda: dequantize_nf4(q, backend="reference"),
                    "memcpy": lambda: ours.clone()}
        if cpu_kernel.available() and dev.type == "cpu":
            variants["portable loop"] = lambda: _kernel(q, simd=False)
            variants["4 KB pages"] = lambda: _kernel(q, huge_pages=False)
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
            rows += [row(f"{case}: dequantize", "seconds", t["lorabook"].median, "lorabook portable C loop",
                         t["portable loop"].median, exact=torch.equal(_bits(ours), _bits(_kernel(q, simd=False)))),
                     row(f"{case}: dequantize", "seconds", t["lorabook"].median, "lorabook C on 4 KB pages",
                         t["4 KB pages"].median, exact=torch.equal(_bits(ours), _bits(_kernel(q, huge_pages=False))))]
        rows += [row(f"{case}: dequantize", "seconds", t["lorabook"].median, "lorabook reference path",
                     t["reference"].median, exact=torch.equal(_bits(ours), _bits(reference))),
                 row(f"{case}: dequantize", "GB/s", gbps(t["lorabook"].median), "memcpy (clone)",
                     2 * out_bytes / t["memcpy"].median / 1e9, bitsandbytes_gbps=gbps(t["bnb"].median))]
    return rows


def _kernel(q, simd: bool = True, huge_pages: bool = True) -> torch.Tensor:
    """The compiled kernel into a fresh output, as ``dequantize_nf4`` runs it; ``simd=False``: its portable loop
    (no AVX-512); ``huge_pages=False``: a plain ``torch.empty`` output (4 KB pages)."""
    out = cpu_kernel.empty_huge_pages(q.numel, q.dtype) if huge_pages else torch.empty(q.numel, dtype=q.dtype)
    cpu_kernel.dequantize_into(q.packed, q.absmax, codebook(q.codebook), out, q.blocksize, simd=simd)
    return out.view(q.shape)
