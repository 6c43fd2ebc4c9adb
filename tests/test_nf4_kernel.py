"""The compiled 4-bit dequantization: bit-exact with the PyTorch path (AVX-512 and portable loops, every dtype,
blocksize and codebook, odd sizes), its by-hand fp16/bf16 rounding, the clean fallback, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.quant import codebooks, cpu_kernel as nf4_kernel, nf4
from lorabook.quant.codebooks import codebook
from lorabook.quant.nf4 import dequantize_4bit, quantize_4bit

needs_kernel = pytest.mark.skipif(not nf4_kernel.available(), reason=f"no compiled kernel: {nf4_kernel.reason()}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


def kernel(q, dtype, simd):
    out = torch.empty(q.numel, dtype=dtype)
    nf4_kernel.dequantize_into(q.packed, q.block_absmax(), codebook(q.codebook), out, q.blocksize, simd=simd)
    return out


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """Load the kernel again under this test's environment (a cache of our own), and forget it afterwards."""
    monkeypatch.setenv("LORABOOK_CACHE", str(tmp_path))
    nf4_kernel._load.cache_clear()
    yield tmp_path
    nf4_kernel._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_kernel_equals_the_pytorch_paths(blocksize, dtype, simd):
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(1_000_003, generator=g) * torch.logspace(-6, 2, 1_000_003)  # odd; fp16 subnormals and large
    q = quantize_4bit(w.to(dtype), blocksize=blocksize)
    ours = bits(kernel(q, dtype, simd))
    assert torch.equal(ours, bits(dequantize_4bit(q, backend="torch")))
    assert torch.equal(ours, bits(dequantize_4bit(q, backend="reference")))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), blocksize=st.sampled_from(nf4.BLOCKSIZES[:4]), dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(codebooks.CODEBOOKS), double_quant=st.booleans(), simd=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_kernel_property(n, blocksize, dtype, name, double_quant, simd, seed):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    q = quantize_4bit(w, blocksize=blocksize, codebook=name, double_quant=double_quant)
    assert torch.equal(bits(kernel(q, dtype, simd)), bits(dequantize_4bit(q, dtype, backend="torch")))


@needs_kernel
@pytest.mark.parametrize("blocksize", [2, 32], ids=["portable-tail", "simd-table"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_to_16_bits_equals_torch(dtype, blocksize):
    """With code = (1, 0, ..., 0) and all codes 0, every output of a block is its absmax rounded: every rounding
    path (normal, subnormal, overflow to inf, ties) against torch's ``.to(dtype)`` on up to 2 million fp32 bit
    patterns. Blocks of 2 take the portable loop's rounding; blocks of 32 the AVX-512 table's (where present)."""
    g = torch.Generator().manual_seed(0)
    n = 1_000_000 if blocksize == 2 else 200_000
    x = torch.randint(0, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int32).view(torch.float32)
    ties = torch.arange(0x38000000, 0x38000000 + 2 ** 20, 2 ** 12, dtype=torch.int32).view(torch.float32)
    x = torch.cat([x[torch.isfinite(x)], ties, torch.tensor([65504.0, 65519.99, 65520.0, 0.0, 2 ** -25])])
    x = torch.cat([x, -x])  # (m,) fp32 with both signs
    code = torch.zeros(16)
    code[0] = 1.0
    out = torch.empty(blocksize * x.numel(), dtype=dtype)
    nf4_kernel.dequantize_into(torch.zeros(out.numel() // 2, dtype=torch.uint8), x, code, out, blocksize=blocksize)
    assert torch.equal(bits(out.view(-1, blocksize)), bits(x.to(dtype)[:, None].expand(-1, blocksize)))


@needs_kernel
def test_auto_uses_the_kernel_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(nf4_kernel, "dequantize_into", lambda *args, **kw: calls.append(args))
    dequantize_4bit(quantize_4bit(torch.randn(128)))
    dequantize_4bit(quantize_4bit(torch.randn(128)), backend="torch")
    assert len(calls) == 1


def test_disabled_kernel_falls_back_to_pytorch(fresh_kernel, monkeypatch):
    monkeypatch.setenv("LORABOOK_KERNEL", "0")
    assert not nf4_kernel.available() and "LORABOOK_KERNEL=0" in nf4_kernel.reason()
    w = torch.randn(1000)
    q = quantize_4bit(w)
    assert torch.equal(dequantize_4bit(q), dequantize_4bit(q, backend="torch"))  # auto: quietly PyTorch
    with pytest.raises(RuntimeError, match="not available: disabled by LORABOOK_KERNEL=0"):
        dequantize_4bit(q, backend="c")


def test_a_failing_compiler_falls_back_to_pytorch(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert not nf4_kernel.available() and nf4_kernel.reason().startswith("false failed")
    assert not list(fresh_kernel.iterdir())  # nothing half-built is left in the cache
    q = quantize_4bit(torch.randn(100))
    assert torch.equal(dequantize_4bit(q), dequantize_4bit(q, backend="torch"))


def test_a_missing_compiler_or_an_unwritable_cache_falls_back(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not nf4_kernel.available() and "No such file" in nf4_kernel.reason()
    nf4_kernel._load.cache_clear()
    monkeypatch.delenv("CC")
    (fresh_kernel / "file").write_text("")
    monkeypatch.setenv("LORABOOK_CACHE", str(fresh_kernel / "file" / "cache"))  # a file where a folder should be
    assert not nf4_kernel.available() and "failed" in nf4_kernel.reason()


@needs_kernel
def test_a_compiler_without_openmp_builds_a_one_thread_kernel(fresh_kernel, monkeypatch):
    real_cc = nf4_kernel._compiler()
    no_openmp = fresh_kernel / "cc-without-openmp"
    no_openmp.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real_cc} "$@"\n')
    no_openmp.chmod(0o755)
    monkeypatch.setenv("CC", str(no_openmp))
    assert nf4_kernel.available()
    q = quantize_4bit(torch.randn(300_001))
    assert torch.equal(dequantize_4bit(q, backend="c"), dequantize_4bit(q, backend="torch"))


def test_no_compiler_falls_back(fresh_kernel, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(nf4_kernel.shutil, "which", lambda name: None)
    assert not nf4_kernel.available() and "no C compiler" in nf4_kernel.reason()


@needs_kernel
def test_compiled_once_then_loaded_from_the_cache(fresh_kernel):
    assert nf4_kernel.available()
    (library,) = fresh_kernel.glob("nf4_kernel_*.so")
    built = library.stat().st_mtime_ns
    nf4_kernel._load.cache_clear()  # a new process, as far as the kernel knows
    assert nf4_kernel.available() and library.stat().st_mtime_ns == built


@needs_kernel
@pytest.mark.parametrize("arg, change, match", [
    ("packed", lambda t: t.to(torch.int16), "packed must be a contiguous CPU torch.uint8 tensor of 50 elements"),
    ("packed", lambda t: t[:-1], "packed must be .* of 50 elements, got torch.uint8 \\(49,\\)"),
    ("absmax", lambda t: t.double(), "absmax must be a contiguous CPU torch.float32"),
    ("absmax", lambda t: torch.stack([t, t], 1)[:, 0], "absmax must be a contiguous"),
    ("code", lambda t: t[:8], "code must be .* of 16 elements"),
    ("out", lambda t: t.to(torch.int32), "out must be float32, bfloat16 or float16, got torch.int32"),
])
def test_bad_kernel_arguments(arg, change, match):
    q = quantize_4bit(torch.randn(100), blocksize=32)
    args = {"packed": q.packed, "absmax": q.absmax, "code": codebook("nf4"), "out": torch.empty(100)}
    args[arg] = change(args[arg])
    with pytest.raises(ValueError, match=match):
        nf4_kernel.dequantize_into(**args, blocksize=32)


@needs_kernel
@pytest.mark.parametrize("blocksize", [3, 0, -2, 64.0])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match=f"blocksize must be a positive even int, got {blocksize}"):
        nf4_kernel.dequantize_into(torch.zeros(2, dtype=torch.uint8), torch.ones(2), codebook("nf4"),
                                   torch.empty(4), blocksize=blocksize)


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'torch', 'c'\], got 'cuda'"):
        dequantize_4bit(quantize_4bit(torch.randn(64)), backend="cuda")
