"""PEFT-format adapters: what lorabook writes, interop with peft both ways, and loads that must fail cleanly."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lorabook.lora import peft_format as lora_io
from lorabook.lora import add_lora, adapter_names, lora_layers, merge_lora, set_adapter
from lorabook.lora import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lorabook.models import tiny_llama
from conftest import assert_same, snapshot
from test_lora import randomize_B, tiny_gpt2

peft = pytest.importorskip("peft")
X = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X).logits


def saved(tmp_path, model=None, name="ad", **kw):
    model = model or randomize_B(add_lora(tiny_llama(0), ["q_proj", "v_proj"], r=4, alpha=8, **kw))
    return model, save_adapter(model, tmp_path / name)


def test_writes_peft_config_and_keys(tmp_path):
    _, d = saved(tmp_path)
    assert sorted(os.listdir(d)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    config = json.loads((d / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout",
                                   "bias", "use_rslora", "fan_in_fan_out", "inference_mode", "rank_pattern")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "fan_in_fan_out": False, "inference_mode": True, "rank_pattern": {}}
    tensors = load_file(d / WEIGHTS_NAME)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 2 * 2


def test_a_subset_of_layers_is_saved_as_an_exact_regex(tmp_path):
    model = randomize_B(add_lora(tiny_llama(0), r"model\.layers\.1\.self_attn\.q_proj", r=2))
    config = json.loads((save_adapter(model, tmp_path / "a") / CONFIG_NAME).read_text())
    assert config["target_modules"] == r"(model\.layers\.1\.self_attn\.q_proj)"
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    assert (logits(peft_model) - logits(model)).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(use_rslora=True), dict(dropout=0.1)])
def test_lorabook_adapter_loads_in_peft_with_the_same_logits(tmp_path, kw):
    model, d = saved(tmp_path, **kw)
    model.eval()
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0), d)
    assert (logits(peft_model) - logits(tiny_llama(0))).abs().max() > 1e-2  # B is not zero: a real test
    assert (logits(peft_model) - logits(model)).abs().max() <= 1e-5


def test_peft_adapter_loads_in_lorabook_with_the_same_logits(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                             rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(0), config)
    peft_model.save_pretrained(tmp_path / "p")
    model = load_adapter(tiny_llama(0), tmp_path / "p")
    assert len(lora_layers(model)) == 14 and lora_layers(model)["model.layers.0.self_attn.o_proj"].r == {"default": 2}
    assert (logits(model) - logits(peft_model)).abs().max() <= 1e-5
    # and back: lorabook re-saves the rank / alpha patterns so peft reads the same adapter
    again = peft.PeftModel.from_pretrained(tiny_llama(0), save_adapter(model, tmp_path / "again"))
    assert (logits(again) - logits(peft_model)).abs().max() <= 1e-5


def test_peft_rslora_adapter(tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(0), config)
    peft_model.save_pretrained(tmp_path / "p")
    model = load_adapter(tiny_llama(0), tmp_path / "p", adapter_name="k")
    assert adapter_names(model) == ["k"]
    assert (logits(model) - logits(peft_model)).abs().max() <= 1e-5


def test_gpt2_conv1d_both_ways(tmp_path):
    model = randomize_B(add_lora(tiny_gpt2(), "all-linear", r=4, alpha=8))
    d = save_adapter(model, tmp_path / "g")
    assert json.loads((d / CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), d)
    assert (logits(peft_model) - logits(model)).abs().max() <= 1e-5
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_gpt2(), config)
    peft_model.save_pretrained(tmp_path / "p")
    model = load_adapter(tiny_gpt2(), tmp_path / "p")
    assert (logits(model) - logits(peft_model)).abs().max() <= 1e-5


def test_round_trip_second_adapter_and_overwrite(tmp_path):
    model, d = saved(tmp_path)
    other = add_lora(tiny_llama(0), ["q_proj", "v_proj"], r=4, alpha=8)  # same layers, B = 0
    load_adapter(other, d)  # overwrites "default"
    assert torch.equal(logits(other), logits(model))
    load_adapter(other, d, adapter_name="backup")
    assert adapter_names(other) == ["default", "backup"]
    set_adapter(other, "backup")
    assert torch.equal(logits(other), logits(model))


def test_load_next_to_a_merged_adapter(tmp_path):
    model, d = saved(tmp_path)
    merge_lora(model)
    before = logits(model)
    load_adapter(model, d, adapter_name="second")  # the merged one stays active
    assert torch.equal(logits(model), before)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(model, d, adapter_name="default")


def fail_at(point, monkeypatch):
    """Make the next save_adapter fail at ``point``: while writing the weights, the config, carrying the folder's
    other files over, or swapping the new folder in."""
    import pathlib
    import safetensors.torch
    from lorabook import _io

    def crash(*args, **kwargs):
        if point in ("weights", "config"):  # half a file first, as a full disk would leave
            with open(args[1] if point == "weights" else args[0], "wb") as f:
                f.write(b"half a fi")
        raise OSError(f"disk full at {point}")
    target = {"weights": (safetensors.torch, "save_file"), "config": (pathlib.Path, "write_text"),
              "keeping the README": (_io, "_link_or_copy"), "swap": (_io, "_swap_in")}[point]
    monkeypatch.setattr(*target, crash)


@pytest.mark.parametrize("point", ["weights", "config", "keeping the README", "swap"])
def test_a_failed_save_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch, point):
    rank4, d = saved(tmp_path)
    (d / "README.md").write_text("my adapter\n")
    rank8 = randomize_B(add_lora(tiny_llama(0), ["q_proj", "v_proj"], r=8, alpha=8), seed=5)
    fail_at(point, monkeypatch)
    with pytest.raises(OSError, match=f"disk full at {point}"):
        save_adapter(rank8, d)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ad"]  # no temp folder or file beside it
    assert sorted(os.listdir(d)) == sorted([CONFIG_NAME, "README.md", WEIGHTS_NAME])
    loaded = load_adapter(tiny_llama(0), d)
    assert {m.r["default"] for m in lora_layers(loaded).values()} == {4}
    assert torch.equal(logits(loaded), logits(rank4)) and (d / "README.md").read_text() == "my adapter\n"
    save_adapter(rank8, d)  # the same save, not failing: rank 8, the README kept
    assert torch.equal(logits(load_adapter(tiny_llama(0), d)), logits(rank8))
    assert (d / "README.md").read_text() == "my adapter\n" and os.listdir(tmp_path) == ["ad"]


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_llama(0), tmp_path / "a")
    with pytest.raises(ValueError, match=r"unknown adapter_name 'x'.*\['default'\]"):
        save_adapter(add_lora(tiny_llama(0), ["q_proj"], r=2), tmp_path / "a", adapter_name="x")


# ---- loads that must fail, leaving the model exactly as it was ---------------------------------------------

def rewrite_tensors(d, fn):
    tensors = load_file(d / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, d / WEIGHTS_NAME)


def rewrite_config(d, **changes):
    config = json.loads((d / CONFIG_NAME).read_text())
    config.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(config))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def truncate(d):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


BAD = {
    "truncated": (truncate, f"{WEIGHTS_NAME} could not be read: truncated or corrupt"),
    "corrupt": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00" * 64), f"{WEIGHTS_NAME} could not be read"),
    "no weights": (lambda d: (d / WEIGHTS_NAME).rename(d / "adapter_model.bin"), "only safetensors"),
    "no config": (lambda d: (d / CONFIG_NAME).unlink(), "no adapter_config.json"),
    "bad json": (lambda d: (d / CONFIG_NAME).write_text("{"), f"{CONFIG_NAME} is not valid JSON"),
    "config not utf-8": (lambda d: (d / CONFIG_NAME).write_bytes(b'{"peft_type": "LORA\xff"}'),
                         f"{CONFIG_NAME} is not valid UTF-8"),
    "not lora": (lambda d: rewrite_config(d, peft_type="IA3"), "peft_type must be 'LORA'"),
    "dora": (lambda d: rewrite_config(d, use_dora=True, bias="all"), "use_dora=True, bias='all'"),
    "pissa": (lambda d: rewrite_config(d, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "bad pattern": (lambda d: rewrite_config(d, rank_pattern={"q_proj(": 2}), "not a valid regex"),
    "pattern type": (lambda d: rewrite_config(d, alpha_pattern=[1]), "alpha_pattern must be a dict"),
    "config rank": (lambda d: rewrite_config(d, r=8), r"q_proj.lora_A.weight has shape \(4, 64\), expected \(8, 64\)"),
    "bad alpha": (lambda d: rewrite_config(d, lora_alpha=0), "alpha must be"),
    "targets nothing": (lambda d: rewrite_config(d, target_modules=["c_attn"]), "matches no nn.Linear"),
    "missing keys": (lambda d: rewrite_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")),
                     f"missing keys: {Q0}.lora_B.weight"),
    "unexpected keys": (lambda d: rewrite_tensors(d, lambda t: t.update(
        {f"{Q0}.lora_C.weight": torch.zeros(2), "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight":
         torch.zeros(4, 64)})), r"unexpected keys: .*lora_C.weight.*k_proj.lora_A.weight"),
    "wrong shape": (lambda d: rewrite_tensors(d, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(63, 4)})),
                    r"expected \(64, 4\)"),
    "nan": (lambda d: rewrite_tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].fill_(float("nan"))), "not finite"),
}


def assert_refused_and_unchanged(model, folder, match, **kwargs):
    """load_adapter raises a ValueError matching ``match`` and leaves every weight and module of ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, folder, **kwargs)
    assert_same(snapshot(model), before)


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("start", ["plain", "with an adapter"])
def test_bad_folder_is_a_clear_error_and_changes_nothing(tmp_path, case, start):
    _, d = saved(tmp_path)
    damage, message = BAD[case]
    damage(d)
    model = tiny_llama(0) if start == "plain" else add_lora(tiny_llama(0), ["q_proj"], r=2, adapter_name="x")
    assert_refused_and_unchanged(model, d, message, adapter_name="new")


def test_wrong_architecture(tmp_path):
    _, d = saved(tmp_path, model=randomize_B(add_lora(tiny_gpt2(), ["c_attn"], r=2)))
    assert_refused_and_unchanged(tiny_llama(0), d,
                                 r"keys for 2 layers this model does not have.*transformer.h.0.attn.c_attn")


def test_wrong_width(tmp_path):
    _, d = saved(tmp_path)
    assert_refused_and_unchanged(tiny_llama(0, d_model=32, n_heads=4), d, r"expected \(4, 32\)")


def test_existing_adapter_with_another_rank_or_layers(tmp_path):
    _, d = saved(tmp_path)
    for model in (add_lora(tiny_llama(0), ["q_proj", "v_proj"], r=2), add_lora(tiny_llama(0), ["q_proj"], r=4)):
        assert_refused_and_unchanged(model, d, "has r=2, the file r=4|exists on other layers")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(tiny_llama(0), tmp_path / "nowhere")
    for bad in ("", "copy", "a.b"):
        with pytest.raises(ValueError, match="adapter_name"):
            load_adapter(tiny_llama(0), tmp_path, adapter_name=bad)
    assert lora_io.WEIGHTS_NAME == "adapter_model.safetensors" and isinstance(tiny_llama(0).lm_head, nn.Linear)


def test_lora_benchmarks_quick_run():
    """The benchmarks (lorabook.bench.lora) run and report what they promise; times are not asserted."""
    from lorabook import bench
    from lorabook.bench import lora as lora_bench

    assert bench.BENCHMARKS["lora-latency"] is lora_bench.lora_latency
    threads = torch.get_num_threads()
    latency = lora_bench.lora_latency(quick=True)
    assert torch.get_num_threads() == threads  # the 1-thread timing context restores the setting
    assert [r["peer"] for r in latency[:3]] == ["base", "base", f"peft {peft.__version__}"]
    assert latency[0]["goal"] == "<= 1.01" and latency[2]["max_abs_logit_diff"] <= 1e-5
    assert latency[3]["peer"] == "lorabook reference forward" and latency[3]["max_abs_logit_diff"] <= 1e-5
    assert all(r["lorabook"] > 0 and r["peer_value"] > 0 for r in latency)
    step = lora_bench.lora_step(quick=True)
    assert [(r["metric"], r["peer"].split()[0]) for r in step] == [
        ("seconds", "peft"), ("seconds", "full"), ("bytes", "peft"), ("bytes", "full")]
    assert step[2]["ratio"] == 1.0 and step[3]["ratio"] < 1  # same saved tensors as peft; less than full FT
