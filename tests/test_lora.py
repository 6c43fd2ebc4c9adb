"""LoRA layers: init, scaling, trainable counts, GPT-2 Conv1D, adapters by name, merge / unmerge, bad input."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from conftest import assert_same, snapshot
from lorabook.lora import (LoRALinear, active_adapter, adapter_names, add_lora, count_trainable, delete_adapter,
                           disable_adapters, find_targets, lora_layers, merge_and_unload, merge_lora,
                           merged_adapter, set_adapter, switch_adapter, unmerge_lora)
from lorabook.models import tiny_llama


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


# ---- GPT-2's Conv1D, adapters by name, merge / unmerge ------------------------------------------------------

def tiny_gpt2(seed=0):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()


def randomize_B(model, name="default", std=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            if name in m.lora_B:
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=gen) * std)
    return model


def test_conv1d_is_wrapped_with_its_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # nf=out 48, nx=in 32: weight (32, 48)
    nn.init.normal_(conv.weight, std=0.1)
    layer = LoRALinear(conv, r=4, alpha=8)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (32, 48, True)
    assert layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (48, 4)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), conv(x) + x @ layer.delta_weight().T)
    w0 = conv.weight.clone()
    layer.merge()
    torch.testing.assert_close(conv.weight, w0 + layer.delta_weight().T)
    layer.unmerge()
    assert (conv.weight - w0).abs().max() <= 1e-6


def test_gpt2_targets_and_count():
    model = add_lora(tiny_gpt2(), ["c_attn"], r=4)
    d, r = 32, 4
    assert list(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert count_trainable(model)[0] == 2 * r * (d + 3 * d)  # c_attn: d -> 3d (fused q, k, v)
    assert "lm_head" not in find_targets(tiny_gpt2(), "all-linear")
    assert len(find_targets(tiny_gpt2(), "all-linear")) == 4 * 2  # c_attn, c_proj, c_fc, mlp.c_proj


def test_lora_path_gradients_match_the_formula():
    layer = LoRALinear(nn.Linear(16, 12), r=3, alpha=6)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(4, 7, 16)
    layer(x).pow(2).sum().backward()
    A, B = layer.lora_A["default"].detach().requires_grad_(), layer.lora_B["default"].detach().requires_grad_()
    (layer.base(x) + 2.0 * (x @ A.T) @ B.T).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad)
    assert layer.base.weight.grad is None


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 16), r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), layer.base(x) + x @ layer.delta_weight().T)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_dropout_drops_the_lora_input_only(backend):
    # h = W0 x + s · B A dropout(x): the base path sees the whole x, the mask is F.dropout's (inverted: kept
    # entries are scaled by 1 / (1 - p)), drawn once per forward.
    p = 0.4
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8, dropout=p, backend=backend).train()
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(6, 16)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, p, training=True)
    assert 0 < (dropped == 0).float().mean() < 1  # some entries dropped, not all
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(got, layer.base(x) + 2.0 * dropped @ A.T @ B.T)
    layer.lora_B["default"].data.zero_()  # B = 0 (at init): dropout changes nothing
    assert torch.equal(layer(x), layer.base(x))


def test_dropout_matches_peft_in_train_and_eval():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12))
    theirs = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"]))
    ours = add_lora(copy.deepcopy(net), ["0"], r=4, alpha=8, dropout=0.3)
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours[0].lora_A["default"].copy_(peft_layer.lora_A["default"].weight)
        ours[0].lora_B["default"].copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(5, 16)
    for mode in ("train", "eval"):
        getattr(theirs, mode)(), getattr(ours, mode)()
        torch.manual_seed(1)
        want = theirs(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours(x), want)


def test_merging_is_exact_only_in_eval():
    # The merged forward is W x: it has no dropout to apply. In eval it equals the unmerged forward; in train
    # the unmerged one drops inputs of the LoRA path, the merged one cannot.
    layer = LoRALinear(nn.Linear(16, 16), r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(8, 16)
    with torch.no_grad():
        layer.eval()
        unmerged_eval = layer(x)
        layer.train()
        torch.manual_seed(0)
        unmerged_train = layer(x)
        layer.merge()
        merged_train = layer(x)  # train() mode, but nothing is dropped any more
        layer.eval()
        merged_eval = layer(x)
    torch.testing.assert_close(merged_eval, unmerged_eval, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged_train, merged_eval)
    assert not torch.allclose(merged_train, unmerged_train, rtol=1e-3, atol=1e-3)


def test_bf16_base():
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2)
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(in_f=st.integers(1, 48), out_f=st.integers(1, 48), r_frac=st.floats(0, 1), alpha=st.floats(0.1, 64),
       size=st.floats(1e-4, 1.0), conv=st.booleans(), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_equals_unmerged_and_unmerge_restores(in_f, out_f, r_frac, alpha, size, conv, rslora, seed):
    torch.manual_seed(seed)
    r = 1 + int(r_frac * (min(in_f, out_f) - 1))
    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)
    nn.init.uniform_(base.weight, -1, 1)
    layer = LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():  # any B, scaled so that max |ΔW| = size
        layer.lora_B["default"].normal_()
        layer.lora_B["default"].mul_(size / layer.delta_weight().abs().max().clamp_min(1e-30))
    w0 = base.weight.detach().clone()
    x = torch.randn(5, in_f)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)  # fp32: the LoRA path is not added again
    layer.unmerge()
    assert (base.weight - w0).abs().max().item() <= 1e-6
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def two_adapters(tiny):
    add_lora(tiny, ["q_proj", "v_proj"], r=4, alpha=8)
    add_lora(tiny, ["q_proj", "o_proj"], r=2, alpha=4, adapter_name="sql")
    randomize_B(tiny, "default", seed=1), randomize_B(tiny, "sql", seed=2)
    return tiny


def test_merged_model_matches_unmerged_and_unmerge_restores(tiny):
    x = torch.randint(0, 256, (2, 16))
    w0 = {k: v.clone() for k, v in tiny.state_dict().items()}
    add_lora(tiny, "all-linear", r=4)
    randomize_B(tiny)
    with torch.no_grad():
        unmerged = tiny(x).logits
        merge_lora(tiny)
        assert merged_adapter(tiny) == "default"
        torch.testing.assert_close(tiny(x).logits, unmerged, rtol=1e-5, atol=1e-5)
        unmerge_lora(tiny)
    base = {k.replace(".base.", "."): v for k, v in tiny.state_dict().items() if "lora_" not in k}
    assert max((base[k] - w0[k]).abs().max().item() for k in w0) <= 1e-6


def test_merging_twice_and_unmerging_unmerged_are_errors(tiny):
    two_adapters(tiny)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(tiny)
    merge_lora(tiny)
    for name in ("default", "sql", None):
        with pytest.raises(ValueError, match="already merged"):
            merge_lora(tiny, name)
    with pytest.raises(ValueError, match="already merged"):
        lora_layers(tiny)["model.layers.0.self_attn.q_proj"].merge()


def test_set_adapter_and_unknown_names(tiny):
    x = torch.randint(0, 256, (1, 8))
    two_adapters(tiny)
    assert adapter_names(tiny) == ["default", "sql"] and active_adapter(tiny) == "sql"
    with pytest.raises(ValueError, match=r"unknown adapter_name 'nope'.*\['default', 'sql'\]"):
        set_adapter(tiny, "nope")
    for fn in (merge_lora, switch_adapter, delete_adapter):
        with pytest.raises(ValueError, match="unknown adapter_name 'nope'"):
            fn(tiny, "nope")
    with torch.no_grad():
        sql = tiny(x).logits
        set_adapter(tiny, "default")
        default = tiny(x).logits
        assert lora_layers(tiny)["model.layers.0.self_attn.o_proj"].active_adapter is None  # no "default" there
        assert not torch.allclose(sql, default)
        with disable_adapters(tiny):
            base = tiny(x).logits
        assert torch.equal(tiny(x).logits, default) and not torch.allclose(base, default)
    with pytest.raises(ValueError, match="no LoRA layers"):
        set_adapter(tiny_gpt2(), "default")


def test_disable_adapters_gives_the_base(tiny):
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = tiny(x).logits
        randomize_B(add_lora(tiny, "all-linear", r=2))
        with disable_adapters(tiny):
            assert torch.equal(tiny(x).logits, before)
        merge_lora(tiny)
        with pytest.raises(ValueError, match="merged"):
            with disable_adapters(tiny):
                pass


def test_switch_adapter_is_unmerge_plus_merge(tiny):
    x = torch.randint(0, 256, (2, 8))
    two_adapters(tiny)
    with torch.no_grad():
        set_adapter(tiny, "sql")
        sql = tiny(x).logits
        set_adapter(tiny, "default")
        default = tiny(x).logits
        merge_lora(tiny, "default")
        with pytest.raises(ValueError, match="merged"):
            set_adapter(tiny, "sql")
        switch_adapter(tiny, "sql")
        assert merged_adapter(tiny) == "sql" and active_adapter(tiny) == "sql"
        torch.testing.assert_close(tiny(x).logits, sql, rtol=1e-5, atol=1e-5)
        switch_adapter(tiny, "default")
        torch.testing.assert_close(tiny(x).logits, default, rtol=1e-5, atol=1e-5)


def test_delete_adapter_and_merge_and_unload(tiny):
    x = torch.randint(0, 256, (2, 8))
    two_adapters(tiny)
    delete_adapter(tiny, "sql")
    assert adapter_names(tiny) == ["default"] and active_adapter(tiny) == "default"  # the active one: as in peft
    assert isinstance(tiny.model.layers[0].self_attn.o_proj, nn.Linear)  # no adapter left: unwrapped
    set_adapter(tiny, "default")
    with torch.no_grad():
        lora = tiny(x).logits
        merge_lora(tiny)
        with pytest.raises(ValueError, match="merged"):
            delete_adapter(tiny, "default")
        merge_and_unload(tiny)
        assert not lora_layers(tiny) and type(tiny.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(tiny(x).logits, lora, rtol=1e-5, atol=1e-5)


def test_adding_a_name_twice_to_a_model_changes_nothing(tiny):
    add_lora(tiny, ["q_proj"], r=2)
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match="'default' already exists"):
        add_lora(tiny, ["q_proj", "v_proj"], r=2)
    assert tiny.state_dict().keys() == before.keys() and len(lora_layers(tiny)) == 2


def test_a_rank_too_big_for_one_target_changes_nothing(tiny):
    with pytest.raises(ValueError, match=r"r=48 exceeds min\(in_features, out_features\)=32"):
        add_lora(tiny, ["q_proj", "v_proj"], r=48)  # q_proj 64 -> 64 is fine, v_proj 64 -> 32 (GQA) is not
    assert not lora_layers(tiny) and all(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("kwargs, match", [(dict(use_rslora=1), "use_rslora must be True or False, got 1"),
                                           (dict(r=True), "r must be a positive int, got True"),
                                           (dict(alpha=float("nan")), "alpha must be a finite number > 0")])
def test_a_bad_setting_changes_nothing(tiny, kwargs, match):
    before = snapshot(tiny)
    with pytest.raises(ValueError, match=match):
        add_lora(tiny, "all-linear", **kwargs)
    assert_same(snapshot(tiny), before)  # not even frozen


def test_bad_adapter_name_and_base():
    for bad in ("", "a.b", "copy", "keys", 3):
        with pytest.raises(ValueError, match="adapter_name"):
            LoRALinear(nn.Linear(8, 8), r=2, adapter_name=bad)
    with pytest.raises(ValueError, match="base must be"):
        LoRALinear(nn.Conv2d(3, 3, 1), r=1)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(8, 8), r=2, alpha=-1)


def test_fp32_adapter_on_a_bf16_base_merges_and_unmerges():
    layer = LoRALinear(nn.Linear(32, 16).to(torch.bfloat16), r=4)
    layer.lora_A["default"].data = layer.lora_A["default"].data.float()
    layer.lora_B["default"].data = torch.randn(16, 4) * 0.01
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    w0, unmerged = layer.base.weight.clone(), layer(x)
    assert unmerged.dtype == torch.bfloat16
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=0.05, atol=0.05)  # bf16 rounding of W0 + ΔW
    layer.unmerge()
    assert (layer.base.weight.float() - w0.float()).abs().max() <= 0.01  # bf16: within its rounding, not 1e-6


# ---- a tied lm_head is never merged into; deleting the active adapter ---------------------------------------

@pytest.mark.parametrize("call", [merge_lora, lambda m: switch_adapter(m, "default"), merge_and_unload],
                         ids=["merge_lora", "switch_adapter", "merge_and_unload"])
def test_lora_on_a_tied_head_is_never_merged(call):
    tied = randomize_B(add_lora(tiny_llama(0, tie_embeddings=True), ["lm_head", "q_proj"], r=4))
    assert tied.lm_head.base.weight is tied.model.embed_tokens.weight
    before, embeddings = snapshot(tied), tied.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge adapter 'default' into lm_head: its weight is tied to "
                                         r"\['model.embed_tokens.weight'\]"):
        call(tied)
    assert torch.equal(tied.model.embed_tokens.weight, embeddings) and merged_adapter(tied) is None
    assert_same(snapshot(tied), before)  # the q_proj layers were not merged either


def test_lora_on_an_untied_head_merges():
    x = torch.randint(0, 256, (2, 8))
    untied = randomize_B(add_lora(tiny_llama(0, tie_embeddings=False), ["lm_head", "q_proj"], r=4))
    embeddings = untied.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        unmerged = untied(x).logits
        merge_and_unload(untied)
        torch.testing.assert_close(untied(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert type(untied.lm_head) is nn.Linear and torch.equal(untied.model.embed_tokens.weight, embeddings)


def test_deleting_the_active_adapter_switches_to_the_first_remaining_one():
    x = torch.randint(0, 256, (2, 8))
    base = tiny_llama(0)
    with torch.no_grad():
        plain = base(x).logits
    two = two_adapters(copy.deepcopy(base))  # "default" on q and v, then "sql" (active) on q and o
    only_default = add_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)  # never had "sql"
    with torch.no_grad():
        for path, m in lora_layers(only_default).items():
            m.lora_A["default"].copy_(lora_layers(two)[path].lora_A["default"])
            m.lora_B["default"].copy_(lora_layers(two)[path].lora_B["default"])
    assert active_adapter(two) == "sql"
    delete_adapter(two, "sql")
    assert active_adapter(two) == "default" and adapter_names(two) == ["default"]
    with torch.no_grad():
        assert torch.equal(two(x).logits, only_default(x).logits)
        assert not torch.allclose(two(x).logits, plain)
        delete_adapter(two, "default")  # the last one: the plain base model
        assert not lora_layers(two) and type(two.model.layers[0].self_attn.q_proj) is nn.Linear
        assert torch.equal(two(x).logits, plain)
