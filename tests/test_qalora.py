"""QA-LoRA: the pooled adapter, its exact merge into the zero points (same codes, same scales), peft's scaling,
the model-level calls, the adapter on disk, the training method, bad input."""
import json
import types

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from conftest import assert_same, snapshot
from lorabook import qalora
from lorabook.lora import LoRALinear
from lorabook.models import tiny_llama
from lorabook.qalora import QALoRALinear, add_qalora, group_pool, merge_qalora
from lorabook.quant.groupwise import LinearGroupwise, dequantize_groupwise_reference


def trained(layer: QALoRALinear, seed: int = 0) -> QALoRALinear:
    """The layer with a random non-zero B, as after some training."""
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return layer


def tiny_qalora(group_size=16, bits=4, r=2, **kwargs):
    """The tiny Llama (d_model 64, d_ff 128) in QA-LoRA: groups of 16 leave 4 groups on most layers, so r <= 4."""
    torch.manual_seed(0)
    return add_qalora(tiny_llama(seed=0), bits=bits, group_size=group_size, r=r, **kwargs)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_the_adapter_sees_pooled_groups_and_starts_at_the_base(pool):
    linear = nn.Linear(64, 24)
    layer = QALoRALinear.from_linear(linear, bits=4, group_size=16, r=4, alpha=8, pool=pool)
    assert layer.lora_A.shape == (4, 64 // 16) and layer.lora_B.shape == (24, 4) and not layer.lora_B.any()
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: exactly the quantized base
    trained(layer)
    expected = layer.base(x) + 2.0 * (group_pool(x, 16, pool) @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    pooled = x[..., 16:32].sum(-1) if pool == "sum" else x[..., 16:32].mean(-1)
    assert torch.equal(group_pool(x, 16, pool)[..., 1], pooled)


def test_only_the_adapter_trains():
    layer = trained(QALoRALinear.from_linear(nn.Linear(64, 24), group_size=16, r=4))
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0 and x.grad is not None


def test_delta_weight_is_constant_inside_each_group():
    torch.manual_seed(0)
    layer = trained(QALoRALinear.from_linear(nn.Linear(64, 24), group_size=16, r=4))
    delta = layer.delta_weight().reshape(24, 4, 16)
    assert torch.equal(delta, delta[..., :1].expand_as(delta))
    x = torch.randn(7, 64)
    W = dequantize_groupwise_reference(layer.base.quantized) + layer.delta_weight()
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias, rtol=1e-5, atol=1e-5)  # two summation orders


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group_size=st.sampled_from([8, 16, 32]), r=st.integers(1, 4),
       alpha=st.floats(0.5, 64), seed=st.integers(0, 999), pool=st.sampled_from(["sum", "mean"]))
def test_merge_keeps_codes_and_scales_and_gives_the_same_outputs(bits, group_size, r, alpha, seed, pool):
    torch.manual_seed(seed)
    layer = QALoRALinear.from_linear(nn.Linear(128, 40), bits, group_size, r, alpha, pool=pool)  # G >= 4 >= r
    trained(layer, seed)
    if pool == "sum":  # the same update size as the mean's (L times larger inputs)
        with torch.no_grad():
            layer.lora_B.div_(group_size)
    merged = layer.merge()
    assert isinstance(merged, LinearGroupwise) and merged.bits == bits and merged.group_size == group_size
    assert torch.equal(merged.qweight, layer.qweight) and torch.equal(merged.scales, layer.scales)
    assert merged.zeros.dtype == torch.float32 and not torch.equal(merged.zeros, layer.zeros)
    x = torch.randn(6, 128)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-4, atol=1e-5)  # the same function, now exactly INT-k
    torch.testing.assert_close(merged.zeros, layer.zeros - layer.delta_zeros(), rtol=0, atol=0)


def test_merge_leaves_the_layer_as_it_was():
    layer = trained(QALoRALinear.from_linear(nn.Linear(64, 24), group_size=16, r=4))
    before = snapshot(layer)
    layer.merge()
    assert_same(snapshot(layer), before)


@pytest.mark.parametrize("pool, factor", [("sum", 16 / 4), ("mean", 1 / 4)])
def test_peft_scales_the_group_mean_by_the_number_of_groups(pool, factor):
    """peft's QA-LoRA forward (its variant's own function) with A_peft = A · c / G computes this layer's update
    (c = L for the sum, 1 for the mean; here L = 16, G = 4)."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    layer = trained(QALoRALinear.from_linear(nn.Linear(64, 24), group_size=16, r=4, alpha=8, pool=pool))
    groups = 64 // 16
    module = types.SimpleNamespace(
        lora_A={"a": nn.Linear(groups, 4, bias=False)}, lora_B={"a": nn.Linear(4, 24, bias=False)},
        lora_dropout={"a": nn.Identity()}, scaling={"a": layer.scaling}, qalora_group_size={"a": 16},
        in_features=64, training=False)
    with torch.no_grad():
        module.lora_A["a"].weight.copy_(layer.lora_A * factor)
        module.lora_B["a"].weight.copy_(layer.lora_B)
    x = torch.randn(3, 5, 64)
    base = layer.base(x)
    torch.testing.assert_close(QALoraLinearVariant.forward(module, "a", x, base), layer(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the model

def test_add_qalora_then_merge_qalora_on_a_model():
    model = tiny_qalora(r=4)
    layers = qalora.qalora_layers(model)
    assert len(layers) == 2 * 7 and "lm_head" not in layers  # every linear of both layers, not the head
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (m.in_features // 16 + m.out_features) for m in layers.values())
    for m in layers.values():
        trained(m)
    model.eval()
    ids = torch.randint(0, 256, (2, 12))
    before = model(ids).logits
    merge_qalora(model)
    assert not qalora.qalora_layers(model)
    assert sum(isinstance(m, LinearGroupwise) for m in model.modules()) == 14
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_a_train_step_moves_only_a_and_b():
    model = tiny_qalora(r=4)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 12))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) != ("lora_" in n), n


def test_save_and_load_the_adapter(tmp_path):
    model = tiny_qalora(r=4)
    for m in qalora.qalora_layers(model).values():
        trained(m)
    qalora.save_qalora_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 16 and config["r"] == 4
    ids = torch.randint(0, 256, (1, 9))
    for pool in ("sum", "mean"):  # the file holds peft's A: either convention loads it as the same model
        other = tiny_qalora(r=4, pool=pool)
        qalora.load_qalora_adapter(other, tmp_path / "ad")
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_train_cli_has_a_qalora_method(capsys):
    from lorabook.train import __main__ as train_cli

    result = train_cli.main(["--model", "tiny", "--method", "qalora", "--targets", "all-linear", "--rank", "4",
                             "--group-size", "16", "--bits", "4", "--steps", "3", "--batch-size", "2",
                             "--max-len", "400", "--eval-n", "1", "--max-new-tokens", "2", "--no-before",
                             "--no-progress", "--lr", "1e-2"])
    assert len(result["loss_curve"]) == 3 and "qalora on tiny" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=48), "group_size must be a power of two >= 8, got 48"),
    (dict(group_size=128), "in_features 64 is not divisible by group_size 128"),
    (dict(bits=5), r"bits must be one of \[2, 3, 4, 8\], got 5"), (dict(bits=1), "bits must be one of"),
    (dict(r=0), "r must be"), (dict(dropout=1.5), "dropout must be"),
    (dict(r=8), r"q_proj: r=8 exceeds min\(groups, out_features\)=4: A is \(r, in_features / group_size\)"),
    (dict(target_modules=["nope"]), "matches no nn.Linear"), (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(pool="max"), r"pool must be one of \['sum', 'mean'\], got 'max'"),
])
def test_bad_add_qalora_arguments_change_nothing(kwargs, match):
    model = tiny_llama(seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        add_qalora(model, **{"group_size": 16, **kwargs})
    assert_same(snapshot(model), before)


def test_a_bad_weight_changes_nothing():
    from conftest import poison_last_linear

    model = tiny_llama(seed=0)
    name = poison_last_linear(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{name}.weight: weight has NaN or Inf"):
        add_qalora(model, group_size=16, r=2)
    assert_same(snapshot(model), before)


def test_merging_twice_or_without_an_adapter_is_refused():
    model = tiny_qalora()
    merge_qalora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model has no QALoRALinear layers: add_qalora first .or it is merged"):
        merge_qalora(model)
    assert_same(snapshot(model), before)
    with pytest.raises(ValueError, match="model has no QALoRALinear layers"):
        merge_qalora(tiny_llama(seed=0))
    plain = LoRALinear(LinearGroupwise.from_linear(nn.Linear(64, 8), group_size=16))  # plain LoRA on INT4
    with pytest.raises(ValueError, match="no exact group-wise INT-k form"):
        plain.merge()


def test_an_adapter_for_another_group_size_is_refused(tmp_path):
    model = tiny_qalora(group_size=16, r=2)
    qalora.save_qalora_adapter(model, tmp_path / "ad")
    other = tiny_qalora(group_size=32, r=2)
    before = snapshot(other)
    with pytest.raises(ValueError, match="trained on a base quantized in groups of 16; this model's QA-LoRA layers "
                                         r"use groups of \[32\]"):
        qalora.load_qalora_adapter(other, tmp_path / "ad")
    assert_same(snapshot(other), before)


def test_bad_adapter_folders_are_refused(tmp_path):
    from lorabook.lora import add_lora, load_adapter, save_adapter

    model = tiny_qalora(r=4)
    qalora.save_qalora_adapter(model, tmp_path / "qa")
    with pytest.raises(ValueError, match="is a QA-LoRA adapter .use_qalora: true.: load it with"):
        load_adapter(add_lora(tiny_llama(seed=0)), tmp_path / "qa")  # the LoRA loader says where it goes
    save_adapter(add_lora(tiny_llama(seed=0)), tmp_path / "plain")
    before = snapshot(model)
    with pytest.raises(ValueError, match="is not a QA-LoRA adapter: it needs use_qalora: true"):
        qalora.load_qalora_adapter(model, tmp_path / "plain")
    other_r = tiny_qalora(r=3)
    with pytest.raises(ValueError, match="adapter has r=4"):
        qalora.load_qalora_adapter(other_r, tmp_path / "qa")
    assert_same(snapshot(model), before)
    with pytest.raises(ValueError, match="nothing to save"):
        qalora.save_qalora_adapter(tiny_llama(seed=0), tmp_path / "none")


TINY_CLI = ["--model", "tiny", "--targets", "all-linear", "--rank", "2", "--steps", "2", "--batch-size", "2",
            "--max-len", "400", "--eval-n", "2", "--max-new-tokens", "4", "--no-before", "--no-progress",
            "--lr", "1e-2"]


def test_the_cli_scores_the_merged_model():
    from lorabook.train import __main__ as train_cli

    qa = ["--method", "qalora", "--group-size", "16"]
    unmerged, merged = train_cli.main(TINY_CLI + qa), train_cli.main(TINY_CLI + qa + ["--merge"])
    assert merged["merge"] == "merge_qalora" and "merge" not in unmerged
    assert [p["after"] for p in merged["predictions"]] == [p["after"] for p in unmerged["predictions"]]
    n = sum(64 * 64 + 64 * 32 * 2 + 64 * 64 + 2 * 64 * 128 + 128 * 64 for _ in range(2))  # tiny: weights of 2 layers
    assert merged["linear_bytes"] == n // 2 + 6 * n // 16  # INT4 codes + an fp16 scale and fp32 zero per 16
    ptq = train_cli.main(TINY_CLI + ["--method", "lora", "--merge", "--ptq-bits", "3", "--ptq-group-size", "16"])
    assert ptq["merge"] == "merge_lora, then round to nearest INT3 in groups of 16"
    assert ptq["linear_bytes"] == 3 * n // 8 + 6 * n // 16
    nf4 = train_cli.main(TINY_CLI + ["--method", "qlora", "--merge", "--ptq-nf4"])
    assert nf4["merge"] == "merge_qlora (into dequant(W4)), then quantized to NF4 again (requantize=True)"
    assert nf4["linear_bytes"] < n * 0.6  # 4-bit codes and block constants


@pytest.mark.parametrize("extra, match", [
    (["--method", "lora", "--ptq-bits", "4"], "--ptq-bits / --ptq-nf4 quantize the merged model: add --merge"),
    (["--method", "lora", "--merge", "--ptq-nf4"], "ptq_nf4 re-quantizes a merged QLoRA model to NF4"),
    (["--method", "bitfit", "--merge"], r"method \(to merge\) must be one of \['lora', 'qlora', 'qalora'\]"),
    (["--method", "qalora", "--group-size", "16", "--merge", "--ptq-bits", "4"], "is group-wise INT-k already"),
    (["--method", "lora", "--merge", "--ptq-bits", "4", "--ptq-group-size", "128"],
     "ptq_group_size: model.layers.0.self_attn.q_proj: in_features 64 is not divisible by group_size 128"),
    (["--method", "lora", "--merge", "--ptq-bits", "5"], r"bits must be one of \[2, 3, 4, 8\], got 5"),
])
def test_bad_merge_settings_are_refused_before_training(extra, match, monkeypatch):
    from lorabook.train import __main__ as train_cli

    monkeypatch.setattr(train_cli, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=match):
        train_cli.main(TINY_CLI + extra)

