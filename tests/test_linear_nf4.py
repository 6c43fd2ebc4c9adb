"""LinearNF4: the frozen 4-bit layer, LoRA on top (QLoRA), bitsandbytes' Linear4bit as the reference,
quantize_model, and SmolLM2 still answering after quantization."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_same, poison_last_linear, snapshot
from lorabook.quant import LinearNF4, quantize_model
from lorabook.quant import linear as linear_module
from lorabook.quant.linear import compute_linear
from lorabook.lora import LoRALinear, add_lora, count_trainable, lora_layers, merge_lora, merged_adapter
from lorabook.models import chat
from lorabook.quant.nf4 import dequantize_4bit, quantize_4bit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # bitsandbytes warns about an optional CPU kernel package
    import bitsandbytes as bnb

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded_linear(in_f=128, out_f=64, bias=True, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_dequantize_then_linear(double_quant):
    linear = seeded_linear()
    layer = LinearNF4.from_linear(linear, double_quant=double_quant)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    w = dequantize_4bit(quantize_4bit(linear.weight.detach(), double_quant=double_quant))
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    assert torch.equal(layer.dequantize(), w)
    # close to the original (nn.Linear's uniform init is not the normal weights NF4 is made for)
    assert (layer(x) - linear(x)).norm() < 0.15 * linear(x).norm()
    assert (layer.in_features, layer.out_features) == (128, 64) and list(layer.parameters()) == [layer.bias]
    assert not layer.bias.requires_grad


def bnb_linear4bit(linear, double_quant):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes the weight


@pytest.mark.parametrize("double_quant", [False, True])
def test_output_equals_bitsandbytes_linear4bit(double_quant):
    linear = seeded_linear(256, 96)
    ours, theirs = LinearNF4.from_linear(linear, double_quant=double_quant), bnb_linear4bit(linear, double_quant)
    x = torch.randn(4, 7, 256, generator=torch.Generator().manual_seed(0))
    theirs.train()  # the dequantize-then-matmul path, like ours: equal to the last bit
    assert torch.equal(ours(x), theirs(x))
    theirs.eval()  # on an AVX512-BF16 CPU bitsandbytes switches to a fused kernel that computes in bf16
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=0.02 * ours(x).abs().max().item(), rtol=0.02)


def test_backward_recomputes_the_weight_instead_of_saving_it():
    layer = LinearNF4.from_linear(seeded_linear(128, 64), double_quant=True)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert all(s != (64, 128) for s in saved)  # no full-precision (out, in) weight kept for the backward
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize())


# ---- QLoRA: LoRA on a 4-bit base ----------------------------------------------------------------------------

def test_lora_on_a_4bit_base_trains_only_A_and_B():
    base = LinearNF4.from_linear(seeded_linear(32, 16), blocksize=32)
    layer = LoRALinear(base, r=4, alpha=8)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (32, 16, False)
    assert layer.lora_A["default"].dtype == torch.float32
    before = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(64, 32, generator=g), torch.randn(64, 16, generator=g)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"lora_A.default", "lora_B.default"}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base never changes


def test_bf16_compute_with_fp32_adapters():
    base = LinearNF4.from_linear(seeded_linear(64, 32), compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4)
    nn.init.normal_(layer.lora_B["default"], generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.dtype == torch.float32 and base(x.bfloat16()).dtype == torch.bfloat16
    expected = F.linear(x, base.dequantize().float()) + base.bias + x @ layer.delta_weight().T
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.02)


def within_one_ulp(y, exact, mantissa_bits, atol=1e-4):
    """|y - exact| <= one unit in the last place of a 16-bit float at exact's size (+ atol for fp32 sums near 0)."""
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - mantissa_bits)
    return bool(((y.double() - exact).abs() <= ulp + atol).all())


@pytest.mark.parametrize("dtype, mantissa_bits", [(torch.bfloat16, 7), (torch.float16, 10)])
def test_a_16bit_linear_on_the_cpu_accumulates_in_fp32(dtype, mantissa_bits):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((4, 9, 256), (96, 256), (96,)))
    fast, native = compute_linear(x, w, b), compute_linear(x, w, b, backend="native")
    assert fast.dtype == native.dtype == dtype
    auto = "native" if dtype == torch.bfloat16 and linear_module.cpu_has_bf16_matmul() else "fp32-accumulate"
    assert torch.equal(fast, compute_linear(x, w, b, backend=auto))  # "auto" on this CPU
    fast = compute_linear(x, w, b, backend="fp32-accumulate")
    exact = F.linear(x.double(), w.double(), b.double())  # the 16-bit values, multiplied and summed exactly
    assert within_one_ulp(fast, exact, mantissa_bits) and within_one_ulp(native, exact, mantissa_bits)
    assert within_one_ulp(fast, native.double(), mantissa_bits)  # the two differ only in the order of the sums
    x32, w32 = x.float(), w.float()
    assert torch.equal(compute_linear(x32, w32), F.linear(x32, w32))  # fp32 is torch's GEMM, whatever the backend
    for wide in (torch.float32, torch.float64):  # never rounded down to fp32 or below
        xw, ww = x.to(wide), w.to(wide)
        assert torch.equal(compute_linear(xw, ww, backend="fp32-accumulate"), F.linear(xw, ww))
    with pytest.raises(ValueError, match="backend must be one of"):
        compute_linear(x, w, backend="bf16")


@pytest.mark.parametrize("hardware", [False, True])
def test_auto_takes_torchs_bf16_gemm_only_where_the_cpu_has_bf16_matrix_instructions(monkeypatch, hardware):
    assert isinstance(linear_module.cpu_has_bf16_matmul(), bool)  # this machine's flags
    monkeypatch.setattr(linear_module, "cpu_has_bf16_matmul", lambda: hardware)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), torch.randn(32, 64, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        xs, ws = x.to(dtype), w.to(dtype)
        chosen = "native" if hardware and dtype == torch.bfloat16 else "fp32-accumulate"
        assert torch.equal(compute_linear(xs, ws), compute_linear(xs, ws, backend=chosen)), (dtype, chosen)


def test_bf16_layer_forward_and_backward_use_compute_linear():
    layer = LinearNF4.from_linear(seeded_linear(128, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    y = layer(x)
    w = layer.dequantize()  # (64, 128) bf16
    assert torch.equal(y, compute_linear(x.detach(), w, layer.bias.bfloat16()))
    g = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    y.backward(g)
    assert torch.equal(x.grad, compute_linear(g, w.t()))


def test_merging_into_a_4bit_base_is_a_clear_error(tiny):
    model = add_lora(quantize_model(tiny), ["q_proj", "v_proj"], r=2)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into a LinearNF4 base: W0 \\+ ΔW has no exact NF4 form"):
        layer.merge()
    with pytest.raises(ValueError, match="cannot merge"):
        merge_lora(model)
    assert merged_adapter(model) is None


def test_quantize_model_then_add_lora(tiny):
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = tiny(x).logits
    model = quantize_model(copy.deepcopy(tiny), blocksize=32)
    n_layers = tiny.config.num_hidden_layers
    assert sum(isinstance(m, LinearNF4) for m in model.modules()) == 7 * n_layers
    assert type(model.lm_head) is nn.Linear  # the (tied) output head stays full precision
    logits = model(x).logits
    assert (logits - reference).norm() < 0.2 * reference.norm()
    add_lora(model, "all-linear", r=4)
    trainable, _ = count_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    assert torch.equal(model(x).logits, logits)  # B = 0: LoRA starts at the quantized model


def test_state_dict_round_trip_and_dtype_casts(tiny):
    model = quantize_model(copy.deepcopy(tiny), double_quant=True)
    other = quantize_model(copy.deepcopy(tiny).apply(lambda m: nn.init.normal_(m.weight) if isinstance(m, nn.Linear)
                                                     else None), double_quant=True)
    other.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(other(x).logits, model(x).logits)
    model.to(torch.bfloat16)  # casts floating-point parameters; the 4-bit layer's fp32 constants stay fp32
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_absmax2.dtype == torch.float32 and layer.weight_absmax_offset.dtype == torch.float32
    assert model(x).logits.dtype == torch.bfloat16


@pytest.mark.smollm2
def test_smollm2_in_nf4_still_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    quantized = quantize_model(copy.deepcopy(model))  # 210 linear layers, double-quantized NF4
    assert sum(isinstance(m, LinearNF4) for m in quantized.modules()) == 210
    answer = chat(quantized, tokenizer, "What is the capital of France?", max_new_tokens=7)
    assert answer.startswith("The capital of France is Paris")


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_input():
    q = quantize_4bit(torch.randn(64, 32))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="weight must be a lorabook.quant.nf4.QuantizedTensor"):
        LinearNF4(torch.randn(64, 32))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        LinearNF4(quantize_4bit(torch.randn(64)))
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        LinearNF4(q, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="bias must be a tensor of shape \\(64,\\)"):
        LinearNF4(q, bias=torch.zeros(32))
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        LinearNF4.from_linear(nn.Linear(32, 64), blocksize=100)
    with pytest.raises(TypeError, match="model is a single nn.Linear"):
        quantize_model(nn.Linear(32, 64))
    with pytest.raises(ValueError, match="skip must be a tuple of module names"):
        quantize_model(nn.Sequential(nn.Linear(32, 64)), skip="0")
    with pytest.raises(ValueError, match="base must be an nn.Linear, a transformers Conv1D or a layer with a lora_base_layer"):
        LoRALinear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_weight_in_the_last_layer_leaves_the_model_unchanged(tiny, value):
    name = poison_last_linear(tiny, value)
    before = snapshot(tiny)
    with pytest.raises(ValueError, match=f"{name}.weight: w contains NaN or Inf"):
        quantize_model(tiny)
    assert_same(snapshot(tiny), before)  # every layer was quantized before any was swapped in


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocksize=48), "blocksize must be a power of two"), (dict(blocksize=64.0), "blocksize must be a power"),
    (dict(blocksize=True), "blocksize must be a power"), (dict(codebook="nf5"), "codebook must be one of"),
    (dict(compute_dtype=torch.int8), "compute_dtype must be one of"), (dict(double_quant=1), "double_quant must be"),
])
def test_bad_quantize_model_settings_change_nothing(tiny, kwargs, match):
    before = snapshot(tiny)
    with pytest.raises(ValueError, match=match):
        quantize_model(tiny, **kwargs)
    assert_same(snapshot(tiny), before)
