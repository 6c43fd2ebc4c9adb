"""torch.distributed: two gloo processes under torchrun train exactly like one process with the same global batch.

The trap (transformers #34191): with gradient accumulation, normalising each rank's loss by its own token count
weights the ranks' answers unequally; ``lorabook.train`` divides by the global step's tokens, so the curves agree.
DDP keeps a whole replica per rank and all-reduces the trainable gradients; FSDP2 keeps 1/N of everything and
all-gathers the parameters (the frozen base too) every micro-batch: both are checked here, and what they store and send.
"""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lorabook import train as T
from lorabook.models import byte_tokenizer, tiny_llama
from lorabook.train import __main__ as train_cli

from conftest import assert_same, snapshot

ARGS = ["--model", "tiny", "--method", "lora", "--steps", "3", "--batch-size", "4", "--grad-accum", "2",
        "--max-len", "512", "--eval-n", "1", "--max-new-tokens", "2", "--no-before", "--no-progress",
        "--warmup", "0", "--lr", "1e-2", "--threads", "1"]


def torchrun(args: list[str], tmp_path, name: str) -> dict:
    """``python -m lorabook.train *args`` as 2 gloo processes; its results JSON (checkpoint in tmp_path/name)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = T.torchrun_command(2, [*args, "--out", tmp_path / name, "--results", tmp_path / f"{name}.json"])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def one_process(args: list[str], tmp_path, name: str = "one") -> dict:
    return train_cli.main([*args, "--out", str(tmp_path / name), "--results", str(tmp_path / f"{name}.json")])


def checkpoint_params(tmp_path, name: str) -> dict:
    return {k: v for k, v in load_file(str(tmp_path / name / T.CKPT_NAME)).items() if k.startswith("param.")}


METHODS = {"lora": [], "qlora": ["--method", "qlora", "--targets", "all-linear", "--rank", "4",
                                 "--optimizer", "paged_adamw"],  # NF4 base, paged AdamW
           "qalora": ["--method", "qalora", "--targets", "all-linear", "--rank", "2", "--bits", "4",
                      "--group-size", "16"]}  # INT4 base in groups of 16, fp32 compute
# fp32 lora agrees to 1e-6; qlora computes in bf16, and a rank pads its half-batch to its own longest example, so
# an activation now and then rounds to the neighbouring bf16 value (measured: 8e-6 on the loss)
TOLERANCE = {"full": 1e-6, "lora": 1e-6, "qlora": 5e-5, "qalora": 1e-6}


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_processes_train_like_one(tmp_path, capsys, method):
    args = ARGS + METHODS[method]
    one, two = one_process(args, tmp_path), torchrun(args, tmp_path, "two")
    assert len(two["loss_curve"]) == 3 and min(two["loss_curve"]) > 1  # answer tokens were scored
    # same global batch, same curve: each rank dividing by its own tokens is off by 3e-4 here
    assert max(abs(a - b) for a, b in zip(one["loss_curve"], two["loss_curve"])) <= TOLERANCE[method]
    # on the wire: the trainable gradients, all-reduced once a step (ring: each rank sends 2 (N-1)/N of them)
    trainable = 4 * two["trainable_params"]  # fp32 adapters
    assert two["wire_bytes_per_step"] == [T.ring_bytes("ddp", 2, trainable)] * 3 == [trainable] * 3
    assert two["stored_bytes"][0]["grads"] == one["stored_bytes"][0]["grads"]  # a whole replica per rank
    w1, w2 = checkpoint_params(tmp_path, "one"), checkpoint_params(tmp_path, "two")
    adapters = list(w1)
    assert adapters and set(adapters) == set(w2)
    if method == "lora":  # the final adapter, and AdamW's moments, are the one-process ones, to fp32 rounding
        # (the two ranks' gradients are summed in another order; Adam divides by √v, which magnifies that for an
        # element whose gradient is small: measured up to 1.2e-6 on an AMD EPYC, 3 steps of lr 1e-2)
        for k in adapters:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=5e-6, msg=lambda m, k=k: f"{k}: {m}")
    else:
        assert_adam_close(w1, w2, TOLERANCE[method])


def assert_adam_close(w1: dict, w2: dict, tol: float) -> None:
    """Equal but for the odd element: Adam moves an element whose gradient is ~0 by up to lr a step, whatever the
    sign of that ~0, so a rounding difference there shows as up to lr per step."""
    diff = torch.cat([(w2[k].float() - w1[k].float()).abs().flatten() for k in w1])
    size = torch.cat([w1[k].float().abs().flatten() for k in w1])
    off = diff > tol + 1e-5 * size
    assert off.float().mean() <= 0.01, f"{int(off.sum())} of {off.numel()} trained elements differ"
    assert diff.max() <= 3 * 1e-2  # at most 3 steps of lr


def tiny_lora():
    """A tiny Llama with LoRA on W_q, its tokenizer and its snapshot (what a refused call must leave as it was)."""
    model, tok = tiny_llama(seed=0, vocab_size=len(byte_tokenizer())), byte_tokenizer()
    T.prepare(model, "lora", target_modules=("q_proj",), r=2)
    return model, tok, snapshot(model)


def test_a_world_size_that_does_not_divide_the_batch_is_refused(monkeypatch):
    model, tok, before = tiny_lora()
    monkeypatch.setenv("WORLD_SIZE", "2")
    examples = [{"prompt": "a", "answer": "b"}] * 8
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by the world size 2"):
        T.train(model, examples, tok, steps=1, batch_size=3, progress=False)
    assert_same(snapshot(model), before)
    assert not torch.distributed.is_initialized()  # refused before the process group starts


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_world_size_in_the_environment_is_refused(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        T.world_size()


# ---- FSDP2 ------------------------------------------------------------------------------------------------

FSDP_METHODS = {"full": ["--method", "full"], **METHODS}


@pytest.mark.parametrize("method", FSDP_METHODS)
def test_fsdp_trains_like_one_process_and_each_rank_stores_half(tmp_path, capsys, method):
    args = ARGS + FSDP_METHODS[method]
    if method == "qlora":
        args = args[:-2] + ["--optimizer", "adamw"]  # FSDP: torch's AdamW (paged state is per whole tensor)
    if method == "qlora":  # one micro-batch a step, and torch's memory trackers on step 2 (one forward each)
        args += ["--grad-accum", "1", "--track-memory"]
    one, two = one_process(args, tmp_path), torchrun([*args, "--strategy", "fsdp"], tmp_path, "two")
    assert max(abs(a - b) for a, b in zip(one["loss_curve"], two["loss_curve"])) <= TOLERANCE[method]
    w1, w2 = checkpoint_params(tmp_path, "one"), checkpoint_params(tmp_path, "two")  # saved gathered whole
    assert w1 and set(w1) == set(w2)
    assert all(w2[k].shape == w1[k].shape for k in w1)
    assert_adam_close(w1, w2, TOLERANCE[method])  # full FT: 2 of 8192 elements of a layer, by 3e-5
    # what one rank stores: half the parameters, gradients and moments (shards of dim 0, the last one padded)
    mine, whole = two["stored_bytes"][0], one["stored_bytes"][0]
    for part in ("grads", "optimizer"):
        assert 0.5 <= mine[part] / whole[part] <= 0.51, (part, mine[part], whole[part])
    if method in ("qlora", "qalora"):  # the 4-bit codes are sharded too: they moved from buffers to parameters
        assert whole["buffers"] > 10 * mine["buffers"]
        assert 0.5 <= mine["params"] / (whole["params"] + whole["buffers"]) <= 0.51
    else:
        assert 0.5 <= mine["params"] / whole["params"] <= 0.51
    if method == "qlora":  # torch's trackers agree: FSDPMemTracker's sharded parameters are the local shards,
        peak_two, peak_one = two["peak_bytes"][0], one["peak_bytes"][0]  # MemTracker's (one process) the whole
        assert peak_two["Sharded Param"] == mine["params"] and peak_two["OptState"] == mine["optimizer"]
        assert peak_one["Parameter"] == whole["params"] and peak_one["Optstate"] == whole["optimizer"]
    # on the wire, per micro-batch: each decoder layer all-gathered for its forward and again for its backward,
    # the root unit (embeddings, norm) once; then the trainable gradients reduce-scattered once
    layers, root = unit_bytes(args)
    n_train, micro = two["trainable_params"], train_cli.parse_args(args).grad_accum
    expected = 0.5 * micro * (2 * layers + root) + 0.5 * 4 * n_train
    assert two["wire_bytes_per_step"] == pytest.approx([expected] * 3, rel=0.01)  # the last shard is padded
    formula = T.ring_bytes("fsdp", 2, 4 * n_train, layers + root, micro_batches=micro)  # the root twice too
    assert expected <= formula <= expected + 0.5 * micro * root
    assert expected > T.ring_bytes("ddp", 2, 4 * n_train)  # FSDP sends more than DDP


def unit_bytes(args: list[str]) -> tuple[int, int]:
    """Bytes of the decoder layers' and of the root unit's parameters (NF4 codes included) of the run's model."""
    from lorabook.train import fsdp
    cli = train_cli.parse_args(args)
    model, tok = T.load_model(cli.model, cli.seed)
    T.prepare(model, cli.method, **train_cli.method_kwargs(cli, tok))
    fsdp.quantized_storage_as_parameters(model)
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    layers = size(fsdp.decoder_layers(model).parameters())
    return layers, size(model.parameters()) - layers


def test_fsdp_resumes_where_it_stopped(tmp_path):
    """Stopped after step 2 and resumed under FSDP: the whole checkpoint is cut into shards again, and the run
    goes on exactly as the uninterrupted one (the loss curve and the final weights, bit for bit)."""
    args = ARGS + ["--strategy", "fsdp"]
    straight = torchrun(args, tmp_path, "straight")
    torchrun([*args, "--stop-after", "2"], tmp_path, "stopped")
    resumed = torchrun([*args, "--resume"], tmp_path, "stopped")
    assert resumed["loss_curve"] == straight["loss_curve"] and len(straight["loss_curve"]) == 3
    w1, w2 = checkpoint_params(tmp_path, "straight"), checkpoint_params(tmp_path, "stopped")
    assert w1 and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_quantized_storage_as_parameters_keeps_names_values_dtypes_and_outputs(one_thread, method):
    from lorabook import qalora, qlora
    from lorabook.train import fsdp
    model = tiny_llama(seed=0, vocab_size=len(byte_tokenizer()))
    if method == "qlora":
        qlora.add_qlora(model, r=2, dropout=0.0, gradient_checkpointing=False)
    else:
        qalora.add_qalora(model, bits=4, group_size=16, r=2)
    x = torch.randint(3, 200, (2, 9))
    before, logits = {k: v.clone() for k, v in model.state_dict().items()}, model(x).logits
    n_params = len(list(model.parameters()))
    moved = fsdp.quantized_storage_as_parameters(model)
    # 14 quantized layers: NF4 codes, absmax codes, absmax2 (double quant: no fp32 absmax); INT4 codes, scales, zeros
    assert moved == 3 * 14
    assert len(list(model.parameters())) == n_params + moved
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "weight_" in n)
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 14  # still only the adapters train
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(after[k].dtype == v.dtype for k, v in before.items())
    torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)
    model.to(torch.bfloat16)  # the quantized constants keep their dtype, and stay frozen parameters
    assert {k: v.dtype for k, v in model.state_dict().items() if k.endswith(("scales", "zeros", "absmax2"))} == \
        {k: v.dtype for k, v in before.items() if k.endswith(("scales", "zeros", "absmax2"))}
    assert len(list(model.parameters())) == n_params + moved


def test_track_memory_needs_one_micro_batch_a_step():
    model, tok, before = tiny_lora()
    with pytest.raises(ValueError, match="track_memory=True needs grad_accum=1"):
        T.train(model, [{"prompt": "a", "answer": "b"}] * 4, tok, steps=1, batch_size=2, grad_accum=2,
                track_memory=True, progress=False)
    assert_same(snapshot(model), before)


def test_what_fsdp_cannot_do_is_refused_before_anything_starts(monkeypatch):
    model, tok, before = tiny_lora()
    monkeypatch.setenv("WORLD_SIZE", "2")
    examples = [{"prompt": "a", "answer": "b"}] * 8
    fit = dict(steps=1, batch_size=2, progress=False, strategy="fsdp")
    with pytest.raises(ValueError, match="optimizer='adamw' only, got 'adamw8bit'"):
        T.train(model, examples, tok, optimizer="adamw8bit", **fit)
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    kept, lora_a.data = lora_a.data, torch.zeros(2, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="trainable parameters in one dtype"):
        T.train(model, examples, tok, **fit)
    lora_a.data = kept
    with pytest.raises(ValueError, match="strategy must be one of"):
        T.train(model, examples, tok, **{**fit, "strategy": "zero3"})
    assert_same(snapshot(model), before)
    assert not torch.distributed.is_initialized()


def test_a_model_without_decoder_layers_cannot_be_sharded():
    from lorabook.train import fsdp
    with pytest.raises(ValueError, match="no nn.ModuleList of decoder layers"):
        fsdp.check_shardable(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    scalar = torch.nn.Module()
    scalar.layers, scalar.gain = torch.nn.ModuleList([torch.nn.Linear(2, 2)]), torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match="0-d parameters.*gain"):
        fsdp.check_shardable(scalar)


def test_wire_formula_and_counter_refuse_bad_input():
    assert T.ring_bytes("ddp", 1, 40) == 0  # one process sends nothing
    assert T.ring_bytes("ddp", 4, 40, 1000) == 2 * 0.75 * 40  # DDP: the gradients only, once a step
    assert T.ring_bytes("fsdp", 4, 40, 200, micro_batches=3) == 2 * 3 * 0.75 * 200 + 0.75 * 40
    with pytest.raises(ValueError, match="strategy"):
        T.ring_bytes("zero", 2, 1)
    with pytest.raises(ValueError, match="micro_batches"):
        T.ring_bytes("fsdp", 2, 1, micro_batches=0)
    with pytest.raises(ValueError, match="grad_bytes"):
        T.ring_bytes("ddp", 2, -1)
    with pytest.raises(TypeError, match="net must be a DistributedDataParallel module or a fully_shard-ed model"):
        T.WireCounter(2).attach(torch.nn.Linear(2, 2))
