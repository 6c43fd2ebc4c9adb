"""Double quantization: the dynamic map, 8-bit blockwise quantization and compress_statistics=True bit-exact with
bitsandbytes, bits per parameter measured and by formula, bad input."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.quant import double_quant as dq
from lorabook.quant.nf4 import dequantize_4bit, quantize_4bit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # bitsandbytes warns about an optional CPU kernel package
    import bitsandbytes.functional as bnbf

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_dynamic_map_equals_bitsandbytes():
    code = dq.dynamic_map()
    assert torch.equal(code, bnbf.create_dynamic_map())
    assert code.shape == (256,) and (code[1:] > code[:-1]).all()
    assert code[-1] == 1 and 0 in code.tolist() and code[0] > -1  # signed: -0.99297 … 1
    for decade in range(7):  # decade 10^(e-6) holds 2^e positive values: fewer exponent bits, more fraction bits
        inside = (code >= 0.1 * 10.0 ** (decade - 6)) & (code < 10.0 ** (decade - 6))
        assert inside.sum() == 2 ** decade


# ---- 8-bit blockwise, bit-exact -----------------------------------------------------------------------------

def _values(kind, dtype):
    g = torch.Generator().manual_seed(1)
    if kind == "normal":
        x = torch.randn(1_000_003, generator=g)
    elif kind == "wide-range":  # magnitudes over 10 decades: every decade of the dynamic map is used
        x = torch.randn(1_000_003, generator=g) * 10.0 ** torch.randint(-6, 4, (1_000_003,), generator=g)
    elif kind == "zero-blocks":
        x = torch.randn(1_000_003, generator=g)
        x[:2560] = 0.0
        x[2560:5120] = 0.125
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "wide-range", "zero-blocks"])
def test_8bit_blockwise_is_bit_exact_with_bitsandbytes(kind, dtype):
    x = _values(kind, dtype)
    codes, absmax = dq.quantize_blockwise_8bit(x)
    theirs, state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(absmax, state.absmax)
    state.dtype = torch.float32
    assert torch.equal(dq.dequantize_blockwise_8bit(codes, absmax), bnbf.dequantize_blockwise(theirs, state))


def test_8bit_rounds_through_bitsandbytes_grid_not_always_to_the_nearest_code():
    # bitsandbytes' CPU kernel rounds to one of 65536 grid points first; near a midpoint that can pick the
    # farther code. Matching it bit for bit means doing the same.
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    codes, absmax = dq.quantize_blockwise_8bit(x)
    code = dq.dynamic_map()
    scaled = (x.view(-1, 1) / absmax.repeat_interleave(256)[:x.numel(), None]).view(-1)
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    farther = codes.long() != nearest
    assert 0 < farther.sum() < 1000
    assert ((code[codes.long()] - code[nearest]).abs()[farther] <= code.diff().max()).all()  # a neighbour


# ---- double quantization, bit-exact with compress_statistics=True -------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", [((1024, 1024), 64), ((1001, 1003), 64), ((1024, 1024), 32),
                                              ((1_000_003,), 128)])
def test_double_quant_is_bit_exact_with_bitsandbytes(shape, blocksize, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    q = quantize_4bit(w, blocksize=blocksize, double_quant=True)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed.view(-1)) and q.absmax is None
    assert torch.equal(q.double.codes, state.absmax)  # the 8-bit codes of absmax - mean
    assert torch.equal(q.double.absmax2, state.state2.absmax) and torch.equal(q.double.offset, state.offset)
    assert q.double.blocksize2 == state.state2.blocksize == 256
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' fallback path would compile per shape
        theirs = bnbf.dequantize_4bit(packed, state).reshape(-1)
    ours = dequantize_4bit(q).reshape(-1)
    bits = {4: torch.int32, 2: torch.int16}[ours.element_size()]
    assert ours.dtype == theirs.dtype and torch.equal(ours.view(bits), theirs.view(bits))


def test_double_quant_of_constant_absmax():
    w = torch.full((512, 64), 0.75)  # every block's absmax is the same: absmax - mean is 0 everywhere
    q = quantize_4bit(w, double_quant=True)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.double.codes, state.absmax) and torch.equal(q.double.absmax2, state.state2.absmax)
    assert torch.equal(dequantize_4bit(q), w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-4, 1.0, 1e3]))
def test_double_dequantize_error_bound(n, seed, scale):
    absmax = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * scale
    state = dq.double_quantize(absmax)
    back = dq.double_dequantize(state)
    code = dq.dynamic_map()
    step = (code.diff().max() / 2 + 1 / 65535).item()  # half the widest gap, plus the grid's rounding
    per_value = state.absmax2.repeat_interleave(256)[:n]
    assert ((back - absmax).abs() <= per_value * step * 1.001 + 4 * torch.finfo().eps * scale).all()


# ---- bits per parameter -------------------------------------------------------------------------------------

def test_bits_per_parameter_measured_from_stored_bytes_matches_the_formula():
    w = torch.randn(1024, 1024)  # 16384 blocks of 64, 64 second-level blocks of 256
    plain, double = quantize_4bit(w), quantize_4bit(w, double_quant=True)
    assert dq.bits_per_parameter(plain, constants_only=True) == 0.5 == dq.bits_per_parameter_formula(64, False, constants_only=True)
    assert dq.bits_per_parameter(plain) == 4.5
    measured = dq.bits_per_parameter(double, constants_only=True)
    formula = dq.bits_per_parameter_formula(64, True, constants_only=True)
    assert formula == 8 / 64 + 32 / (64 * 256)  # 0.12695…
    assert measured - formula == pytest.approx(32 / w.numel())  # the one fp32 offset the formula leaves out
    assert round(measured, 3) == 0.127
    assert double.nbytes * 8 / w.numel() == dq.bits_per_parameter(double)


def test_the_seeds_saving_at_65b_parameters():
    saved_bits = dq.bits_per_parameter_formula(64, False) - dq.bits_per_parameter_formula(64, True)
    assert round(saved_bits, 3) == 0.373
    assert saved_bits * 65e9 / 8 / 1e9 == pytest.approx(3.03, abs=0.01)  # "≈ 3 GB for a 65B model"


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        dq.bits_per_parameter_formula(0)
    with pytest.raises(ValueError, match="blocksize2 must be a positive int"):
        dq.bits_per_parameter_formula(64, True, blocksize2=2.5)
    with pytest.raises(TypeError, match="absmax must be a 1-D float32 tensor"):
        dq.double_quantize(torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        dq.quantize_blockwise_8bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x is empty"):
        dq.quantize_blockwise_8bit(torch.ones(0))
    with pytest.raises(TypeError, match="x must be a float32/float16/bfloat16 tensor"):
        dq.quantize_blockwise_8bit(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        dq.quantize_blockwise_8bit(torch.ones(4), blocksize=0)
    with pytest.raises(ValueError, match="absmax has shape \\(1,\\), but 300 codes in blocks of 256 need \\(2,\\)"):
        dq.dequantize_blockwise_8bit(torch.zeros(300, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(TypeError, match="codes must be a uint8 tensor"):
        dq.dequantize_blockwise_8bit(torch.zeros(3), torch.ones(1))


def test_mismatched_double_state():
    state = dq.double_quantize(torch.rand(1000))
    with pytest.raises(ValueError, match="double-quant codes have shape \\(1000,\\), expected \\(999,\\)"):
        state.validate(999)
    state.absmax2 = state.absmax2[:-1]
    with pytest.raises(ValueError, match="absmax2 must be float32 of shape \\(4,\\)"):
        state.validate(1000)


def test_the_papers_8bit_floats_are_bitsandbytes_dynamic_map():
    """QLoRA's "8-bit Floats" for the second quantization: in bitsandbytes, compress_statistics=True quantizes the
    absmax with quantize_blockwise's default code, create_dynamic_map() -- a dynamic type, not IEEE FP8."""
    w = torch.randn(64 * 600, generator=torch.Generator().manual_seed(0))
    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(state.state2.code, bnbf.create_dynamic_map()) and torch.equal(state.state2.code, dq.dynamic_map())
    assert state.state2.blocksize == dq.BLOCKSIZE2 == 256
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3)]
    assert not set(dq.dynamic_map().tolist()) <= set((e4m3 / e4m3.abs().max()).tolist())
