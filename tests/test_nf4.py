"""NF4: the derived codebook, nearest-level rounding, packing, bit-exactness with bitsandbytes, conversion both ways,
the seed's int8 formula, bad input."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.quant import codebooks, cpu_kernel as nf4_kernel, nf4
from lorabook.quant.nf4 import QuantizedTensor, dequantize_4bit, quantize_4bit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # bitsandbytes warns about an optional CPU kernel package
    import bitsandbytes.functional as bnbf

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_OF = {4: torch.int32, 2: torch.int16}  # to compare floats bit for bit (a -0.0 against 0.0 too)
BACKENDS = ["reference", "torch"] + (["c"] if nf4_kernel.available() else [])  # dequantize_4bit's three ways


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit; its pure-PyTorch fallback (odd last dim, blocksize >= 2048 on AVX512) would
    torch.compile itself per shape -- run that fallback eagerly: same code, no compile time."""
    with torch.compiler.set_stance("force_eager"):
        return bnbf.dequantize_4bit(packed, state)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.reshape(-1), b.reshape(-1)  # bitsandbytes returns a 1-D even-length input as (1, n)
    return a.dtype == b.dtype and torch.equal(a.view(INT_OF[a.element_size()]), b.view(INT_OF[b.element_size()]))


def assert_bit_exact(w, blocksize=64, codebook="nf4"):
    """Both ways to quantize (nearest_code "reference" and "fast") and every way to dequantize match bitsandbytes."""
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=codebook)
    for backend in ("reference", "fast"):
        q = quantize_4bit(w, blocksize=blocksize, codebook=codebook, backend=backend)
        assert torch.equal(q.packed, packed.view(-1)), f"packed bytes differ ({backend})"
        assert torch.equal(q.absmax, state.absmax), "absmax differs"
    theirs = bnb_dequantize(packed, state)
    for backend in BACKENDS:
        ours = dequantize_4bit(q, backend=backend)
        assert ours.shape == w.shape and ours.dtype == w.dtype
        assert same_bits(ours, theirs), f"dequantized values differ ({backend})"


# ---- codebooks ----------------------------------------------------------------------------------------------

def test_nf4_codebook_is_derived_and_equals_bitsandbytes_table():
    levels = codebooks.nf4_codebook()
    assert torch.equal(levels, bnbf.get_4bit_type("nf4", device="cpu"))  # every bit
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert (levels[1:] > levels[:-1]).all() and levels[0] == -1 and levels[-1] == 1
    assert levels[7] == 0 and (levels > 0).sum() == 8 and (levels < 0).sum() == 7  # exact zero, asymmetric


def test_nf4_levels_are_normal_quantiles():
    # between the outermost quantiles the positive levels split N(0,1)'s mass into equal steps
    positive = codebooks.nf4_codebook()[7:].double()  # 0 and the 8 positive levels
    scale = torch.special.ndtri(torch.tensor(codebooks.NF4_OFFSET, dtype=torch.float64))
    mass = torch.special.ndtr(positive * scale)
    steps = mass.diff()
    assert torch.allclose(steps, steps.mean(), rtol=1e-5)


def test_fp4_and_int4_codebooks():
    assert torch.equal(codebooks.fp4_codebook(), bnbf.get_4bit_type("fp4", device="cpu"))
    int4 = codebooks.int4_codebook()
    x = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.tensor([-1.0, 1.0])])
    codes = nf4.nearest_code(x, "int4")
    assert torch.equal(torch.round(int4[codes.long()] * 7), torch.round(x * 7))  # nearest level = round(7x) / 7
    assert codes.min() == 1  # code 0 (-8/7) is never used


def test_nf_codebook_generalises_nf4():
    assert torch.equal(codebooks.nf_codebook(4), codebooks.nf4_codebook())  # every bit
    assert torch.equal(codebooks.nf_codebook(4, 0.99), codebooks.nf4_codebook(0.99))
    for bits in range(2, 9):
        levels = codebooks.nf_codebook(bits)
        assert levels.shape == (2 ** bits,) and (levels.diff() > 0).all() and levels[0] == -1 and levels[-1] == 1
        assert (levels == 0).sum() == 1 and (levels > 0).sum() == 2 ** (bits - 1)


def test_nf4_offset_is_the_mean_of_two_outer_bin_centres():
    # 1 - 1/(2n): the probability at the centre of the outermost of n equal-probability bins, for n = 16 and 15
    assert abs(codebooks.NF4_OFFSET - ((1 - 1 / 32) + (1 - 1 / 30)) / 2) < 1e-7


def test_qlora_eq4_levels_follow_the_formula():
    levels = codebooks.qlora_eq4_levels()
    assert levels.shape == (15,) and levels.dtype == torch.float32 and (levels.diff() > 0).all()
    assert torch.equal(levels, -levels.flip(0)) and levels[7] == 0 and levels[-1] == 1  # symmetric, exact zero
    q = torch.distributions.Normal(0.0, 1.0).icdf  # an independent quantile function (fp32)
    i = torch.arange(1, 16, dtype=torch.float32)
    direct = (q(i / 17) + q((i + 1) / 17)) / 2  # eq. 4, its finite terms
    assert torch.allclose(levels, direct / direct.max(), atol=1e-5)
    unscaled = levels.double() * (direct.max().double())  # each level lies inside its own bin
    edges = torch.special.ndtri(torch.arange(1, 17, dtype=torch.float64) / 17)
    assert ((unscaled > edges[:-1]) & (unscaled < edges[1:])).all()  # level i in (Q(i/17), Q((i+1)/17))
    assert codebooks.qlora_eq4_levels(2).tolist() == [-1.0, 0.0, 1.0]
    assert not torch.allclose(levels[7:], codebooks.nf4_codebook()[8:], atol=1e-2)  # not bitsandbytes' NF4


@pytest.mark.parametrize("fn, bad", [(codebooks.nf4_codebook, 1.0), (codebooks.nf4_codebook, 0.5), (codebooks.nf4_codebook, float("nan")),
                                     (codebooks.nf4_codebook, True), (lambda o: codebooks.nf_codebook(4, o), 1.5)])
def test_bad_offset(fn, bad):
    with pytest.raises(ValueError, match="offset must be a finite number in"):
        fn(bad)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an int >= 2 <= 8"):
        codebooks.nf_codebook(bits)
    with pytest.raises(ValueError, match="bits must be an int >= 2 <= 8"):
        codebooks.qlora_eq4_levels(bits)


@settings(max_examples=40, deadline=None)
@given(n_blocks=st.integers(1, 20), blocksize=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16), name=st.sampled_from(["nf4", "int4"]))
def test_round_to_levels_equals_quantize_4bit(n_blocks, blocksize, dtype, seed, name):
    w = torch.randn(n_blocks * blocksize, generator=torch.Generator().manual_seed(seed)).to(dtype)
    codes, back = nf4.round_to_levels(w, codebooks.codebook(name), blocksize)
    q = quantize_4bit(w, blocksize=blocksize, codebook=name)
    assert torch.equal(codes, nf4.unpack_4bit(q.packed, q.numel).long())  # nf4 and int4 codes are sorted
    assert same_bits(back, dequantize_4bit(q)) and back.dtype == dtype


def test_round_to_levels_with_other_levels():
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([0.1, -1.0, 0.5, 0.26])  # absmax 1; midpoints of the levels: -0.5, 0.25, 0.75
    w[1, :4] = torch.tensor([2.0, 0.5, -0.9, 1.1])  # absmax 2: 0.5 scales to 0.25, a tie -> the lower level
    codes, back = nf4.round_to_levels(w, torch.tensor([-1.0, 0.0, 0.5, 1.0]), blocksize=32)
    assert codes.shape == (64,) and back.shape == (2, 32)
    assert codes[:4].tolist() == [1, 0, 2, 2] and codes[32:36].tolist() == [3, 1, 1, 2]
    assert back[0, :4].tolist() == [0.0, -1.0, 0.5, 0.5] and back[1, :4].tolist() == [2.0, 0.0, 0.0, 1.0]
    assert (codes[4:32] == 1).all() and (back[:, 4:] == 0).all()


@pytest.mark.parametrize("levels, match", [
    (torch.tensor([0.0, 1.0, 0.5]), "strictly increasing"), (torch.tensor([1.0]), ">= 2 finite"),
    (torch.tensor([[0.0, 1.0]]), "1-D tensor"), (torch.tensor([0.0, float("inf")]), "finite"), ([0.0, 1.0], "levels")])
def test_round_to_levels_bad_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        nf4.round_to_levels(torch.randn(64), levels)


def test_round_to_levels_bad_input():
    with pytest.raises(ValueError, match="w has 100 values, not a multiple of blocksize=64"):
        nf4.round_to_levels(torch.randn(100), codebooks.nf4_codebook())
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        nf4.round_to_levels(torch.randn(96), codebooks.nf4_codebook(), blocksize=48)
    with pytest.raises(TypeError, match="w must be float32"):
        nf4.round_to_levels(torch.ones(64, dtype=torch.int32), codebooks.nf4_codebook())
    w = torch.randn(128)
    w[70] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN or Inf \\(first at flat index 70\\)"):
        nf4.round_to_levels(w, codebooks.nf4_codebook())


def test_code_occupancy_and_entropy():
    q = quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0]))  # odd: the padding code 7 is not counted
    p = nf4.code_occupancy(q)
    assert p.dtype == torch.float64 and p.shape == (16,)
    assert p[15] == 0.2 and p[0] == 0.2 and p[7] == pytest.approx(0.6) and p.sum() == pytest.approx(1)
    assert torch.equal(nf4.code_occupancy(torch.tensor([0, 2, 2, 1]), n_codes=3), torch.tensor([0.25, 0.25, 0.5],
                                                                                               dtype=torch.float64))
    assert nf4.entropy_bits(torch.full((16,), 1 / 16)) == pytest.approx(4.0)
    assert nf4.entropy_bits(torch.tensor([0.0, 1.0, 0.0])) == 0.0
    assert nf4.entropy_bits(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1.5)
    w = torch.randn(2 ** 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nf4.code_occupancy(quantize_4bit(w)), nf4.code_occupancy(nf4.round_to_levels(w, codebooks.nf4_codebook())[0]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 16), name=st.sampled_from(codebooks.CODEBOOKS))
def test_code_occupancy_counts_the_unpacked_codes(n, seed, name):
    q = quantize_4bit(torch.randn(n, generator=torch.Generator().manual_seed(seed)), codebook=name)
    codes = nf4.unpack_4bit(q.packed, n)  # without the padding code
    assert torch.equal(nf4.code_occupancy(q), torch.bincount(codes.long(), minlength=16).double() / n)


@pytest.mark.parametrize("codes, error, match", [
    (torch.tensor([0.5, 1.0]), TypeError, "integer tensor"), (torch.tensor([True]), TypeError, "integer tensor"),
    (torch.zeros(0, dtype=torch.long), TypeError, "non-empty"), ([1, 2], TypeError, "codes must be"),
    (torch.tensor([0, 16]), ValueError, "codes must lie in 0 … 15, got 0 … 16"),
    (torch.tensor([-1, 3]), ValueError, "got -1 … 3")])
def test_code_occupancy_bad_input(codes, error, match):
    with pytest.raises(error, match=match):
        nf4.code_occupancy(codes)


def test_code_occupancy_bad_n_codes_and_entropy_bad_input():
    with pytest.raises(ValueError, match="n_codes must be an int >= 1"):
        nf4.code_occupancy(torch.tensor([0]), n_codes=0)
    with pytest.raises(ValueError, match="n_codes must be 16 for a QuantizedTensor"):
        nf4.code_occupancy(quantize_4bit(torch.randn(64)), n_codes=15)
    for bad, error in [(torch.tensor([0.5, 0.4]), ValueError), (torch.tensor([1.5, -0.5]), ValueError),
                       (torch.tensor([float("nan"), 1.0]), ValueError), (torch.tensor([1, 0]), TypeError),
                       (torch.ones(2, 2) / 4, TypeError), ([0.5, 0.5], TypeError)]:
        with pytest.raises(error, match="p must"):
            nf4.entropy_bits(bad)


def test_codebook_returns_a_copy_and_rejects_unknown_names():
    codebooks.codebook("nf4")[0] = 5.0
    assert codebooks.codebook("nf4")[0] == -1
    with pytest.raises(ValueError, match="codebook must be one of"):
        codebooks.codebook("nf5")


# ---- nearest level and packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("name", codebooks.CODEBOOKS)
def test_nearest_code_equals_bucketize_on_every_cell_edge_and_midpoint(name, backend):
    """The first and last float of every 16-bit cell of the fast path's tables, every midpoint and its neighbours."""
    levels = codebooks.codebook(name)
    order = torch.argsort(levels)
    ordered = levels[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    top = torch.arange(2 ** 16, dtype=torch.int32) << 16
    edges = torch.cat([top.view(torch.float32), (top | 0xFFFF).view(torch.float32)])
    near_mids = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    x = torch.cat([edges[torch.isfinite(edges)], near_mids, torch.tensor([float("inf"), -float("inf")])])
    expected = order[torch.bucketize(x, mids)]  # ties go to the lower level, as in bitsandbytes
    assert torch.equal(nf4.nearest_code(x, name, backend=backend).long(), expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=200))
def test_nearest_code_property(values):
    x = torch.tensor(values, dtype=torch.float32)
    levels = codebooks.nf4_codebook()
    codes = nf4.nearest_code(x).long()
    assert torch.equal(codes, torch.bucketize(x, (levels[:-1] + levels[1:]) / 2))
    inside = x.abs() <= 1
    dist = (x[inside, None] - levels[None, :]).abs()  # no other level is strictly nearer
    assert torch.equal(dist.gather(1, codes[inside, None]).squeeze(1), dist.min(1).values)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=99))
def test_pack_unpack_round_trip(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = nf4.pack_4bit(c)
    assert packed.shape == ((len(codes) + 1) // 2,)
    assert packed[0] >> 4 == c[0]  # the first code sits in the high nibble
    assert torch.equal(nf4.unpack_4bit(packed, len(codes)), c)


# ---- bit-exact with bitsandbytes, >= 10^6 values per case ---------------------------------------------------

def _weights(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        w = torch.randn(1024, 1024, generator=g) * 0.02
    elif kind == "odd-shape":  # 1,004,003 values: odd, and not a multiple of any blocksize
        w = torch.randn(1001, 1003, generator=g)
    elif kind == "1-d":
        w = torch.randn(1_000_003, generator=g)
    elif kind == "heavy-tailed":  # Student-t with 1.5 degrees of freedom: huge outliers (kept inside fp16's range)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            w = torch.distributions.StudentT(torch.tensor(1.5)).sample((1024, 1024)).clamp(-6e4, 6e4)
    elif kind == "zeros-and-constant-blocks":
        w = torch.randn(1024, 1024, generator=g)
        w[:256] = 0.0  # whole zero blocks
        w[256:512] = 0.375  # constant blocks: every value is its block's absmax
        w[512:520] = -2.5
        w[-1, -7:] = 0.0  # zeros inside a normal block
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "odd-shape", "1-d", "heavy-tailed", "zeros-and-constant-blocks"])
def test_bit_exact_with_bitsandbytes(kind, dtype):
    assert_bit_exact(_weights(kind, dtype))


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_bit_exact_at_every_blocksize(blocksize):
    assert_bit_exact(_weights("odd-shape", torch.float32), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp4_is_bit_exact_too(dtype):
    w = _weights("odd-shape", dtype)  # an odd last dim: bitsandbytes decodes in PyTorch, with fp4's +0.0
    assert_bit_exact(w, codebook="fp4")


def test_all_zero_tensor():
    assert_bit_exact(torch.zeros(64 * 3 + 5))
    q = quantize_4bit(torch.zeros(64 * 3 + 5))
    assert (dequantize_4bit(q) == 0).all() and q.absmax[-1] > 0  # the partial block stores its clamped absmax


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), blocksize=st.sampled_from(nf4.BLOCKSIZES[:4]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3]))
def test_bit_exact_on_random_small_tensors(n, blocksize, dtype, seed, scale):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    assert_bit_exact(w.to(dtype), blocksize=blocksize)


# ---- what quantization promises -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), blocksize=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2 ** 16))
def test_error_bound_and_exact_block_maxima(n, blocksize, seed):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    q = quantize_4bit(w, blocksize=blocksize)
    back = dequantize_4bit(q)
    levels = codebooks.nf4_codebook()
    half_gap = (levels.diff().max() / 2).item()
    per_value_absmax = q.absmax.repeat_interleave(blocksize)[:n]
    assert ((w - back).abs() <= per_value_absmax * half_gap * (1 + 1e-6)).all()
    blocks = torch.nn.functional.pad(w, (0, -n % blocksize)).view(-1, blocksize)
    at_max = blocks.abs().argmax(1) + torch.arange(blocks.shape[0]) * blocksize
    assert torch.equal(back[at_max], w[at_max])  # each block's largest magnitude comes back exactly (±1 · absmax)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), seed=st.integers(0, 2 ** 16), codebook=st.sampled_from(codebooks.CODEBOOKS))
def test_quantizing_a_dequantized_tensor_changes_nothing(n, seed, codebook):
    q = quantize_4bit(torch.randn(n, generator=torch.Generator().manual_seed(seed)), codebook=codebook)
    again = quantize_4bit(dequantize_4bit(q), codebook=codebook)
    assert torch.equal(again.absmax, q.absmax) and torch.equal(dequantize_4bit(again), dequantize_4bit(q))
    if codebook != "fp4":  # fp4 has two codes for 0 (+0 and -0): the value comes back, the code may not
        assert torch.equal(again.packed, q.packed)


def test_dequantize_to_another_dtype_rounds_the_fp32_values_once():
    q = quantize_4bit(torch.randn(300, 70))
    assert torch.equal(dequantize_4bit(q, torch.bfloat16), dequantize_4bit(q).to(torch.bfloat16))


def test_stored_bytes():
    q = quantize_4bit(torch.randn(1000, 64))
    assert q.nbytes == 1000 * 64 // 2 + 1000 * 4 and q.n_blocks == 1000


# ---- bitsandbytes' packed data + QuantState, both ways ------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_conversion_to_and_from_bitsandbytes(double_quant):
    w = torch.randn(300, 130, dtype=torch.bfloat16)
    q = quantize_4bit(w, double_quant=double_quant)
    packed, state = nf4.to_bnb(q)
    assert packed.shape == (300 * 130 // 2, 1) and state.nested == double_quant
    assert same_bits(bnb_dequantize(packed, state), dequantize_4bit(q))  # theirs decodes ours
    theirs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    back = nf4.from_bnb(*theirs)
    assert same_bits(dequantize_4bit(back), dequantize_4bit(q))  # ours decodes theirs
    assert torch.equal(back.packed, q.packed) and back.shape == q.shape and back.dtype == q.dtype


# ---- the seed's int8 absmax formula -------------------------------------------------------------------------

def test_int8_absmax_formula():
    x = torch.tensor([0.5, -1.0, 0.25, 2.0])
    q, absmax = nf4.quantize_int8_absmax(x)
    assert absmax == 2.0 and q.tolist() == [32, -64, 16, 127]  # round(127 / 2 · x); 31.75 -> 32
    assert torch.allclose(nf4.dequantize_int8_absmax(q, absmax), q.float() * 2.0 / 127)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=100))
def test_int8_absmax_error_is_at_most_half_a_step(values):
    x = torch.tensor(values)
    q, absmax = nf4.quantize_int8_absmax(x)
    assert q.abs().max() <= 127 and (absmax == 0 or q.abs().max() == 127)
    assert ((nf4.dequantize_int8_absmax(q, absmax) - x).abs() <= absmax / 254 * (1 + 1e-5) + 1e-30).all()


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n", [128, 100])  # in a full block, and in the partial last block
def test_nan_and_inf_are_refused(bad, n):
    w = torch.randn(n)
    w[n - 3] = bad
    with pytest.raises(ValueError, match=f"w contains NaN or Inf \\(first at flat index {n - 3}\\)"):
        quantize_4bit(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_int8_absmax(w)


@pytest.mark.parametrize("w, error, match", [
    (torch.zeros(0), ValueError, "w is empty"),
    (torch.zeros(3, 0), ValueError, "w is empty"),
    (torch.ones(64, dtype=torch.int8), TypeError, "float32, float16 or bfloat16, got torch.int8"),
    (torch.ones(64, dtype=torch.int32), TypeError, "got torch.int32"),
    (torch.ones(64, dtype=torch.uint8), TypeError, "got torch.uint8"),
    (torch.ones(64, dtype=torch.bool), TypeError, "got torch.bool"),
    (torch.ones(64, dtype=torch.float64), TypeError, "got torch.float64"),
    ([1.0, 2.0], TypeError, "w must be a torch.Tensor"),
])
def test_bad_weights(w, error, match):
    with pytest.raises(error, match=match):
        quantize_4bit(w)


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        quantize_4bit(torch.randn(256), blocksize=blocksize)


def test_bad_codebook_and_dtype():
    with pytest.raises(ValueError, match="codebook must be one of"):
        quantize_4bit(torch.randn(64), codebook="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        dequantize_4bit(quantize_4bit(torch.randn(64)), torch.int8)
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        dequantize_4bit(torch.randn(64))


def _mismatch(field):
    q = quantize_4bit(torch.randn(10, 100))  # 1000 values: 16 blocks of 64, 500 bytes
    if field == "shape":
        q.shape = torch.Size((20, 100))
    elif field == "blocksize":
        q.blocksize = 128
    elif field == "absmax length":
        q.absmax = q.absmax[:-1]
    elif field == "absmax dtype":
        q.absmax = q.absmax.half()
    elif field == "packed dtype":
        q.packed = q.packed.to(torch.int16)
    elif field == "both absmax and double":
        q.double = quantize_4bit(torch.randn(10, 100), double_quant=True).double
    elif field == "double state":
        q.absmax, q.double = None, quantize_4bit(torch.randn(10, 200), double_quant=True).double
    return q


@pytest.mark.parametrize("field, match", [
    ("shape", "packed holds 500 bytes, but shape \\(20, 100\\) needs 1000"),
    ("blocksize", "absmax must be float32 of shape \\(8,\\)"),
    ("absmax length", "absmax must be float32 of shape \\(16,\\)"),
    ("absmax dtype", "absmax must be float32"),
    ("packed dtype", "packed must be a uint8 tensor"),
    ("both absmax and double", "exactly one of absmax"),
    ("double state", "double-quant codes have shape \\(32,\\), expected \\(16,\\)"),
])
def test_dequantizing_with_a_mismatched_state(field, match):
    q = _mismatch(field)
    with pytest.raises(ValueError, match=match):
        dequantize_4bit(q)


def test_mismatched_state_is_refused_at_construction():
    q = quantize_4bit(torch.randn(100))
    with pytest.raises(ValueError, match="absmax must be float32 of shape \\(2,\\)"):
        QuantizedTensor(packed=q.packed, absmax=q.absmax[:1], shape=q.shape, dtype=q.dtype)


def test_bitsandbytes_conversion_bad_input():
    with pytest.raises(ValueError, match="bitsandbytes has no 4-bit 'int4' type"):
        nf4.to_bnb(quantize_4bit(torch.randn(64), codebook="int4"))
    packed, state = bnbf.quantize_4bit(torch.randn(64), quant_type="nf4")
    state.quant_type = "int4"
    with pytest.raises(ValueError, match="state.quant_type must be 'nf4' or 'fp4'"):
        nf4.from_bnb(packed, state)


def test_int8_absmax_bad_input():
    with pytest.raises(TypeError, match="x must be float32"):
        nf4.quantize_int8_absmax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x is empty"):
        nf4.quantize_int8_absmax(torch.ones(0))
    with pytest.raises(TypeError, match="q must be an int8 tensor"):
        nf4.dequantize_int8_absmax(torch.ones(3), torch.tensor(1.0))


def test_nearest_code_wants_fp32_and_linear_nf4_is_in_the_quant_package():
    for backend in ("auto", "reference", "fast"):
        with pytest.raises(TypeError, match="scaled must be a float32 tensor"):
            nf4.nearest_code(torch.zeros(4, dtype=torch.bfloat16), backend=backend)
    import lorabook.quant
    from lorabook.quant.linear import LinearNF4
    assert lorabook.quant.LinearNF4 is LinearNF4  # the design's module map lists it under quant/
