"""prepare_qlora: NF4 base + LoRA on every linear but the head + checkpointing + PagedAdamW; it trains only A
and B, equals the pieces composed by hand, saves a PEFT adapter; bad input leaves the model unchanged."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import assert_same, poison_last_linear, snapshot
from lorabook.quant import LinearNF4, quantize_model
from lorabook.lora import add_lora, count_trainable, lora_layers
from lorabook.lora import load_adapter, save_adapter
from lorabook.models import tiny_llama
from lorabook.paged import PagedAdamW
from lorabook.qlora import add_qlora, prepare_qlora

pytestmark = pytest.mark.usefixtures("one_thread")


def ids_for(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def train(model, optimizer, ids, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_the_pieces_are_in_place():
    model, optimizer = prepare_qlora(tiny_llama(0), r=4, dropout=0.0)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7  # two blocks, seven linear layers each; the tied head stays as it was
    assert all(isinstance(m.base, LinearNF4) and m.base.weight_absmax_codes is not None for m in layers.values())
    assert all(m.base.compute_dtype == torch.bfloat16 for m in layers.values())
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert isinstance(optimizer, PagedAdamW) and optimizer.param_groups[0]["params"] == trainable
    assert optimizer.param_groups[0]["lr"] == 2e-4 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert count_trainable(model)[0] == sum(4 * (m.in_features + m.out_features) for m in layers.values())


def test_equals_the_pieces_composed_by_hand_and_trains_only_A_and_B():
    torch.manual_seed(0)  # LoRA's A is random: compose by hand from the same seed
    by_hand = add_lora(quantize_model(tiny_llama(0), compute_dtype=torch.float32), "all-linear", r=4, dropout=0.0)
    torch.manual_seed(0)
    ours, optimizer = prepare_qlora(tiny_llama(0), r=4, dropout=0.0, compute_dtype=torch.float32,
                                    gradient_checkpointing=False)
    ids = ids_for(ours)
    assert torch.equal(ours(input_ids=ids).logits, by_hand(input_ids=ids).logits)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    frozen_buffers = {n: b.clone() for n, b in ours.named_buffers()}
    losses = train(ours, optimizer, ids, 5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)
    assert all(torch.equal(b, frozen_buffers[n]) for n, b in ours.named_buffers())  # the 4-bit codes too


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, _ = prepare_qlora(tiny_llama(0), r=4, dropout=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    checkpointed, _ = prepare_qlora(tiny_llama(0), r=4, dropout=0.0)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)  # B too: every gradient is nonzero
        model.train()
        ids = ids_for(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # recomputing the forward changes no bit


def test_the_adapter_saves_in_peft_format_and_loads_on_a_full_precision_base(tmp_path):
    model, _ = prepare_qlora(tiny_llama(0), r=4, dropout=0.0)
    for m in lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B["default"])
    save_adapter(model, tmp_path)
    plain = load_adapter(tiny_llama(0), tmp_path)
    for name, layer in lora_layers(plain).items():
        theirs = lora_layers(model)[name]
        assert torch.equal(layer.lora_A["default"], theirs.lora_A["default"])
        assert torch.equal(layer.lora_B["default"], theirs.lora_B["default"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueError, "r must be a positive int, got 0"),
    (dict(r=33), ValueError, r"r=33 exceeds min\(in_features, out_features\)=32"),
    (dict(alpha=-1), ValueError, "alpha must be a finite number > 0"),
    (dict(dropout=1.0), ValueError, r"dropout must be a finite number in \[0, 1\)"),
    (dict(target_modules=["nope"]), ValueError, "target_modules"),
    (dict(blocksize=48), ValueError, "blocksize must be a power of two"),
    (dict(compute_dtype=torch.int8), ValueError, "compute_dtype must be one of"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0"),
    (dict(page_bytes=8), ValueError, "page_bytes must be an int >= 64"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"), (dict(r=True), ValueError, "r must be a pos"),
    (dict(alpha=float("inf")), ValueError, "alpha must be a finite"), (dict(blocksize=True), ValueError, "blocksize"),
    (dict(double_quant=1), ValueError, "double_quant must be True or False, got 1"),
    (dict(gradient_checkpointing="yes"), ValueError, "gradient_checkpointing must be True or False"),
])
def test_bad_input_leaves_the_model_unchanged(kwargs, error, match):
    model = tiny_llama(0)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        prepare_qlora(model, **{"r": 4, **kwargs})
    assert_same(snapshot(model), before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("call", ["add_qlora", "prepare_qlora"])
def test_a_bad_weight_in_the_last_layer_leaves_the_model_unchanged(call, value):
    model = tiny_llama(0)
    name = poison_last_linear(model, value)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{name}.weight: w contains NaN or Inf"):
        {"add_qlora": add_qlora, "prepare_qlora": prepare_qlora}[call](model, r=4)
    assert_same(snapshot(model), before)


def no_checkpointing_llama():
    model = tiny_llama(0)
    model.supports_gradient_checkpointing = False  # as a transformers model without it says
    return model


@pytest.mark.parametrize("make", [no_checkpointing_llama, lambda: nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))],
                         ids=["unsupported", "not transformers"])
def test_a_model_that_cannot_checkpoint_fails_before_anything_changes(make):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot use gradient checkpointing"):
        add_qlora(model, r=4)
    assert_same(snapshot(model), before)
    add_qlora(model, r=4, gradient_checkpointing=False)  # the rest works on it
    assert all(isinstance(m.base, LinearNF4) for m in lora_layers(model).values()) and lora_layers(model)


def test_conv1d_layers_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="target transformer.h.0.attn.c_attn is a Conv1D; QLoRA quantizes nn.Linear"):
        prepare_qlora(gpt2, r=4, target_modules=["c_attn"])


def test_not_a_model():
    with pytest.raises(TypeError, match="model must be a torch nn.Module, got str"):
        prepare_qlora("SmolLM2")


@pytest.mark.smollm2
def test_smollm2_qlora_step_lowers_the_loss(smollm2):
    model, tokenizer = smollm2
    model, optimizer = prepare_qlora(copy.deepcopy(model), r=8, dropout=0.0)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    losses = train(model, optimizer, ids, 3)
    assert losses[-1] < losses[0]


# ---- lorabook.experiments.qlora_eval: notebook 07's adapter scored on other bases (data/qlora_transfer.json)

from lorabook.experiments import qlora_eval  # noqa: E402


def test_base_variant_nf4_is_the_base_add_qlora_trains_on(tmp_path):
    base = tiny_llama(0)
    before = snapshot(base)
    torch.manual_seed(0)
    trained = add_qlora(copy.deepcopy(base), r=4, dropout=0.0, gradient_checkpointing=False)
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B too: the adapter changes the output
    save_adapter(trained, tmp_path)
    ids = ids_for(base)
    loaded = load_adapter(qlora_eval.base_variant(base, "nf4"), tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)  # same codes, same bf16 compute
    assert_same(snapshot(base), before)  # the fp32 base is copied, never changed


def test_base_variants_differ_only_where_they_say():
    base = tiny_llama(0)
    nf4, nf4_fp32, fp32 = (qlora_eval.base_variant(base, k) for k in ("nf4", "nf4-fp32", "fp32"))
    layers = [[m for m in model.modules() if isinstance(m, LinearNF4)] for model in (nf4, nf4_fp32, fp32)]
    assert len(layers[0]) == len(layers[1]) == 2 * 7 and layers[2] == []  # the head stays nn.Linear
    assert {m.compute_dtype for m in layers[0]} == {torch.bfloat16}
    assert {m.compute_dtype for m in layers[1]} == {torch.float32}
    for a, b in zip(*layers[:2]):
        assert torch.equal(a.quantized.packed, b.quantized.packed)  # the same 4-bit codes
        assert torch.equal(a.dequantize().float(), b.dequantize().to(torch.bfloat16).float())  # bf16 rounds them
    ids = ids_for(base)
    assert torch.equal(fp32(input_ids=ids).logits, base(input_ids=ids).logits)
    assert fp32 is not base


@pytest.mark.parametrize("call, match", [
    (lambda m: qlora_eval.base_variant(m, "int4"), "kind"),
    (lambda m: qlora_eval.train_adapter(m, None, [], "bf16"), "on"),
    (lambda m: qlora_eval.train_adapter(m, None, [], "nf4", steps=0), "steps"),
    (lambda m: qlora_eval.train_adapter(m, None, [], "nf4", seed=-1), "seed"),
    (lambda m: qlora_eval.transfer(n=0, model_name="tiny"), "n"),
    (lambda m: qlora_eval.transfer(threads=0, model_name="tiny"), "threads"),
    (lambda m: qlora_eval.transfer(bases=("fp16",), model_name="tiny"), "bases"),
])
def test_transfer_bad_input_is_refused_first(call, match):
    model = tiny_llama(0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_same(snapshot(model), before)


def test_transfer_scores_every_adapter_on_every_base(capsys):
    result = qlora_eval.transfer(n=2, steps=1, model_name="tiny", bases=("nf4", "fp32"))
    assert list(result["adapters"]) == ["nf4", "fp32"] and result["eval_n"] == 2 and len(result["gold"]) == 2
    for on, adapter in result["adapters"].items():
        assert list(adapter["eval"]) == ["nf4", "fp32"] and len(adapter["loss_curve"]) == 1
        for kind, e in adapter["eval"].items():
            assert len(e["predictions"]) == 2 and e["accuracy"] == e["correct"] / 2
            assert e["correct_first10"] == e["correct"]  # n < 10: the first ten are all of them
            assert 0 <= e["same_as_own_base"] <= 2
        assert adapter["eval"][on]["same_as_own_base"] == 2
    assert result["recipe"]["steps"] == 1 and result["command"].startswith("python -m lorabook.experiments transfer")


def test_transfer_cli_dry_run_leaves_the_other_tables(capsys):
    import argparse
    args = argparse.Namespace(tables=["transfer", "qlora"], dry_run=True)
    assert qlora_eval.cli(args) is False and args.tables == ["qlora"]
    assert qlora_eval.cli(argparse.Namespace(tables=["transfer"], dry_run=True)) is True
    assert "qlora_transfer.json" in capsys.readouterr().out


# ---- merge_qlora: into dequant(W4), optionally re-quantized -------------------------------------------------

from lorabook.qlora import merge_qlora, merged_weight  # noqa: E402
from lorabook.quant.nf4 import quantize_4bit  # noqa: E402


def trained_qlora(compute_dtype=torch.float32, double_quant=True, steps=3):
    """A tiny QLoRA model after a few steps (B is no longer 0), in eval mode."""
    torch.manual_seed(0)
    model, optimizer = prepare_qlora(tiny_llama(0), r=4, dropout=0.0, compute_dtype=compute_dtype,
                                     double_quant=double_quant, gradient_checkpointing=False, lr=1e-2)
    train(model, optimizer, ids_for(model), steps)
    return model.eval()


def logits(model, seed=1):
    with torch.no_grad():
        return model(input_ids=ids_for(model, seed)).logits


def test_the_16bit_merge_is_the_unmerged_model():
    model = trained_qlora()
    before, weights = logits(model), {p: merged_weight(m, "default") for p, m in lora_layers(model).items()}
    merge_qlora(model)
    assert not lora_layers(model) and not any(isinstance(m, LinearNF4) for m in model.modules())
    assert all(torch.equal(model.get_submodule(p).weight, w) for p, w in weights.items())  # fp32: the sum itself
    assert (logits(model) - before).abs().max() < 1e-4  # X (W + ΔW) vs X W + X ΔW: fp32 rounding only


def test_the_requantized_merge_is_nf4_of_the_sum_and_the_wrong_merge_is_not_the_model():
    """Both the re-quantized merge and the merge into the original weights move the logits by a 4-bit rounding
    (which is larger depends on the model: notebook 07 measures them on SmolLM2); the 16-bit merge does not."""
    model = trained_qlora()
    original = tiny_llama(0)  # the weights the 4-bit base was quantized from
    unmerged = logits(model)
    sums = {p: merged_weight(m, "default") for p, m in lora_layers(model).items()}
    deltas = {p: m.delta_weight("default") for p, m in lora_layers(model).items()}
    requantized = merge_qlora(copy.deepcopy(model), requantize=True)
    for path, W in sums.items():
        layer = requantized.get_submodule(path)
        assert isinstance(layer, LinearNF4) and layer.weight_absmax_codes is not None  # double quant kept
        assert torch.equal(layer.weight_packed, quantize_4bit(W, double_quant=True).packed)
    wrong = original.eval()
    with torch.no_grad():
        for path, delta in deltas.items():
            wrong.get_submodule(path).weight.add_(delta)  # W0 + ΔW: the adapter on weights it never saw
    right = merge_qlora(model)
    err = {name: (logits(m) - unmerged).abs().max().item() for name, m in
           (("16-bit", right), ("requantized", requantized), ("wrong", wrong))}
    assert err["16-bit"] < 1e-4 < min(err["requantized"], err["wrong"])


def test_requantizing_an_untrained_adapter_gives_the_same_codes():
    """B = 0 at the start: NF4(dequant(W4)) = W4 (without double quantization; its level ±1 keeps each absmax)."""
    torch.manual_seed(0)
    model = add_qlora(tiny_llama(0), r=4, double_quant=False, gradient_checkpointing=False)
    codes = {p: (m.base.weight_packed.clone(), m.base.weight_absmax.clone()) for p, m in lora_layers(model).items()}
    merge_qlora(model, requantize=True)
    for path, (packed, absmax) in codes.items():
        layer = model.get_submodule(path)
        assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_absmax, absmax)


def test_the_16bit_merge_takes_a_dtype():
    model = trained_qlora()
    W = {p: merged_weight(m, "default") for p, m in lora_layers(model).items()}
    merge_qlora(model, dtype=torch.bfloat16)
    assert all(torch.equal(model.get_submodule(p).weight, w.bfloat16()) for p, w in W.items())


def merged_twice():
    model = trained_qlora(steps=1)
    return merge_qlora(model)


@pytest.mark.parametrize("make, kwargs, error, match", [
    (lambda: tiny_llama(0), {}, ValueError, "no LoRA layer on a 4-bit base"),
    (lambda: add_lora(tiny_llama(0), "all-linear", r=4), {}, ValueError, "wrap Linear: use merge_lora"),
    (merged_twice, {}, ValueError, "merged already"),
    (lambda: trained_qlora(steps=1), {"adapter_name": "other"}, ValueError, "unknown adapter_name 'other'"),
    (lambda: trained_qlora(steps=1), {"requantize": 1}, ValueError, "requantize"),
    (lambda: trained_qlora(steps=1), {"dtype": torch.int8}, ValueError, "dtype must be one of"),
    (lambda: add_lora(add_qlora(tiny_llama(0), r=4, gradient_checkpointing=False), ["lm_head"], r=2,
                      adapter_name="default"), {}, ValueError, "merge those with merge_lora"),
    (lambda: "model", {}, TypeError, "model"),
])
def test_merge_qlora_bad_input_changes_nothing(make, kwargs, error, match):
    model = make()
    before = snapshot(model) if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=match):
        merge_qlora(model, **kwargs)
    if before is not None:
        assert_same(snapshot(model), before)


# ---- the merge experiment (notebook 07 §4): the variants, their logits, the whole run on the tiny model ----------

from lorabook.experiments import qlora_merge  # noqa: E402
from lorabook.quant import set_compute_dtype  # noqa: E402


def test_merge_variants_and_their_logits():
    model = trained_qlora(compute_dtype=torch.bfloat16)
    base = tiny_llama(0)  # the fp32 weights trained_qlora quantized
    before = snapshot(model), snapshot(base)
    models = qlora_merge.variants(model, base)
    assert list(models) == list(qlora_merge.VARIANTS) and models["unmerged"] is model
    assert_same(snapshot(model), before[0]) and assert_same(snapshot(base), before[1])  # neither is changed
    ids = ids_for(model, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, :5] = -100  # a prompt of five tokens: not scored
    reference = set_compute_dtype(copy.deepcopy(model), torch.float32)
    result = qlora_merge.compare_logits(models, reference, batch)
    assert result["merged"]["max_abs"] < 1e-4 and result["merged"]["same_top1"] == 1.0  # dequant(W4) + ΔW: exact
    assert 0 < result["unmerged"]["max_abs"] < result["no adapter"]["max_abs"]  # bf16 rounding only
    assert result["requantized"]["rel_norm"] > result["merged"]["rel_norm"] * 10  # NF4 rounds W' + ΔW again
    assert result["wrong"]["rel_norm"] > result["merged"]["rel_norm"] * 10  # W + ΔW is not W' + ΔW
    assert all(0 <= r["same_top1"] <= 1 for r in result.values())


def test_set_compute_dtype():
    model = quantize_model(tiny_llama(0), compute_dtype=torch.bfloat16)
    assert set_compute_dtype(model, torch.float32) is model
    assert {m.compute_dtype for m in model.modules() if isinstance(m, LinearNF4)} == {torch.float32}
    with pytest.raises(ValueError, match="dtype must be one of"):
        set_compute_dtype(model, torch.int8)
    with pytest.raises(ValueError, match="no LinearNF4 layer"):
        set_compute_dtype(tiny_llama(0), torch.float32)
    with pytest.raises(TypeError, match="model"):
        set_compute_dtype("model", torch.float32)


def test_merge_experiment_on_the_tiny_model():
    result = qlora_merge.merge(n=2, n_logits=2, steps=1, model_name="tiny")
    assert list(result["eval"]) == list(qlora_merge.VARIANTS) and result["eval_n"] == 2
    assert all(len(e["predictions"]) == 2 and 0 <= e["same_as_unmerged"] <= 2 for e in result["eval"].values())
    assert result["eval"]["unmerged"]["same_as_unmerged"] == 2 and result["logits"]["answer_tokens"] > 0
    assert result["logits"]["by_variant"]["merged"]["max_abs"] < 1e-3


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "n"), ({"n_logits": 0}, "n_logits"), ({"threads": 0}, "threads")])
def test_merge_experiment_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qlora_merge.merge(model_name="tiny", **kwargs)


def test_merge_cli_dry_run(capsys):
    import argparse
    args = argparse.Namespace(tables=["merge", "qlora"], dry_run=True)
    assert qlora_merge.cli(args) is False and args.tables == ["qlora"]
    assert "qlora_merge.json" in capsys.readouterr().out


def test_requantization_stats():
    model = trained_qlora()
    stats = qlora_merge.requantization_stats(model)
    assert 0 < stats["codes_changed"] < 1 and stats["error"] > 0 and stats["kept"] < 1
    requantized = merge_qlora(copy.deepcopy(model), requantize=True)  # the same NF4(W' + ΔW) as the stats use
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    again = requantized.get_submodule("model.layers.0.self_attn.q_proj")
    w = merged_weight(layer, "default")
    assert torch.equal(again.quantized.packed, quantize_4bit(w, double_quant=True).packed)
    with pytest.raises(ValueError, match="no active LoRA adapter"):
        qlora_merge.requantization_stats(add_qlora(tiny_llama(0), r=4, gradient_checkpointing=False))
