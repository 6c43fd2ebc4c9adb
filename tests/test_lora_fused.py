"""The readable LoRA forward and the fused one beside it agree: ``lora_forward`` (h = W0 x + s · B A x, as the paper
writes it) and ``lora_forward_fused`` (s · (A x) Bᵀ added into W0 x by one addmm), and ``LoRALinear`` with
backend "reference" and "fast" -- outputs and gradients, random shapes, ranks and scales, dropout off."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from lorabook.lora.layer import LoRALinear, lora_forward, lora_forward_fused

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = torch.finfo(torch.float32).eps  # 2^-23


def tolerance(length: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Twice the textbook bound on a float32 sum of ``length`` products,
    |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ length · ε · Σ|aᵢbᵢ|: each side's error is at most that (``magnitude`` is Σ|aᵢbᵢ| per
    output), so their difference is at most twice that. Observed differences stay under a tenth of it."""
    return 2 * length * EPS * magnitude


@st.composite
def lora_case(draw):
    """(batch shape, in, out, r, scaling): 1 to 3 batch dims, a rank up to min(in, out), scale 1e-3 to 1e3
    (α / r > 0 for a layer; the functions take any sign)."""
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    in_f, out_f = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    r = draw(st.integers(1, min(in_f, out_f)))
    scaling = draw(st.floats(1e-3, 1e3))
    return batch, in_f, out_f, r, scaling


@settings(max_examples=80, deadline=None)
@given(case=lora_case(), sign=st.sampled_from([1.0, -1.0]), seed=st.integers(0, 2 ** 16))
def test_fused_forward_equals_the_readable_one_to_fp32_rounding(case, sign, seed):
    """Not bit for bit: the readable path rounds s · (h Bᵀ) and then adds it to W0 x; addmm computes
    W0 x + s · h Bᵀ inside one GEMM, whose kernel accumulates (and applies s and adds W0 x) in its own order,
    and ``F.linear`` may run h = x Aᵀ through another kernel than ``x @ A.T``. Float addition is not associative,
    so the two can differ in the last bits -- by at most the float32 error bound of a sum of in + r + 2 terms."""
    batch, in_f, out_f, r, s = case
    s *= sign
    g = torch.Generator().manual_seed(seed)
    x, base_out = torch.randn(*batch, in_f, generator=g), torch.randn(*batch, out_f, generator=g)
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    readable, fused = lora_forward(x, base_out, A, B, s), lora_forward_fused(x, base_out, A, B, s)
    assert fused.shape == readable.shape == base_out.shape and fused.dtype == readable.dtype == torch.float32
    magnitude = base_out.abs() + abs(s) * (x.abs() @ A.abs().T) @ B.abs().T
    assert ((fused - readable).abs() <= tolerance(in_f + r + 2, magnitude)).all()


def two_layers(in_f, out_f, r, scaling, base_dtype, seed):
    """LoRALinear "reference" and "fast" on one shared base (bias on), with the same random fp32 A and B."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(base_dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        base.bias.copy_(torch.randn(out_f, generator=g))
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    layers = []
    for backend in ("reference", "fast"):
        layer = LoRALinear(base, r=r, alpha=scaling * r, backend=backend)  # scaling = α / r
        layer.lora_A["default"] = nn.Parameter(A.clone())  # fp32 adapters, also on a bf16 base
        layer.lora_B["default"] = nn.Parameter(B.clone())
        layers.append(layer)
    return layers


def forward_backward(layer, x, upstream):
    """The output and the gradients of Σ output · upstream w.r.t. x, A and B."""
    x = x.clone().requires_grad_()
    out = layer(x)
    (out.float() * upstream).sum().backward()
    return out, x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad


@settings(max_examples=60, deadline=None)
@given(case=lora_case(), seed=st.integers(0, 2 ** 16))
def test_layer_backends_agree_in_fp32_outputs_and_gradients(case, seed):
    """fp32 base, fp32 adapters: "fast" runs the addmm, so outputs and gradients agree to float32 rounding
    (the reason in the test above), each within the bound of its own longest sum: over the N tokens and the in,
    out and r features, N + in + out + r + 2 terms at most."""
    batch, in_f, out_f, r, s = case
    reference, fast = two_layers(in_f, out_f, r, s, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, upstream = torch.randn(*batch, in_f, generator=g), torch.randn(*batch, out_f, generator=g)
    got = dict(zip(["out", "x", "A", "B"], forward_backward(fast, x, upstream)))
    want = dict(zip(["out", "x", "A", "B"], forward_backward(reference, x, upstream)))
    W0, A, B = reference.base.weight.detach().abs(), reference.lora_A["default"].detach().abs(), \
        reference.lora_B["default"].detach().abs()
    ax, au = x.abs().reshape(-1, in_f), upstream.abs().reshape(-1, out_f)  # (N, in), (N, out)
    magnitude = {"out": (ax @ W0.T + reference.base.bias.abs() + abs(s) * (ax @ A.T) @ B.T).view(*batch, out_f),
                 "x": (au @ W0 + abs(s) * (au @ B) @ A).view(*batch, in_f),  # g W0 + s (g B) A
                 "A": abs(s) * (au @ B).T @ ax,  # s (g B)ᵀ x: (r, in)
                 "B": abs(s) * au.T @ (ax @ A.T)}  # s gᵀ (x Aᵀ): (out, r)
    length = ax.shape[0] + in_f + out_f + r + 2
    for name in got:
        assert got[name].shape == want[name].shape, name
        assert ((got[name] - want[name]).abs() <= tolerance(length, magnitude[name])).all(), name


@settings(max_examples=30, deadline=None)
@given(case=lora_case(), seed=st.integers(0, 2 ** 16))
def test_layer_backends_are_bit_identical_on_a_bf16_base_with_fp32_adapters(case, seed):
    """bf16 base, fp32 adapters (QLoRA's usual setup): the LoRA term must be computed in fp32 and rounded to bf16
    once, so ``lora_forward_fused`` hands this case to ``lora_forward`` -- the same operations in the same order,
    hence the same bits, forward and backward."""
    batch, in_f, out_f, r, s = case
    reference, fast = two_layers(in_f, out_f, r, s, torch.bfloat16, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, upstream = torch.randn(*batch, in_f, generator=g).bfloat16(), torch.randn(*batch, out_f, generator=g)
    got, want = forward_backward(fast, x, upstream), forward_backward(reference, x, upstream)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.equal(a, b)
