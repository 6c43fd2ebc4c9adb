"""lorabook.baselines on tiny Llama and GPT-2: exact starts, exact |Θ| formulas, where each adapter sits, prefix
tuning against the KV-cache route, what a training step touches, Table 1's harness, and bad input."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lorabook import baselines as B, latency
from lorabook.lora import count_trainable
from lorabook.models import tiny_llama


def tiny_gpt2(seed=0):
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()


MAKE = {"llama": lambda: tiny_llama(seed=0), "gpt2": tiny_gpt2}
FAMILIES = sorted(MAKE)


def padded_batch(seed=0):
    """Two sequences of 12 tokens, the first left-padded by 4: ids, attention mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 256, (2, 12), generator=g)
    mask = torch.ones_like(x)
    mask[0, :4], x[0, :4] = 0, 0
    return x, mask, x.masked_fill(mask == 0, -100)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses: left padding does not shift positions


def dims(model):
    c = model.config
    L, d, heads = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    hd = d // heads
    d_kv = (getattr(c, "num_key_value_heads", None) or heads) * hd
    d_ff = getattr(c, "intermediate_size", None) or c.n_inner or 4 * d
    return L, d, d_kv, d_ff


def expected_trainable(model, method, m=64, P=16, r=8):
    """|Θ| by the formulas in the module docstring (and lora's r·(in + out) per target)."""
    L, d, d_kv, d_ff = dims(model)
    gpt2 = model.config.model_type == "gpt2"
    return {"adapter_h": 2 * L * (2 * d * m + d + m),
            "adapter_l": L * (2 * d * m + m + 3 * d),
            "bitfit": L * (7 * d + d_ff) + d if gpt2 else L * (d + 2 * d_kv + 2 * d + 2 * d_ff),
            "prefix": 2 * L * P * d_kv,
            "lora": L * r * (d + 3 * d) if gpt2 else L * r * ((d + d) + (d + d_kv)),  # c_attn / q_proj + v_proj
            "full": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}[method]


TRAINABLE_NAME = {"adapter_h": lambda n: ".adapter." in n and (".mlp." in n or "attn." in n),
                  "adapter_l": lambda n: ".adapter." in n and ".mlp." not in n and "attn." not in n,
                  "bitfit": lambda n: n.endswith(".bias"), "prefix": lambda n: n.startswith("prefix_tuning."),
                  "lora": lambda n: ".lora_" in n, "full": lambda n: True}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adapter_h", "adapter_l", "bitfit", "full"])
def test_starts_at_the_base_model(family, method):
    model = MAKE[family]()
    x, mask, _ = padded_batch()
    with torch.no_grad():
        before = model(x, attention_mask=mask).logits
        B.prepare(model, method)
        after = model(x, attention_mask=mask).logits
    assert (after - before).abs().max().item() <= 1e-6  # adapters add exactly 0; BitFit's new biases are 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(B.PREPARE_FUNCTIONS))
def test_only_the_intended_parameters_train_with_exact_counts(family, method):
    model = MAKE[family]()
    B.prepare(model, method)
    assert count_trainable(model)[0] == expected_trainable(model, method)
    for name, p in model.named_parameters():
        assert p.requires_grad == TRAINABLE_NAME[method](name), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(B.PREPARE_FUNCTIONS))
def test_training_steps_change_exactly_the_trainable_parameters(family, method):
    model = B.prepare(MAKE[family](), method).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, mask, labels = padded_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # a zero-initialised up-projection / LoRA B leaves W_down / A a zero gradient on step one
        opt.zero_grad()
        loss = model(x, attention_mask=mask, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"{name} is frozen but changed"


def _capture(store, key):
    def hook(module, args, output):
        store[key] = (output[0] if isinstance(output, tuple) else output).detach()
    return hook


def _randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_sits_after_the_output_projections_before_the_residual_adds(family):
    model = MAKE[family]()
    _, layers, attn_name = B._arch(model)
    layer = layers[0]
    attn = getattr(layer, attn_name)
    out_proj, mlp_proj = (attn.o_proj, layer.mlp.down_proj) if family == "llama" else (attn.c_proj, layer.mlp.c_proj)
    pre, post = {}, {}
    for store_key, module in (("o", out_proj), ("attn", attn), ("down", mlp_proj), ("mlp", layer.mlp)):
        module.register_forward_hook(_capture(pre, store_key))  # registered first: sees the output unadapted
    layer.register_forward_pre_hook(lambda m, args, kwargs: pre.__setitem__("in", args[0]), with_kwargs=True)
    B.add_adapter_houlsby(model, bottleneck=8)
    _randomize(model)
    for store_key, module in (("attn", attn), ("mlp", layer.mlp), ("layer", layer)):
        module.register_forward_hook(_capture(post, store_key))  # registered after the adapter's hook
    with torch.no_grad():
        model(padded_batch()[0])
        assert torch.equal(pre["attn"], pre["o"]) and torch.equal(pre["mlp"], pre["down"])  # eval: no dropout
        torch.testing.assert_close(post["attn"], attn.adapter(pre["o"]))
        torch.testing.assert_close(post["mlp"], layer.mlp.adapter(pre["down"]))
        torch.testing.assert_close(post["layer"], pre["in"] + post["attn"] + post["mlp"])  # then the residual adds


@pytest.mark.parametrize("family", FAMILIES)
def test_lin_sits_on_the_layer_output_with_its_layernorm(family):
    model = MAKE[family]()
    _, layers, attn_name = B._arch(model)
    layer = layers[1]
    pre, post = {}, {}
    layer.register_forward_hook(_capture(pre, "layer"))
    getattr(layer, attn_name).register_forward_hook(_capture(pre, "attn"))
    layer.mlp.register_forward_hook(_capture(pre, "mlp"))
    layer.register_forward_pre_hook(lambda m, args, kwargs: pre.__setitem__("in", args[0]), with_kwargs=True)
    B.add_adapter_lin(model, bottleneck=8)
    _randomize(model)
    layer.register_forward_hook(_capture(post, "layer"))
    a = layer.adapter
    with torch.no_grad():
        model(padded_batch()[0])
        h = pre["layer"]
        torch.testing.assert_close(h, pre["in"] + pre["attn"] + pre["mlp"])  # the adapter comes after the MLP's add
        by_hand = h + F.linear(F.relu(F.linear(F.layer_norm(h, (h.shape[-1],), a.ln.weight, a.ln.bias, a.ln.eps),
                                                a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        torch.testing.assert_close(post["layer"], by_hand)


def test_houlsby_near_identity_init_starts_close_not_exact():
    model = tiny_llama()
    x = padded_batch()[0]
    with torch.no_grad():
        before = model(x).logits
        diff = (B.add_adapter_houlsby(model, 8, init_std=1e-3)(x).logits - before).abs().max().item()
    assert 0 < diff < 1e-2


def test_bitfit_llama_saves_and_reloads(tmp_path):
    model = B.add_bitfit(tiny_llama())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x, mask, _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)


# ---- prefix tuning ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_equals_the_kv_cache_route_with_left_padding(family):
    """PEFT's route: pre-fill a cache with the prefix, widen the mask; same positions -> the same logits."""
    model = MAKE[family]()
    plain = copy.deepcopy(model)
    B.add_prefix_tuning(model, n_prefix=5)
    x, mask, _ = padded_batch()
    kv = model.prefix_tuning().detach()  # (L, 2, n_kv, P, hd)
    cache = DynamicCache(config=plain.config)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].expand(2, -1, -1, -1), kv[i, 1].expand(2, -1, -1, -1), i)
    with torch.no_grad():
        want = plain(x, attention_mask=torch.cat([torch.ones(2, 5, dtype=mask.dtype), mask], 1),
                     position_ids=positions(mask), cache=cache).logits
        got = model(x, attention_mask=mask, position_ids=positions(mask)).logits
        base = plain(x, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (got[real] - base[real]).abs().max() > 1e-2  # and the prefix does change the output


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_left_padding_matches_the_unpadded_sequence_and_eager_matches_sdpa(family):
    sdpa = B.add_prefix_tuning(MAKE[family](), n_prefix=3)
    eager = MAKE[family]()
    eager.config._attn_implementation = "eager"
    B.add_prefix_tuning(eager, n_prefix=3).prefix_tuning.load_state_dict(sdpa.prefix_tuning.state_dict())
    x, mask, _ = padded_batch()
    with torch.no_grad():
        padded = sdpa(x, attention_mask=mask, position_ids=positions(mask)).logits
        alone = sdpa(x[:1, 4:]).logits  # no mask at all: sdpa's causal shortcut, rebuilt with the prefix
        torch.testing.assert_close(padded[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eager(x, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()],
                                   padded[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_generate_equals_greedy_without_cache(family):
    torch.manual_seed(0)  # the prefix is drawn from the global generator: not from whatever earlier tests left
    model = B.add_prefix_tuning(MAKE[family](), n_prefix=4)
    model.generation_config.eos_token_id = None  # generate() would stop a row at EOS; the loop below never stops
    x, mask, _ = padded_batch()
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        seq, m = x, mask
        for _ in range(3):  # recompute everything each step: no cache involved
            nxt = model(seq, attention_mask=m, position_ids=positions(m)).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_prefix_reparametrisation_counts_trains_and_bakes():
    model = tiny_llama()
    L, d, d_kv, _ = dims(model)
    P, h = 4, 32
    B.add_prefix_tuning(model, n_prefix=P, reparam_hidden=h)
    assert count_trainable(model)[0] == P * d + d * h + h + (h + 1) * 2 * L * d_kv
    x, mask, labels = padded_batch()
    model(x, attention_mask=mask, labels=labels).loss.backward()
    assert model.prefix_tuning.embedding.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_tuning."))
    with torch.no_grad():
        before = model(x, attention_mask=mask).logits
        model.prefix_tuning.bake()
        torch.testing.assert_close(model(x, attention_mask=mask).logits, before)
    assert count_trainable(model)[0] == 2 * L * P * d_kv


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_from_real_tokens_starts_at_their_keys_and_values(family):
    """Li & Liang's init: the prefix is the model's own keys and values of P real tokens (its KV cache)."""
    ids = torch.tensor([5, 17, 3, 9])
    with torch.no_grad():
        cache = MAKE[family]()(input_ids=ids[None], use_cache=True).past_key_values
    model = B.add_prefix_tuning(MAKE[family](), n_prefix=4, init_ids=ids)
    kv = model.prefix_tuning.key_value  # (L, 2, n_kv, P, hd)
    for i, layer in enumerate(cache.layers):
        assert torch.equal(kv[i, 0], layer.keys[0]) and torch.equal(kv[i, 1], layer.values[0])
    assert kv.requires_grad and count_trainable(model)[0] == kv.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_needs_the_causal_lm_call(family):
    model = B.add_prefix_tuning(MAKE[family]())
    inner = model.model if family == "llama" else model.transformer
    with pytest.raises(RuntimeError, match="call the causal LM"):
        inner(padded_batch()[0])


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda m: B.add_adapter_houlsby(m, bottleneck=0), "bottleneck"),
    (lambda m: B.add_adapter_houlsby(m, bottleneck=-4), "bottleneck"),
    (lambda m: B.add_adapter_lin(m, bottleneck=2.5), "bottleneck"),
    (lambda m: B.add_adapter_lin(m, bottleneck=True), "bottleneck"),
    (lambda m: B.add_adapter_houlsby(m, activation="swish"), "activation"),
    (lambda m: B.add_adapter_houlsby(m, init_std=-1.0), "init_std"),
    (lambda m: B.add_prefix_tuning(m, n_prefix=0), "n_prefix"),
    (lambda m: B.add_prefix_tuning(m, n_prefix=-2), "n_prefix"),
    (lambda m: B.add_prefix_tuning(m, reparam_hidden=0), "reparam_hidden"),
    (lambda m: B.add_prefix_tuning(m, init_std=0.0), "init_std"),
    (lambda m: B.add_prefix_tuning(m, n_prefix=4, init_ids=torch.arange(3)), r"init_ids must be .* shape \(4,\)"),
    (lambda m: B.add_prefix_tuning(m, n_prefix=2, init_ids=torch.ones(2)), "init_ids must be an integer tensor"),
    (lambda m: B.add_prefix_tuning(m, n_prefix=2, reparam_hidden=8, init_ids=torch.arange(2)), "without reparam"),
    (lambda m: B.prepare(m, "qlora"), r"unknown method 'qlora'; methods: \['adapter_h'"),
    (lambda m: B.prepare(m, "bitfit", bottleneck=8), r"takes no argument\(s\) \['bottleneck'\]"),
    (lambda m: B.prepare(B.add_adapter_lin(m), "adapter_l"), "already has adapters"),
    (lambda m: B.add_prefix_tuning(B.add_prefix_tuning(m)), "already has prefix_tuning"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_llama())


def test_a_refused_second_call_leaves_the_model_as_it_was():
    model = B.add_adapter_houlsby(tiny_llama(), 8)
    model.model.norm.requires_grad_(True)
    with pytest.raises(ValueError, match="already has adapters"):
        B.add_adapter_houlsby(model, 4)
    assert model.model.norm.weight.requires_grad and model.model.layers[0].mlp.adapter.down.out_features == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_train_norms_adds_the_norm_parameters(family):
    model = B.add_adapter_houlsby(MAKE[family](), bottleneck=8, train_norms=True)
    L, d, _, _ = dims(model)
    per_norm = d if family == "llama" else 2 * d  # RMSNorm: weight; LayerNorm: weight and bias
    assert count_trainable(model)[0] == expected_trainable(model, "adapter_h", m=8) + (2 * L + 1) * per_norm


@pytest.mark.parametrize("method", sorted(B.PREPARE_FUNCTIONS))
def test_unsupported_models_are_refused(method):
    for model in (nn.Linear(4, 4), tiny_llama().model):  # not a causal LM / a Llama without its head
        with pytest.raises(ValueError, match="model must be a causal LM with config.model_type in"):
            B.prepare(model, method)


def test_prefix_refuses_other_attention_implementations():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        B.add_prefix_tuning(model)


# ---- Table 1 ------------------------------------------------------------------------------------------------------

def test_sizes_for_the_papers_budgets_on_gpt2_medium():
    cfg = latency.gpt2_config("gpt2-medium")
    sizes = {m: [latency.size_for_budget(m, cfg, b) for b in (0.5e6, 11e6)] for m in ("adapter_h", "adapter_l", "lora")}
    assert sizes == {"adapter_h": [5, 111], "adapter_l": [9, 222], "lora": [5, 112]}
    L, d = 24, 1024
    assert 2 * L * (2 * d * 111 + d + 111) == 10_966_224 and L * (2 * d * 9 + 9 + 3 * d) == 516_312


def test_latency_table_rows_on_a_tiny_gpt2():
    cfg = tiny_gpt2().config
    with one_torch_thread():
        rows = latency.latency_table(cfg, shapes=((2, 8), (1, 4)), budgets=(2_000, 20_000), warmup=0, rounds=3)
    assert [(r["method"], r["batch"], r["seq"]) for r in rows] == [
        (m, b, s) for b, s in ((2, 8), (1, 4)) for m in latency.LATENCY_METHODS]
    L, d = 2, 64
    theta = {"base": lambda s: 0, "lora": lambda r: 4 * L * d * r, "lora_merged": lambda r: 4 * L * d * r,
             "adapter_h": lambda m: 2 * L * (2 * d * m + d + m), "adapter_l": lambda m: L * (2 * d * m + m + 3 * d)}
    for r in rows:
        assert r["trainable"] == theta[r["method"]](r["size"]) and r["ms"] > 0 and r["clock"] == "thread"
        if r["method"] == "base":
            assert r["overhead_pct"] == 0 and r["ratios"] == []
        else:
            assert len(r["ratios"]) == 3 and r["ci_low_pct"] <= r["overhead_pct"] <= r["ci_high_pct"]
        assert r["flops_pct"] == latency.extra_flops_pct(r["method"], r["trainable"], cfg, r["batch"], r["seq"])
    assert "adapter_h" in latency.format_table(rows) and "95% CI" in latency.format_table(rows)


class one_torch_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def test_bracketed_rounds_put_every_method_between_two_base_calls():
    calls = []
    fns = {m: (lambda m=m: calls.append(m)) for m in ("base", "a", "b")}
    out = latency.bracketed_rounds(fns, "base", rounds=4, warmup=2, clock="wall")
    assert sorted(calls[:6]) == ["a", "a", "b", "b", "base", "base"]  # two warm-up calls each
    rounds = [calls[6 + 5 * k: 11 + 5 * k] for k in range(4)]
    assert len(calls) == 6 + 4 * 5 and all(r[::2] == ["base"] * 3 and sorted(r[1::2]) == ["a", "b"] for r in rounds)
    assert len({tuple(r) for r in rounds}) == 2  # the order of a and b changes between rounds (seeded)
    assert len(out["base"]["times"]) == 4 * 3 and len(out["a"]["ratios"]) == 4 and out["base"]["ratios"] == []


def test_bracketed_ratio_is_the_call_over_the_mean_of_its_two_base_calls(monkeypatch):
    seconds = iter([1.0, 3.0, 2.0, 6.0, 4.0])  # base 1, a 3, base 2, b 6, base 4 (order a, b or b, a)
    monkeypatch.setattr(latency, "_seconds", lambda fn, clock, device: next(seconds))
    out = latency.bracketed_rounds({"base": int, "a": int, "b": int}, "base", rounds=1, warmup=0, clock="wall")
    assert sorted(out["a"]["ratios"] + out["b"]["ratios"]) == [2.0, 3.0 / 3.0 * 2.0]
    assert out["base"]["times"] == [1.0, 2.0, 4.0]


def test_ratio_ci_brackets_the_median_and_shrinks_with_more_rounds():
    g = torch.Generator().manual_seed(0)
    few = (1.03 + 0.05 * torch.randn(10, generator=g)).tolist()
    many = (1.03 + 0.05 * torch.randn(400, generator=g)).tolist()
    med, lo, hi = latency.ratio_ci(few)
    assert lo <= med <= hi
    m2, lo2, hi2 = latency.ratio_ci(many)
    assert hi2 - lo2 < (hi - lo) / 2 and lo2 < 1.03 < hi2 and lo2 > 1.0  # 400 rounds separate +3% from 0
    assert latency.ratio_ci(few) == latency.ratio_ci(few)  # seeded
    assert latency.ratio_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratios=[1.0]), "at least 2"), (dict(ratios=[1.0, float("nan")]), "finite positive"),
    (dict(ratios=[1.0, -1.0]), "finite positive"), (dict(ratios=[1.0, 1.1], confidence=1.0), "confidence"),
    (dict(ratios=[1.0, 1.1], n_boot=0), "n_boot"),
])
def test_ratio_ci_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latency.ratio_ci(**kwargs)


def test_flops_count_the_weights_once_per_token():
    cfg = latency.gpt2_config("gpt2-medium")
    d, L, V = 1024, 24, cfg.vocab_size
    assert latency.forward_flops(cfg, 1, 1) == 2 * (L * (12 * d * d + 2 * d) + d * V)
    assert latency.forward_flops(cfg, 2, 16) == 2 * 2 * 16 * (L * (12 * d * d + 2 * 16 * d) + d * V)
    assert latency.extra_flops_pct("lora_merged", 11_010_048, cfg, 1, 16) == 0.0
    pct = latency.extra_flops_pct("lora", 11_010_048, cfg, 1, 16)
    assert pct == pytest.approx(100 * 11_010_048 / (L * (12 * d * d + 32 * d) + d * V)) and 3.0 < pct < 3.2
    with pytest.raises(ValueError, match="method must be one of"):
        latency.extra_flops_pct("bitfit", 10, cfg, 1, 16)
    with pytest.raises(ValueError, match="trainable"):
        latency.extra_flops_pct("lora", -1, cfg, 1, 16)
    with pytest.raises(ValueError, match="seq"):
        latency.forward_flops(cfg, 1, 0)


def test_pick_clock():
    with one_torch_thread():
        assert latency.pick_clock(None, "cpu") == "thread" and latency.pick_clock("wall", "cpu") == "wall"
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert latency.pick_clock(None, "cpu") == "wall"
        with pytest.raises(ValueError, match="clock='thread' needs"):
            latency.pick_clock("thread", "cpu")
    finally:
        torch.set_num_threads(n)
    with pytest.raises(ValueError, match="clock must be one of"):
        latency.pick_clock("cycles", "cpu")


def test_bracketed_rounds_bad_input():
    with pytest.raises(ValueError, match="base must be one of"):
        latency.bracketed_rounds({"a": int}, "base", rounds=1)
    with pytest.raises(ValueError, match="besides the base"):
        latency.bracketed_rounds({"base": int}, "base", rounds=1)
    with pytest.raises(ValueError, match="rounds"):
        latency.bracketed_rounds({"base": int, "a": int}, "base", rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        latency.bracketed_rounds({"base": int, "a": int}, "base", rounds=1, warmup=-1)


def test_merged_lora_variant_equals_unmerged_and_leaves_the_shared_base_alone():
    base = tiny_gpt2()
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = B.prepare(latency._shared_copy(base), "lora", r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        x = padded_batch()[0]
        unmerged = model(x).logits
        torch.testing.assert_close(latency._merge(model)(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(methods=("base", "qlora")), "methods"), (dict(methods=("lora",)), "methods"),
    (dict(budgets=(1e3, 2e3)), "budgets"), (dict(shapes=((1, 4096),), budgets=(1e3,)), "seq"),
    (dict(shapes=((0, 4),), budgets=(1e3,)), "batch"), (dict(rounds=0), "rounds"), (dict(rounds=1), "rounds"),
    (dict(confidence=0.0), "confidence"), (dict(clock="cycles"), "clock"),
])
def test_latency_table_bad_input(kwargs, match):
    args = dict(shapes=((1, 4),), budgets=(1e3,)) | kwargs
    with pytest.raises(ValueError, match=match):
        latency.latency_table(tiny_gpt2().config, **args)


def test_size_and_config_bad_input():
    with pytest.raises(ValueError, match="config must be one of"):
        latency.gpt2_config("gpt-3")
    with pytest.raises(ValueError, match="method must be one of"):
        latency.size_for_budget("bitfit", latency.gpt2_config(), 1e6)
    with pytest.raises(ValueError, match="budget must be a finite number > 0, got 0"):
        latency.size_for_budget("lora", latency.gpt2_config(), 0)


def test_widen_mask_puts_visible_prefix_columns_first():
    none = B._widen_mask(None, 2, q_len=2, kv_len=4, device="cpu")  # 2 new queries after 2 cached tokens
    assert none.tolist() == [[[[True, True, True, True, True, False], [True] * 6]]]
    boolean = B._widen_mask(torch.tensor([[[[True, False]]]]), 1, 1, 2, "cpu")
    assert boolean.tolist() == [[[[True, True, False]]]]
    additive = B._widen_mask(torch.tensor([[[[0.0, -1e9]]]]), 2, 1, 2, "cpu")
    assert additive.tolist() == [[[[0.0, 0.0, 0.0, -1e9]]]]


@pytest.mark.smollm2
def test_smollm2_counts_and_exact_starts(smollm2):
    """The real base (L 30, d 576, d_kv 192, d_ff 1536): each method's |Θ| by formula; adapters/BitFit start exact."""
    base, _ = smollm2
    x = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649]])
    with torch.no_grad():
        want = base(x).logits
        for method, theta in (("adapter_h", 4_462_080), ("adapter_l", 2_265_600), ("bitfit", 155_520),
                              ("prefix", 184_320)):
            model = B.prepare(copy.deepcopy(base), method)
            assert count_trainable(model)[0] == theta == expected_trainable(model, method)
            if method != "prefix":
                assert (model(x).logits - want).abs().max().item() <= 1e-6
            del model


def test_format_table_reads_rows_of_an_earlier_sweep_without_intervals():
    old = [dict(method="base", batch=1, seq=16, size=0, trainable=0, ms=350.0, iqr_ms=14.7, overhead_pct=0.0),
           dict(method="lora", batch=1, seq=16, size=112, trainable=11_010_048, ms=364.4, iqr_ms=10.7, overhead_pct=4.2)]
    text = latency.format_table(old)
    assert "—" in text and "+4.2%" in text and "11,010,048" in text
