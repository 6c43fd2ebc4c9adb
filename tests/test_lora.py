"""LoRA layer basics (the foundation issue B builds on): init, scaling, trainable counts, bad input."""
import math

import pytest
import torch
import torch.nn as nn

from lorabook.lora import LoRALinear, add_lora, count_trainable, find_targets, lora_layers


def test_starts_at_the_base_model(tiny):
    x = torch.randint(0, 256, (2, 16))
    before = tiny(x).logits
    add_lora(tiny, "all-linear", r=4)
    assert torch.equal(tiny(x).logits, before)  # B = 0 so ΔW = 0


def test_delta_weight_is_scaled_BA():
    layer = LoRALinear(nn.Linear(32, 16, bias=True), r=4, alpha=8)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 32)
    expected = layer.base(x) + x @ (layer.delta_weight()).T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B["default"] @ layer.lora_A["default"])


def test_rslora_scale():
    assert LoRALinear(nn.Linear(32, 32), r=16, alpha=8, use_rslora=True).scaling["default"] == 8 / math.sqrt(16)


def test_trainable_count_matches_the_seed_formula(tiny):
    # |Θ| = 2 × L_LoRA × d_model × r for square targets: q_proj is 64→64; v_proj is 64→32 with GQA.
    add_lora(tiny, ["q_proj"], r=4)
    trainable, total = count_trainable(tiny)
    L, d, r = tiny.config.num_hidden_layers, tiny.config.hidden_size, 4
    assert trainable == 2 * L * d * r
    assert all(not p.requires_grad for n, p in tiny.named_parameters() if "lora_" not in n)


def test_all_linear_never_wraps_the_output_head(tiny):
    names = find_targets(tiny, "all-linear")
    assert "lm_head" not in names and len(names) == 7 * tiny.config.num_hidden_layers


def test_regex_targets(tiny):
    assert find_targets(tiny, r".*layers\.0\.self_attn\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_second_adapter_goes_on_the_same_layers(tiny):
    add_lora(tiny, ["q_proj"], r=2)
    add_lora(tiny, ["q_proj"], r=2, adapter_name="sql")
    layers = lora_layers(tiny)
    assert len(layers) == 2 and all(list(m.lora_A) == ["default", "sql"] for m in layers.values())


@pytest.mark.parametrize("kwargs, arg", [
    (dict(r=0), "r must"), (dict(r=-1), "r must"), (dict(r=2.0), "r must"), (dict(r=65), "exceeds"),
    (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_bad_hyperparameters(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        LoRALinear(nn.Linear(64, 64), **kwargs)


def test_target_that_matches_nothing_lists_what_exists(tiny):
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*q_proj"):
        add_lora(tiny, ["query"])


def test_adding_a_name_twice_is_an_error():
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=2)
