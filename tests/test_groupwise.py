"""Group-wise INT-k (QA-LoRA's base): the error bound, packing round trips, the stored bytes, the fast paths equal to
the formula bit for bit (the compiled INT4 loop included), the frozen layer, bad input."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from lorabook.quant import cpu_kernel, groupwise as G

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.reason()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(out=24, in_features=256, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, in_features, generator=g) * scale


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(G.BITS), group_size=st.sampled_from([8, 32, 64, 128]), seed=st.integers(0, 2 ** 16),
       log_scale=st.floats(-6, 3), offset=st.floats(-2, 2))
def test_error_is_at_most_half_a_step(bits, group_size, seed, log_scale, offset):
    w = weight(8, 256, seed, 10 ** log_scale) + offset * 10 ** log_scale
    g = G.quantize_groupwise(w, bits, group_size)
    err = (G.dequantize_groupwise_reference(g) - w).abs().reshape(8, -1, group_size)  # (out, G, L)
    half_step = g.scales.float()[..., None] / 2
    ulp = 4 * torch.finfo(torch.float32).eps * w.abs().amax()  # the fp32 arithmetic of (q − zero) · scale
    assert (err <= half_step * (1 + 1e-6) + ulp).all()
    codes = g.codes()
    assert int(codes.max()) <= 2 ** bits - 1
    # min-max: every group uses its lowest code, and its highest unless the step is below fp16's normal range
    # (2^-14: a subnormal scale is rounded up by more than half a step, so the top level lies beyond the max)
    assert (codes.reshape(8, -1, group_size).amin(-1) == 0).all()
    spread = w.reshape(8, -1, group_size)
    normal = (spread.amax(-1) - spread.amin(-1)) / (2 ** bits - 1) >= 2 ** -14
    assert (codes.reshape(8, -1, group_size).amax(-1)[normal] == 2 ** bits - 1).all()


def test_a_constant_group_is_exact():
    w = torch.full((2, 64), 0.25)
    w[1, 32:] = -3.0
    for bits in G.BITS:
        assert torch.equal(G.dequantize_groupwise_reference(G.quantize_groupwise(w, bits, 32)), w)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(G.BITS), rows=st.integers(1, 5), n8=st.integers(1, 12), seed=st.integers(0, 999))
def test_pack_unpack_round_trip(bits, rows, n8, seed):
    codes = torch.randint(0, 2 ** bits, (rows, 8 * n8), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = G.pack_codes(codes, bits)
    assert packed.shape == (rows, n8 * bits) and packed.dtype == torch.uint8  # k bits a code, nothing more
    assert torch.equal(G.unpack_codes(packed, bits), codes)


def test_four_bit_packing_puts_the_first_code_in_the_high_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert G.pack_codes(codes, 4).tolist() == [[0x12, 0x34, 0x56, 0x7F]]
    assert G.pack_codes(torch.arange(8, dtype=torch.uint8)[None] % 4, 2).tolist() == [[0b00011011, 0b00011011]]


@pytest.mark.parametrize("bits, group_size, expected", [(4, 64, 0.5 + 6 / 64), (4, 32, 0.5 + 6 / 32),
                                                         (3, 64, 3 / 8 + 6 / 64), (2, 128, 0.25 + 6 / 128)])
def test_bytes_per_weight(bits, group_size, expected):
    g = G.quantize_groupwise(weight(16, 512), bits, group_size)
    assert g.nbytes / (16 * 512) == expected
    assert g.qweight.numel() == 16 * 512 * bits // 8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", G.BITS)
def test_torch_path_equals_the_formula_bit_for_bit(bits, dtype):
    g = G.quantize_groupwise(weight(40, 512, seed=bits) * torch.logspace(-5, 1, 512), bits, 64)
    assert torch.equal(G.dequantize_groupwise(g, dtype, "torch"), G.dequantize_groupwise_reference(g, dtype))


@needs_kernel
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [8, 32, 64, 128])
def test_compiled_int4_loop_equals_the_formula_bit_for_bit(group_size, dtype, simd):
    w = weight(97, 1024, seed=group_size) * torch.logspace(-6, 2, 1024)  # fp16 subnormals and large values
    g = G.quantize_groupwise(w, 4, group_size)
    out = torch.empty(w.numel(), dtype=dtype)
    cpu_kernel.dequantize_int4_into(g.qweight.reshape(-1), g.scales.float().reshape(-1), g.zeros.reshape(-1), out,
                                    group_size, simd=simd)
    expected = G.dequantize_groupwise_reference(g, dtype)
    assert torch.equal(out.view(97, 1024), expected)
    assert torch.equal(G.dequantize_groupwise(g, dtype, "c"), expected)


def test_auto_takes_the_compiled_loop_for_int4_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernel, "dequantize_int4_into", lambda *a, **k: calls.append(a[-1]))
    monkeypatch.setattr(cpu_kernel, "available", lambda: True)
    G.dequantize_groupwise(G.quantize_groupwise(weight(), 4, 32))
    G.dequantize_groupwise(G.quantize_groupwise(weight(), 3, 32))
    assert calls == [32]


def test_linear_groupwise_forward_backward_and_dtypes():
    linear = nn.Linear(128, 24)
    layer = G.LinearGroupwise.from_linear(linear, bits=4, group_size=32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    W = G.dequantize_groupwise_reference(layer.quantized)
    torch.testing.assert_close(y, x @ W.T + linear.bias, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, 5, 128), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    layer.to(torch.bfloat16)  # the scales stay fp16 and the zero points fp32; only the bias follows
    assert layer.scales.dtype == torch.float16 and layer.zeros.dtype == torch.float32
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), r"bits must be one of \[2, 3, 4, 8\], got 5"), (dict(bits=True), "bits must be one of"),
    (dict(bits=1), "bits must be one of"), (dict(bits=16), "bits must be one of"),
    (dict(group_size=48), "group_size must be a power of two >= 8, got 48"),
    (dict(group_size=4), "group_size must be an int >= 8, got 4"),
    (dict(group_size=512), "in_features 256 is not divisible by group_size 512"),
    (dict(group_size=64.0), "group_size must be an int >= 8, got 64.0"),
])
def test_bad_quantize_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.quantize_groupwise(weight(), **kwargs)


def test_in_features_not_divisible_by_the_group_size():
    with pytest.raises(ValueError, match="in_features 96 is not divisible by group_size 64"):
        G.LinearGroupwise.from_linear(nn.Linear(96, 8), group_size=64)


@pytest.mark.parametrize("bad, match", [(torch.randn(64), "2-D floating-point"),
                                        (torch.ones(2, 64, dtype=torch.int32), "2-D floating-point"),
                                        (torch.tensor([[float("nan")] * 32]), "NaN or Inf"),
                                        (torch.tensor([[-1e9, 1e9] * 16]), "more than fp16 scales")])
def test_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        G.quantize_groupwise(bad, 4, 16 if bad.shape[-1] == 32 else 32)


def test_a_tampered_weight_is_refused():
    g = G.quantize_groupwise(weight(), 4, 32)
    g.scales = g.scales.float()
    with pytest.raises(ValueError, match="scales must be a 2-D torch.float16 tensor"):
        G.dequantize_groupwise(g)
    g = G.quantize_groupwise(weight(), 4, 32)
    g.zeros = g.zeros[:, :-1]
    with pytest.raises(ValueError, match=r"zeros must have shape \(24, 8\)"):
        G.LinearGroupwise(g)


def test_bad_dequantize_arguments():
    g = G.quantize_groupwise(weight(), 3, 32)
    with pytest.raises(ValueError, match="backend 'c' decodes 4-bit codes only, got bits=3"):
        G.dequantize_groupwise(g, backend="c")
    with pytest.raises(ValueError, match="backend must be one of"):
        G.dequantize_groupwise(g, backend="gpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        G.dequantize_groupwise(g, torch.int8)
    with pytest.raises(TypeError, match="g must be a GroupQuantized, got Tensor"):
        G.dequantize_groupwise(weight())


@needs_kernel
def test_bad_kernel_arguments():
    with pytest.raises(ValueError, match="group_size must be a positive even int, got 0"):
        cpu_kernel.dequantize_int4_into(torch.zeros(2, dtype=torch.uint8), torch.ones(1), torch.ones(1),
                                        torch.empty(4), group_size=0)
    with pytest.raises(ValueError, match="zero must be a contiguous CPU torch.float32 tensor of 1 elements"):
        cpu_kernel.dequantize_int4_into(torch.zeros(2, dtype=torch.uint8), torch.ones(1), torch.ones(2),
                                        torch.empty(4), group_size=4)


def test_requantizing_keeps_a_per_group_constant_and_rounds_a_small_update_away():
    g = G.quantize_groupwise(weight(24, 256), 4, 32)
    step = g.scales.float().mean()
    # an update of a twentieth of a grid step, as after a short fine-tune
    per_group = (torch.randn(24, 8, 1) * 0.05 * step).expand(24, 8, 32).reshape(24, 256)  # QA-LoRA's kind of ΔW
    general = torch.randn(24, 4) @ torch.randn(4, 256)  # plain LoRA's kind: rank 4, any column
    general *= per_group.norm() / general.norm()  # the same size
    shifted, rounded = G.requantize_stats(g, per_group), G.requantize_stats(g, general)
    assert abs(shifted["kept"] - 1) < 0.02 and shifted["error"] < 0.05  # min-max follows a shift of the group
    assert shifted["codes_changed"] == 0
    assert rounded["kept"] < 0.5 and rounded["error"] > 0.9  # rounded away: about as far off as Ŵ alone (error 1)
    with pytest.raises(ValueError, match="delta must be a tensor of the weight's shape"):
        G.requantize_stats(g, general[:, :10])
    with pytest.raises(ValueError, match="delta is zero"):
        G.requantize_stats(g, torch.zeros(24, 256))
