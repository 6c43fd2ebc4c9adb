"""The readable path and the fast paths beside it compute the same bits: ``nearest_code`` ("reference" = bucketize,
"fast" = the 16-bit tables of ``lorabook.quant.fast``) and ``dequantize_4bit`` ("reference" = level[code] · absmax,
"torch" = the pair table, "c" = the compiled kernel), on arbitrary inputs -- plus the backend argument's checks."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.quant import codebooks, cpu_kernel, fast, nf4
from lorabook.quant.nf4 import QuantizedTensor, dequantize_4bit, nearest_code, quantize_4bit

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEQUANTIZE = ["reference", "torch"] + (["c"] if cpu_kernel.available() else [])
INT_OF = {4: torch.int32, 2: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The values as integers: equal means the same bits (-0.0 and 0.0 differ, a NaN equals itself)."""
    return t.reshape(-1).view(INT_OF[t.element_size()])


def assert_backends_agree(q: QuantizedTensor, dtype=None):
    outs = {b: dequantize_4bit(q, dtype, backend=b) for b in DEQUANTIZE}
    for b, out in outs.items():
        assert out.shape == q.shape and out.dtype == (dtype or q.dtype), b
        assert torch.equal(bits(out), bits(outs["reference"])), f"{b} differs from the reference"


def as_float32(patterns) -> torch.Tensor:
    """32-bit patterns (ints) -> the fp32 values they encode."""
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


# ---- dequantize: reference == torch == c --------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 5000), blocksize=st.sampled_from(nf4.BLOCKSIZES), name=st.sampled_from(codebooks.CODEBOOKS),
       source=st.sampled_from(DTYPES), target=st.sampled_from([None] + DTYPES), double_quant=st.booleans(),
       scale=st.sampled_from([1e-40, 1e-20, 1e-3, 1.0, 3e4, 1e30]), seed=st.integers(0, 2 ** 16))
def test_dequantize_backends_are_bit_identical(n, blocksize, name, source, target, double_quant, scale, seed):
    """Every codebook, input and output dtype, blocksize, odd and partial-block counts, double quantization;
    scales from fp32 subnormals to beyond fp16's range (so the rounding to 16 bits overflows to inf)."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if source == torch.float16:
        w = w.clamp(-6e4, 6e4)
    q = quantize_4bit(w.to(source), blocksize=blocksize, codebook=name, double_quant=double_quant)
    assert_backends_agree(q, target)


finite_fp32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # subnormals, ±0, ±max included


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(1, 700), blocksize=st.sampled_from(nf4.BLOCKSIZES[:3]),
       name=st.sampled_from(codebooks.CODEBOOKS), dtype=st.sampled_from(DTYPES))
def test_dequantize_backends_agree_on_any_bytes_and_block_constants(data, n, blocksize, name, dtype):
    """Not only what quantize_4bit makes: any packed bytes (an odd count's unused low nibble too) and any finite
    absmax -- negative, ±0, subnormal, the largest floats."""
    n_blocks = -(-n // blocksize)
    packed = torch.tensor(data.draw(st.lists(st.integers(0, 255), min_size=(n + 1) // 2, max_size=(n + 1) // 2)),
                          dtype=torch.uint8)
    absmax = torch.tensor(data.draw(st.lists(finite_fp32, min_size=n_blocks, max_size=n_blocks)),
                          dtype=torch.float32)
    q = QuantizedTensor(packed=packed, absmax=absmax, shape=(n,), dtype=dtype, blocksize=blocksize, codebook=name)
    assert_backends_agree(q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 4096])
def test_dequantize_backends_agree_across_many_chunks(dtype, blocksize):
    """The torch path works in chunks of DECODE_CHUNK values: an odd count that ends in a partial chunk and block."""
    n = 3 * fast.DECODE_CHUNK + 4097
    w = torch.randn(n, generator=torch.Generator().manual_seed(blocksize)) * torch.logspace(-6, 2, n)
    assert_backends_agree(quantize_4bit(w.to(dtype), blocksize=blocksize))


def test_dequantize_reference_is_the_formula():
    """level[code] · absmax of the value's block, rounded once: checked by hand on 5 values in blocks of 32."""
    levels = codebooks.codebook("nf4")
    codes = [15, 0, 7, 3, 9]  # +1, -1, 0, level 3, level 9
    q = QuantizedTensor(packed=nf4.pack_4bit(torch.tensor(codes)), absmax=torch.tensor([2.5]), shape=(5,),
                        dtype=torch.bfloat16, blocksize=32)
    expected = (levels[codes] * 2.5).to(torch.bfloat16)
    assert torch.equal(nf4.dequantize_4bit_reference(q), expected)
    assert torch.equal(nf4.dequantize_4bit_reference(q, torch.float32), levels[codes] * 2.5)


# ---- nearest level: reference == fast -----------------------------------------------------------------------

def assert_nearest_agree(x: torch.Tensor, name: str):
    reference = nearest_code(x, name, backend="reference")
    assert reference.dtype == torch.uint8 and reference.shape == x.shape
    assert torch.equal(nearest_code(x, name, backend="fast"), reference)
    assert torch.equal(nearest_code(x, name), reference)  # "auto"


bit_patterns = st.integers(-2 ** 31, 2 ** 31 - 1)  # every float32, NaNs included (dropped below)


@settings(max_examples=150, deadline=None)
@given(patterns=st.lists(bit_patterns, max_size=300), floats=st.lists(st.floats(width=32, allow_nan=False),
                                                                       max_size=100),
       name=st.sampled_from(codebooks.CODEBOOKS))
def test_nearest_code_backends_agree_on_arbitrary_fp32(patterns, floats, name):
    """Random bit patterns (all exponents: subnormals, ±inf, huge and tiny values) and hypothesis' own floats."""
    x = torch.cat([as_float32(patterns), torch.tensor(floats, dtype=torch.float32)])
    assert_nearest_agree(x[~torch.isnan(x)], name)  # NaN has no nearest level; quantize_4bit refuses it


@pytest.mark.parametrize("name", codebooks.CODEBOOKS)
def test_nearest_code_backends_agree_on_the_edge_cases(name):
    """±0, the smallest and largest subnormals and normals, ±inf, every midpoint exactly (a tie: the lower level)
    and its two neighbouring floats, every level exactly, ±1 and just past it."""
    levels = codebooks.codebook(name)
    ordered = levels.sort().values
    mids = (ordered[:-1] + ordered[1:]) / 2
    special = as_float32([0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x3F800000, 0x3F800001])
    x = torch.cat([special, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), levels])
    x = torch.cat([x, -x])
    assert_nearest_agree(x, name)
    ties = nearest_code(mids, name, backend="reference")
    assert torch.equal(levels[ties.long()], ordered[:-1])  # a value on a midpoint takes the lower level


@pytest.mark.parametrize("name", codebooks.CODEBOOKS)
def test_nearest_code_backends_agree_across_chunks_and_shapes(name):
    """fast.nearest_code works NEAREST_CHUNK values at a time: several chunks and a partial one; any shape."""
    n = 2 * fast.NEAREST_CHUNK + 3
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int32).view(torch.float32)
    x = torch.where(torch.isnan(x), 0.0, x)
    assert_nearest_agree(x, name)
    assert_nearest_agree(x[:1000 * 7].view(7, 10, 100) / x.abs().max(), name)  # (7, 10, 100), mostly in [-1, 1]
    assert_nearest_agree(torch.zeros(0), name)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), blocksize=st.sampled_from(nf4.BLOCKSIZES[:4]), name=st.sampled_from(codebooks.CODEBOOKS),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_quantize_backends_agree(n, blocksize, name, dtype, seed):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    fast_q = quantize_4bit(w, blocksize=blocksize, codebook=name)
    reference = quantize_4bit(w, blocksize=blocksize, codebook=name, backend="reference")
    assert torch.equal(fast_q.packed, reference.packed) and torch.equal(fast_q.absmax, reference.absmax)


# ---- the fresh output on huge pages -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [10, 2 ** 20 + 3, 5 * 2 ** 20])
def test_empty_huge_pages_is_a_fresh_tensor_like_torch_empty(n):
    a, b = cpu_kernel.empty_huge_pages(n, torch.bfloat16), cpu_kernel.empty_huge_pages(n, torch.bfloat16)
    assert a.shape == (n,) and a.dtype == torch.bfloat16 and a.is_contiguous() and a.storage_offset() == 0
    assert a.untyped_storage().nbytes() == 2 * n and a.data_ptr() != b.data_ptr()  # its own, exact-size storage


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LORABOOK_HUGEPAGES", "0")
    cpu_kernel._madvise.cache_clear()
    try:
        assert cpu_kernel._madvise() is None
        q = quantize_4bit(torch.randn(2 ** 21 + 1))
        assert torch.equal(dequantize_4bit(q), dequantize_4bit(q, backend="reference"))
    finally:
        cpu_kernel._madvise.cache_clear()


# ---- the backend argument -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cuda", "fast", "", None, True])
def test_bad_dequantize_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'torch', 'c'\], got "
                                         + re.escape(repr(backend))):
        dequantize_4bit(quantize_4bit(torch.randn(64)), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "c", "Reference", None])
def test_bad_nearest_backend(backend):
    match = r"backend must be one of \['auto', 'reference', 'fast'\], got " + re.escape(repr(backend))
    with pytest.raises(ValueError, match=match):
        nearest_code(torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match=match):
        quantize_4bit(torch.randn(64), backend=backend)


def test_the_reference_paths_check_their_arguments_too():
    with pytest.raises(TypeError, match="scaled must be a float32 tensor"):
        nf4.nearest_code_reference(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="codebook must be one of"):
        nf4.nearest_code_reference(torch.zeros(4), "nf5")
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        nf4.dequantize_4bit_reference(torch.zeros(4))
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf4.dequantize_4bit_reference(quantize_4bit(torch.randn(64)), torch.int8)
