"""lorabook.memory: the estimate against parameter counts, autograd's saved tensors and MemTracker; invariants;
the seed's rows; bad input. Tiny models, seconds in all (SmolLM2 only in the marked test)."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lorabook import memory
from lorabook.memory import activations  # noqa: E402
from lorabook.lora import add_lora  # noqa: E402
from lorabook.memory import KNOWN_MODELS, ModelSpec, estimate  # noqa: E402
from lorabook.models import tiny_llama  # noqa: E402


def _unique_params(model):
    return list({id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- weights, gradients, optimizer
@pytest.mark.parametrize("method", ["full", "lora"])
def test_weights_grads_optimizer_exact(tiny, method):
    """Bytes per category equal what the parameter counts say (fp32 + AdamW: 4 + 4 + 8 per trainable param)."""
    model = tiny_llama(seed=0)
    if method == "lora":
        add_lora(model, ("q_proj", "v_proj"), r=8)
    params = _unique_params(model)
    trainable = [p for p in params if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    e = estimate(tiny, method=method, batch_size=2, seq_len=16)
    assert e.slots["weights"] == sum(p.numel() * 4 for p in params) + buffers
    assert e.slots["gradients"] == sum(p.numel() * 4 for p in trainable)
    assert e.slots["optimizer"] == sum(p.numel() * 8 for p in trainable) + 4 * len(trainable)  # + step counters
    assert e.trainable_params == sum(p.numel() for p in trainable)
    assert e.params == sum(p.numel() for p in _unique_params(tiny))
    got = memory.measure(tiny, method=method, batch_size=2, seq_len=16, steps=1)
    assert got.weights == e.weights  # Parameter + Buffer, as MemTracker sees them


def test_sgd_and_rmsprop_states(tiny):
    P = sum(p.numel() for p in _unique_params(tiny))
    assert estimate(tiny, optimizer="sgd").slots["optimizer"] == 0
    n = len(_unique_params(tiny))
    assert estimate(tiny, optimizer="rmsprop").slots["optimizer"] == 4 * P + 4 * n
    # bitsandbytes: 1-byte states + an fp32 absmax per 256 for tensors of >= 4096 elements, else fp32 states
    want = sum(2 * (p.numel() + 4 * -(-p.numel() // 256)) if p.numel() >= 4096 else 8 * p.numel()
               for p in _unique_params(tiny))
    assert estimate(tiny, optimizer="adamw8bit").slots["optimizer"] == want
    assert estimate(tiny, optimizer="paged_adamw").slots["optimizer"] == 8 * P + 4 * n  # + a step counter each
    assert estimate(tiny, optimizer="paged_adamw8bit").slots["optimizer"] == want  # adamw8bit's bytes, in pages
    mixed = estimate(tiny, dtype="mixed")  # ZeRO: 2 (weights) + 2 (grads) + 12 (master + Adam)
    assert mixed.slots["gradients"] == 2 * P and mixed.slots["optimizer"] == 12 * P + 4 * n


# --------------------------------------------------------------------------- activations, term by term
_GROUPS = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2", "q_proj": "qkv", "k_proj": "qkv",
           "v_proj": "qkv", "o_proj": "o", "self_attn": "attention", "mlp": "mlp"}


def _group_module(name: str) -> str:
    parts = name.split(".")[3:]  # model.layers.2.<...>
    for p in reversed(parts):
        if p in _GROUPS:
            return _GROUPS[p]
    return "mlp" if "mlp" in parts else "?"


def _group_term(term: str) -> str:
    if term.startswith(("norm1", "norm2")):
        return term[:5]
    if term.startswith(("q/k/v", "q_proj", "k_proj", "v_proj")):
        return "qkv"
    if term.startswith("o_proj"):
        return "o"
    if term.startswith("attention"):
        return "attention"
    return "mlp"


@pytest.mark.parametrize("method,targets", [("full", None), ("lora", ("q_proj", "v_proj")),
                                            ("lora", "all-linear"), ("lora", ("o_proj", "down_proj"))])
def test_layer_activations_match_saved_tensors(method, targets):
    """Each term of the per-layer formula equals what autograd saves in that part of layer 2 (of 3)."""
    model = tiny_llama(seed=0, n_layers=3).train()
    if method == "lora":
        add_lora(model, targets, r=4)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    saved = memory.saved_by_module(model, ids)
    got: dict[str, int] = {}
    for name, nbytes in saved.items():
        if name.startswith("model.layers.2."):
            got[_group_module(name)] = got.get(_group_module(name), 0) + nbytes
    spec = memory.as_spec(model)
    lora = set() if method == "full" else {n.rsplit(".", 1)[-1] for n in memory.lora_modules(spec, targets)}
    x_req = method == "full" or bool(lora & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"})
    terms, _ = activations.layer_saved(spec, 4, method == "full", lora, 4, x_req, 24)
    want: dict[str, int] = {}
    for k, v in terms.items():
        if v:
            want[_group_term(k)] = want.get(_group_term(k), 0) + v
    assert got == want


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2-medium"])
@pytest.mark.parametrize("a", [4, 2])
@pytest.mark.parametrize("lora", [None, ("q_proj", "v_proj"), "all-linear"])
@pytest.mark.parametrize("x_req", [True, False])
def test_layer_backward_replay_conserves_bytes(name, a, lora, x_req):
    """After a layer's backward, what is left over is its weight gradients, minus the activations it freed."""
    spec = KNOWN_MODELS[name]
    short = {k.rsplit(".", 1)[-1]: v for k, v in spec.linears().items()}
    adapted = set() if lora is None else {n.rsplit(".", 1)[-1] for n in memory.lora_modules(spec, lora)}
    full, r, N = lora is None, 8, 64
    t, _ = activations.layer_saved(spec, a, full, adapted, r, x_req, N)
    peak, net = activations.layer_backward(spec, a, a, full, adapted, r, x_req, N, t)
    norm_p = spec.d_model * (2 if spec.norm == "layernorm" else 1)
    grads = (sum((i + spec.bias) * o for i, o in short.values()) + 2 * norm_p if full else
             sum(r * sum(short[k]) for k in adapted)) * a
    assert net == grads - sum(t.values()) and peak >= max(net, 0)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_estimate_matches_measure(method, ckpt):
    """Total within 10% of MemTracker's peak (we get ~0.1%), and the saved activations byte for byte."""
    model = tiny_llama(seed=0)
    kw = dict(method=method, batch_size=4, seq_len=32, gradient_checkpointing=ckpt)
    e, m = estimate(model, **kw), memory.measure(model, **kw)
    assert 0.9 <= e.total / m.total <= 1.1, (e.moments, m.snapshot)
    assert abs(e.total / m.total - 1) < 0.01
    assert e.saved_activations == m.saved_activations


def test_measure_does_not_touch_the_model(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    memory.measure(tiny, method="lora", batch_size=1, seq_len=8, steps=1, gradient_checkpointing=True)
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny.parameters()) and not tiny.training


def test_lora_dropout_and_other_optimizers():
    model = tiny_llama(seed=0)
    kw = dict(method="lora", batch_size=2, seq_len=16, lora_dropout=0.1, optimizer="rmsprop")
    e, m = estimate(model, **kw), memory.measure(model, **kw)
    assert e.saved_activations == m.saved_activations and abs(e.total / m.total - 1) < 0.02
    kw = dict(method="full", batch_size=2, seq_len=16, optimizer="sgd")
    e, m = estimate(model, **kw), memory.measure(model, **kw)
    assert abs(e.total / m.total - 1) < 0.02


# --------------------------------------------------------------------------- invariants
_specs = st.builds(
    lambda L, h, kv, hd, f, V, tie: ModelSpec(L, h * hd, h, kv if h % kv == 0 else 1, f, V, tie),
    st.integers(1, 4), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4]), st.sampled_from([8, 16, 64]),
    st.integers(8, 512), st.integers(16, 5000), st.booleans())
_cfg = dict(method=st.sampled_from(["full", "lora", "qlora"]), dtype=st.sampled_from(["fp32", "bf16", "mixed"]),
            optimizer=st.sampled_from(["sgd", "rmsprop", "adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit",
                                        "lion"]),
            ckpt=st.booleans(), B=st.integers(1, 8), T=st.integers(1, 256), r=st.integers(1, 8))
_hyp = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(spec=_specs, **_cfg)
def test_total_is_the_peak_and_covers_each_category(spec, method, dtype, optimizer, ckpt, B, T, r):
    e = estimate(spec, method, dtype, optimizer, B, T, lora_rank=r, gradient_checkpointing=ckpt)
    assert e.total == max(e.moments.values()) == sum(e.categories().values())
    assert all(0 <= v <= e.total for v in e.categories().values())
    assert e.total >= e.slots["weights"] + e.slots["optimizer"]
    assert e.naive_total == sum(e.slots.values())


@_hyp
@given(spec=_specs, **_cfg)
def test_activations_monotone_in_batch_and_seq(spec, method, dtype, optimizer, ckpt, B, T, r):
    kw = dict(method=method, dtype=dtype, optimizer=optimizer, lora_rank=r, gradient_checkpointing=ckpt)
    e = estimate(spec, batch_size=B, seq_len=T, **kw)
    for bigger in (estimate(spec, batch_size=B + 1, seq_len=T, **kw), estimate(spec, batch_size=B, seq_len=T + 7, **kw)):
        assert bigger.saved_activations > e.saved_activations and bigger.total >= e.total


@_hyp
@given(spec=_specs, **_cfg)
def test_checkpointing_never_increases_activations(spec, method, dtype, optimizer, ckpt, B, T, r):
    # (LoRA on every layer, as here: with adapters only in late layers checkpointing can cost more)
    kw = dict(method=method, dtype=dtype, optimizer=optimizer, batch_size=B, seq_len=T, lora_rank=r)
    assert (estimate(spec, gradient_checkpointing=True, **kw).saved_activations
            <= estimate(spec, gradient_checkpointing=False, **kw).saved_activations)


@_hyp
@given(spec=_specs, **_cfg)
def test_lora_below_full_and_bf16_halves_weights(spec, method, dtype, optimizer, ckpt, B, T, r):
    kw = dict(optimizer=optimizer, batch_size=B, seq_len=T, gradient_checkpointing=ckpt)
    if optimizer != "sgd":  # (plain SGD keeps no state, so a rank-r LoRA can cost as much as it saves)
        assert estimate(spec, "lora", dtype, lora_rank=r, **kw).total < estimate(spec, "full", dtype, **kw).total
    f32, b16 = estimate(spec, "full", "fp32", **kw), estimate(spec, "full", "bf16", **kw)
    assert b16.parts["weights: base (bf16)"] * 2 == f32.parts["weights: base (fp32)"]
    assert estimate(spec, "qlora", "bf16", lora_rank=r, **kw).weights < estimate(spec, "lora", "bf16", lora_rank=r,
                                                                                   **kw).weights


def test_known_models_match_the_papers():
    counts = {k: ModelSpec.count(v) for k, v in KNOWN_MODELS.items()}
    assert counts["smollm2-135m"] == 134_515_008 and counts["gpt2-medium"] == 354_823_168
    assert counts["llama-7b"] == 6_738_415_616 and counts["llama-65b"] == 65_285_660_672
    assert 174e9 < counts["gpt3-175b"] < 175.5e9


def test_module_and_config_inputs_agree(tiny):
    kw = dict(method="lora", batch_size=2, seq_len=16)
    assert estimate(tiny, **kw).total == estimate(tiny.config, **kw).total
    assert estimate("SmolLM2-135M", **kw).total == estimate(KNOWN_MODELS["smollm2-135m"], **kw).total


# --------------------------------------------------------------------------- the seed's numbers
def test_seed_rows_present():
    tables = [memory.seed_four_slots(), memory.seed_gpt3_lora(), memory.seed_qlora_llama7b()]
    for rows in tables:
        assert rows and all(set(r) == {"quantity", "paper", "ours", "ratio", "note"} and r["ours"] and r["note"]
                            for r in rows)
        assert "ours/paper" in memory.format_rows(rows, ratios=True).splitlines()[0]
        assert "ours/paper" not in memory.format_rows(rows)  # the default table is the one notebooks pinned
        assert memory.format_rows(rows).count("\n") == len(rows)
    slots = {r["quantity"]: r for r in tables[0]}
    assert [slots[k]["ours"] for k in ("weights (B/param)", "gradients (B/param)", "Adam states (B/param)")] == \
        ["4.00", "4.00", "8.00"]
    gpt3 = {r["quantity"]: r for r in tables[1]}
    assert gpt3["LoRA trainable params (Wq, Wv)"]["ours"] == "4.72M"  # r = 1 on Wq, Wv of 96 layers
    assert 9000 < float(gpt3["fewer trainable params"]["ours"].rstrip("x").replace(",", "")) < 10000
    qlora = {r["quantity"]: r for r in tables[2]}
    assert qlora["input gradients, batch 1"]["ours"].startswith(("56", "57"))
    assert [slots[k]["ratio"] for k in ("weights (B/param)", "Adam states (B/param)")] == ["1.00", "1.00"]
    assert float(qlora["... with gradient checkpointing"]["ratio"]) > 2  # ours keep all 32 layer inputs
    with pytest.raises(ValueError, match="ratio"):
        memory.format_rows([{"quantity": "q", "paper": "1", "ours": "2", "note": "n"}], ratios=True)
    with pytest.raises(ValueError, match="ratios"):
        memory.format_rows(tables[0], ratios="yes")


# --------------------------------------------------------------------------- plots and the calculator
def test_plot_breakdown_and_calculator(tiny):
    import matplotlib.pyplot as plt

    fig = memory.plot_breakdown({"full": estimate(tiny), "LoRA": estimate(tiny, "lora"),
                                 "measured": memory.measure(tiny, steps=1, seq_len=8)})
    assert len(fig.axes[0].patches) == 3 * len(memory.CATEGORIES)
    plt.close(fig)
    ui = memory.calculator()
    assert type(ui).__name__ == "VBox"
    plt.close("all")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,arg", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size"), (dict(seq_len=0), "seq_len"),
    (dict(seq_len=1.5), "seq_len"), (dict(method="prefix"), "method"), (dict(dtype="fp8"), "dtype"),
    (dict(optimizer="adafactor"), "optimizer"), (dict(lora_rank=0), "lora_rank"), (dict(lora_rank=-1), "lora_rank"),
    (dict(method="lora", lora_targets=("nope",)), "lora_targets"), (dict(method="lora", lora_targets=[]),
                                                                    "lora_targets"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(device="tpu"), "device")])
def test_bad_input_names_the_argument(tiny, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        estimate(tiny, **kwargs)


def test_bad_model_lists_known_names():
    with pytest.raises(ValueError, match="model must be one of .*llama-7b"):
        estimate("gpt-5")
    with pytest.raises(ValueError, match="model"):
        estimate(42)
    with pytest.raises(ValueError, match="n_layers"):
        ModelSpec(0, 64, 4, 2, 128, 256)
    with pytest.raises(ValueError, match="mlp"):
        ModelSpec(2, 64, 4, 2, 128, 256, mlp="relu")


def test_measure_bad_input(tiny):
    for kwargs, arg in [(dict(method="qalora"), "method"), (dict(optimizer="adafactor"), "optimizer"),
                        (dict(batch_size=0), "batch_size"), (dict(steps=0), "steps"),
                        (dict(method="lora", lora_targets=("nope",)), "lora_targets"),
                        (dict(method="qlora", lora_targets=("nope",)), "lora_targets")]:
        with pytest.raises(ValueError, match=arg):
            memory.measure(tiny, **kwargs)
    with pytest.raises(ValueError, match="model"):
        memory.measure("llama-7b")
    with pytest.raises(ValueError, match="results"):
        memory.plot_breakdown({})


def test_bench_quick_rows():
    from lorabook.bench.memory import bench_memory

    rows = bench_memory(quick=True)
    assert len(rows) == 6 and all(r["metric"] == "bytes" and 0.9 <= r["ratio"] <= 1.1 for r in rows)


@pytest.mark.smollm2
def test_smollm2_full_lora_qlora_like_with_like(smollm2):
    """The issue's comparison: SmolLM2 at one batch (4 x 128) with checkpointing, full fine-tuning vs LoRA vs QLoRA
    (r = 8, every linear layer), estimated and measured: each total within 10% (measured: within 0.001%)."""
    from lorabook.bench.memory import METHODS
    model, _ = smollm2
    peaks = {}
    for method, targets in METHODS.items():
        kw = dict(method=method, batch_size=4, seq_len=128, gradient_checkpointing=True, **targets)
        e, m = estimate(model, dtype="fp32", **kw), memory.measure(model, steps=1, **kw)
        assert 0.9 <= e.total / m.total <= 1.1, (method, e.total, m.total)
        assert e.slots["forward"] == m.slots["forward"]
        peaks[method] = m.total
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
    assert peaks["qlora"] < 0.6 * peaks["lora"]  # 0.59: the vocabulary's fp32 logits and embeddings stay


@pytest.mark.smollm2
def test_smollm2_lora_estimate_matches_measure(smollm2):
    model, _ = smollm2
    kw = dict(method="lora", batch_size=1, seq_len=64)
    e, m = estimate(model, **kw), memory.measure(model, steps=1, **kw)
    assert e.params == 134_515_008
    assert 0.9 <= e.total / m.total <= 1.1 and e.saved_activations == m.saved_activations


def test_optimizer_state_bytes_follows_the_seed():
    sizes = [1000, 24]  # two trainable tensors
    assert memory.optimizer_state_bytes(sizes, "sgd") == 0
    assert memory.optimizer_state_bytes(sizes, "rmsprop") == 1 * 4 * 1024 + 4 * 2  # + a step counter per tensor
    assert memory.optimizer_state_bytes(sizes, "adamw") == 2 * 4 * 1024 + 4 * 2
    assert memory.optimizer_state_bytes(sizes, "adamw", "bf16") == 2 * 2 * 1024 + 4 * 2
    assert memory.optimizer_state_bytes(sizes, "adamw", "mixed") == 2 * 4 * 1024 + 4 * 2
    assert memory.optimizer_state_bytes([8192], "adamw8bit") == 2 * (8192 + 4 * 32)


@pytest.mark.parametrize("kwargs, arg", [(dict(optimizer="adafactor"), "optimizer"), (dict(dtype="fp8"), "dtype")])
def test_optimizer_state_bytes_bad_input(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        memory.optimizer_state_bytes([10], **kwargs)


# --------------------------------------------------------------------------- Lion (one state), slots measured
def test_lion_keeps_one_fp32_state_like_bitsandbytes():
    """Lion (arXiv:2302.06675, Algorithm 2) keeps the momentum only; bitsandbytes' 32-bit Lion holds it in fp32
    whatever the parameter dtype, with a Python-int step counter: the bytes of its state dict, counted."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    sizes = [1000, 24, 4096]
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        params = [torch.nn.Parameter(torch.randn(n, dtype=torch_dtype)) for n in sizes]
        opt = bnb.optim.Lion(params, lr=1e-4, optim_bits=32)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        held = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
        assert memory.optimizer_state_bytes(sizes, "lion", dtype) == held == 4 * sum(sizes)
    assert memory.optimizer_state_bytes(sizes, "lion") * 2 < memory.optimizer_state_bytes(sizes, "adamw")


def test_lion_estimate_matches_measure(tiny):
    P = sum(p.numel() for p in _unique_params(tiny))
    kw = dict(method="full", batch_size=2, seq_len=16, optimizer="lion")
    e, m = estimate(tiny, **kw), memory.measure(tiny, steps=1, **kw)
    assert e.slots["optimizer"] == m.slots["optimizer"] == 4 * P and e.saved_activations == m.saved_activations
    # the optimizer step on a CPU: bitsandbytes' Lion makes g * scale, the interpolation and its sign (fp32) for
    # one tensor at a time, inside its op where MemTracker does not see them; on CUDA its kernel works in place.
    # So MemTracker's peak is the largest of the other moments.
    seen = max(v for k, v in e.moments.items() if k != "optimizer step")
    assert abs(seen / m.total - 1) < 0.01 and m.snapshot["Optstate"] == 4 * P
    big = max(p.numel() for p in _unique_params(tiny))
    step = e.moments["optimizer step"] - e.slots["weights"] - e.slots["optimizer"] - e.slots["gradients"]
    assert step == 3 * 4 * big + e.activation_terms["inputs (token ids)"]
    cuda = estimate(tiny, device="cuda", **kw)
    assert cuda.moments["optimizer step"] == e.moments["optimizer step"] - 3 * 4 * big


@pytest.mark.parametrize("method,ckpt", [("full", False), ("full", True), ("lora", False), ("lora", True)])
def test_measured_slots_and_what_the_peak_adds(tiny, method, ckpt):
    """The seed's four slots, measured, equal the estimate's; peak_over_slots splits peak - sum exactly."""
    kw = dict(method=method, batch_size=2, seq_len=16, gradient_checkpointing=ckpt)
    e, m = estimate(tiny, **kw), memory.measure(tiny, steps=1, **kw)
    assert m.slots == e.slots
    over = memory.peak_over_slots(m)
    assert sum(over.values()) == m.total - sum(m.slots.values())
    assert over["gradients not yet made"] <= 0
    assert ckpt or over["activations freed (-) or recomputed (+)"] <= 0  # (checkpointing recomputes a layer)
    assert over["backward temporaries"] >= 0 and over["optimizer step scratch"] >= 0
    if method == "lora" and not ckpt:  # peak at the start of the backward: d log-probs and d logits, fp32
        assert e.peak_moment == "backward: loss"
        assert over["backward temporaries"] == 2 * 4 * 2 * 16 * tiny.config.vocab_size


def test_peak_over_slots_bad_input(tiny):
    with pytest.raises(TypeError, match="m must be a Measurement"):
        memory.peak_over_slots(estimate(tiny))
    bare = memory.Measurement(weights=1, gradients=0, optimizer=0, activations=0, total=1, saved_activations=0)
    with pytest.raises(ValueError, match="after_forward"):
        memory.peak_over_slots(bare)


# --------------------------------------------------------------------------- optimizer state, counted
@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       optimizer=st.sampled_from(["sgd", "rmsprop", "adam", "adamw"]), dtype=st.sampled_from(["fp32", "bf16"]))
def test_optimizer_state_bytes_equals_torchs_state(sizes, optimizer, dtype):
    """The seed's 0 / 1 / 2 values per parameter (+ torch's fp32 step counters) is what torch really keeps."""
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "rmsprop": torch.optim.RMSprop,
            "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    counted = memory.state_bytes_after_step(make, [(n,) for n in sizes], torch_dtype)
    assert counted == memory.optimizer_state_bytes(sizes, optimizer, dtype)


def test_state_bytes_after_step_counts_factored_and_shared_state():
    # Adafactor (arXiv:1804.04235) keeps a row and a column factor per matrix, a full vector for a vector
    assert memory.state_bytes_after_step(torch.optim.Adafactor, [(6, 5), (7,)]) == 4 * (6 + 5) + 4 * 7 + 2 * 4
    momentum = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # one buffer per parameter
    assert memory.state_bytes_after_step(momentum, [(3, 4)]) == 4 * 12


@pytest.mark.parametrize("args,exc,arg", [
    (("not callable", [(2,)]), TypeError, "make_optimizer"),
    ((torch.optim.AdamW, []), ValueError, "shapes"),
    ((torch.optim.AdamW, [(2, 0)]), ValueError, r"shapes\[0\]"),
    ((torch.optim.AdamW, [()]), ValueError, r"shapes\[0\]"),
    ((torch.optim.AdamW, [(2,)], torch.int64), ValueError, "dtype"),
    ((lambda ps: None, [(2,)]), TypeError, "must return a torch.optim.Optimizer"),
])
def test_state_bytes_after_step_bad_input(args, exc, arg):
    with pytest.raises(exc, match=arg):
        memory.state_bytes_after_step(*args)


@pytest.mark.parametrize("method,ckpt", [("full", False), ("full", True), ("lora", False), ("lora", True)])
def test_peak_only_tracker_equals_memtracker(tiny, method, ckpt):
    """measure's default tracker drops MemTracker's per-module peaks only: every number is the same."""
    kw = dict(method=method, batch_size=2, seq_len=16, gradient_checkpointing=ckpt, steps=1)
    fast, plain = memory.measure(tiny, tracker="peak-only", **kw), memory.measure(tiny, tracker="memtracker", **kw)
    assert (fast.snapshot, fast.after_forward, fast.after_backward) == (plain.snapshot, plain.after_forward,
                                                                        plain.after_backward)
    assert fast.slots == plain.slots and fast.total == plain.total


def test_measure_bad_tracker(tiny):
    with pytest.raises(ValueError, match="tracker"):
        memory.measure(tiny, tracker="fast")


@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw8bit"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_paged_optimizers_state_is_measured_in_their_pages(tiny, method, optimizer):
    """measure() counts a paged optimizer's pages as optimizer state (they are not in opt.state), and the estimate
    agrees: paged AdamW is AdamW's bytes, paged AdamW8bit the 8-bit one's (2 bytes + absmax per parameter)."""
    kw = dict(method=method, batch_size=2, seq_len=16)
    e, m = estimate(tiny, optimizer=optimizer, **kw), memory.measure(tiny, steps=1, optimizer=optimizer, **kw)
    unpaged = memory.measure(tiny, steps=1, optimizer=optimizer[len("paged_"):], **kw)
    assert e.slots["optimizer"] == m.slots["optimizer"] == unpaged.slots["optimizer"] > 0
    assert abs(e.total / m.total - 1) < 0.01


@pytest.mark.parametrize("bf16_hardware", [False, True])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_qlora_estimate_matches_measure(tiny, targets, ckpt, bf16_hardware, monkeypatch):
    """lorabook's QLoRA of an fp32 model (NF4 + double-quantized linear weights, bf16 compute; embeddings, norms and
    LoRA in fp32) is estimate(method="qlora", dtype="fp32"): every slot as measured (the NF4 constants' bytes to
    within 0.1%), the peak within 3% -- on a CPU without bf16 matrix instructions (compute_linear's fp32 copies);
    with them (torch's bf16 GEMM) the de-quantized weight is freed before a checkpointed layer's backward peak, and
    the estimate, the same on every machine, is above the measured peak by at most that one weight. Both are
    played here, whatever this CPU is."""
    from lorabook.quant import linear
    monkeypatch.setattr(linear, "cpu_has_bf16_matmul", lambda: bf16_hardware)
    kw = dict(method="qlora", batch_size=2, seq_len=16, gradient_checkpointing=ckpt, lora_targets=targets)
    e, m = estimate(tiny, dtype="fp32", **kw), memory.measure(tiny, steps=1, **kw)
    assert abs(e.slots["weights"] / m.slots["weights"] - 1) < 1e-3
    assert {k: e.slots[k] for k in ("gradients", "optimizer", "forward")} == \
        {k: m.slots[k] for k in ("gradients", "optimizer", "forward")}
    if bf16_hardware and ckpt:
        one_weight = 4 * max(lin.in_features * lin.out_features for lin in tiny.modules()
                             if isinstance(lin, torch.nn.Linear) and lin is not tiny.lm_head)
        assert 0 <= e.total - m.total <= one_weight, (e.moments, m.snapshot)
    else:
        assert abs(e.total / m.total - 1) < 0.03, (e.moments, m.snapshot)
    full = memory.measure(tiny, steps=1, **{**kw, "method": "lora"})
    assert m.slots["weights"] < 0.4 * full.slots["weights"]  # the 4-bit base
