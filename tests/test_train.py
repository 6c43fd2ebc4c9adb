"""The training loop on tiny models: it learns, resume reproduces the loss curve bit for bit, grad accumulation
equals a big batch, the schedule, checkpoints, the CLI and bad input. Seconds in all."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import assert_same, snapshot
from lorabook import data, train as T
from lorabook.train import __main__ as train_cli
from lorabook.lora import add_lora
from lorabook.models import byte_tokenizer, tiny_llama

TOK = byte_tokenizer()
EXAMPLES = data.load_split("train", n=8)
SHORT = dict(max_len=400, progress=False, log_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lora(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed, vocab_size=len(TOK), max_seq_len=512)
    return add_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)


def test_loss_decreases_when_overfitting_a_few_examples():
    model = tiny_llama(seed=0, vocab_size=len(TOK), max_seq_len=512).requires_grad_(True)
    h = T.train(model, EXAMPLES[:4], TOK, steps=30, lr=1e-2, batch_size=4, warmup_steps=3, **SHORT)
    assert len(h.loss) == 30 and h.step == list(range(1, 31))
    assert h.loss[-1] < 0.5 * h.loss[0]
    assert h.tokens_per_s > 0 and h.wall_time_s > 0 and not model.training


def test_resume_reproduces_the_loss_curve_bit_for_bit(tmp_path):
    kw = dict(steps=6, lr=5e-3, batch_size=2, grad_accum=2, warmup_steps=2, weight_decay=0.1, **SHORT)
    straight = tiny_lora(dropout=0.1)  # dropout: the RNG state must come back too
    h1 = T.train(straight, EXAMPLES, TOK, checkpoint_dir=tmp_path / "a", **kw)

    stopped = tiny_lora(dropout=0.1)
    h2 = T.train(stopped, EXAMPLES, TOK, checkpoint_dir=tmp_path / "b", stop_after=3, **kw)
    assert h2.loss == h1.loss[:3]
    torch.manual_seed(123)  # a different process would start from another RNG state
    resumed = tiny_lora(dropout=0.1)  # fresh adapter: the checkpoint must overwrite it
    h3 = T.train(resumed, EXAMPLES, TOK, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert h3.loss == h1.loss and h3.lr == h1.lr and h3.step == list(range(1, 7))
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_with_a_stream_of_batches(tmp_path):
    batches = [data.collate(EXAMPLES[i:i + 2], TOK, 400) for i in range(0, 8, 2)]
    kw = dict(steps=5, lr=5e-3, **SHORT)
    h1 = T.train(tiny_lora(), batches, TOK, **kw)
    T.train(tiny_lora(), batches, TOK, checkpoint_dir=tmp_path, stop_after=2, **kw)
    h2 = T.train(tiny_lora(), batches, TOK, checkpoint_dir=tmp_path, resume=True, **kw)
    assert h2.loss == h1.loss


def test_paged_adamw_trains_bit_for_bit_like_adamw_and_resumes(tmp_path):
    kw = dict(steps=4, lr=5e-3, batch_size=2, weight_decay=0.1, **SHORT)
    plain, paged = tiny_lora(), tiny_lora()
    h1 = T.train(plain, EXAMPLES, TOK, **kw)
    h2 = T.train(paged, EXAMPLES, TOK, optimizer="paged_adamw", **kw)
    assert h2.loss == h1.loss and all(torch.equal(p, q) for p, q in zip(plain.parameters(), paged.parameters()))
    T.train(tiny_lora(), EXAMPLES, TOK, optimizer="paged_adamw", checkpoint_dir=tmp_path, stop_after=2, **kw)
    resumed = tiny_lora()
    h3 = T.train(resumed, EXAMPLES, TOK, optimizer="paged_adamw", checkpoint_dir=tmp_path, resume=True, **kw)
    assert h3.loss == h1.loss and all(torch.equal(p, q) for p, q in zip(plain.parameters(), resumed.parameters()))


def tiny_full(seed=0):
    """The tiny Llama, every weight trainable: its 256 x 64 embedding (16,384 elements) gets 8-bit AdamW state."""
    torch.manual_seed(seed)
    return tiny_llama(seed=seed, vocab_size=len(TOK), max_seq_len=512).requires_grad_(True)


@pytest.mark.parametrize("kind", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_trains_and_resumes_bit_for_bit(tmp_path, kind):
    kw = dict(steps=4, lr=5e-3, batch_size=2, **SHORT)
    straight = tiny_full()
    h1 = T.train(straight, EXAMPLES, TOK, optimizer=kind, **kw)
    plain = tiny_full()
    h0 = T.train(plain, EXAMPLES, TOK, **kw)  # 32-bit AdamW: 8-bit state rounds m and v, so the curves part a little
    assert h1.loss[0] == h0.loss[0] and h1.loss != h0.loss and abs(h1.loss[-1] - h0.loss[-1]) < 0.05 * h0.loss[-1]
    T.train(tiny_full(), EXAMPLES, TOK, optimizer=kind, checkpoint_dir=tmp_path, stop_after=2, **kw)
    with safe_open(str(tmp_path / T.CKPT_NAME), framework="pt") as f:
        nested = [k for k in f.keys() if ".__bnb_optimizer_quant_state__." in k]
    assert any(k.endswith(".state1") for k in nested) and any(k.endswith(".absmax1") for k in nested)
    resumed = tiny_full(seed=1)  # other weights: the checkpoint must overwrite them
    h3 = T.train(resumed, EXAMPLES, TOK, optimizer=kind, checkpoint_dir=tmp_path, resume=True, **kw)
    assert h3.loss == h1.loss and all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("key, value, match", [
    ("absmax1", lambda t: t[:-1], "absmax1 must be torch.float32 with"),
    ("state1", lambda t: t.float(), "state1 must be torch.uint8"),
])
def test_a_bad_8bit_checkpoint_is_refused_with_nothing_changed(tmp_path, key, value, match):
    from safetensors.torch import save_file
    from conftest import optimizer_snapshot

    kw = dict(steps=3, lr=5e-3, batch_size=2, **SHORT)
    T.train(tiny_full(), EXAMPLES, TOK, optimizer="adamw8bit", checkpoint_dir=tmp_path, stop_after=2, **kw)
    file = tmp_path / T.CKPT_NAME
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith(f".__bnb_optimizer_quant_state__.{key}"))
    tensors[name] = value(tensors[name]).contiguous()
    save_file(tensors, str(file), metadata=meta)
    model = tiny_full(seed=1)
    params = T.trainable_parameters(model)
    optimizer = T.make_optimizer(params, 5e-3, 0.0, "adamw8bit")
    T.optimizer_step(model, model, [data.collate(EXAMPLES[:2], TOK, 400)], optimizer, params, 5e-3, 1.0)
    before, state = snapshot(model), optimizer_snapshot(optimizer)
    with pytest.raises(ValueError, match=match):
        T.load_checkpoint(tmp_path, params, optimizer)
    assert_same(snapshot(model), before)
    assert_same(optimizer_snapshot(optimizer), state)


def test_cli_qlora_with_the_paged_optimizer(capsys):
    result = train_cli.main(["--model", "tiny", "--method", "qlora", "--targets", "all-linear", "--rank", "4",
                     "--optimizer", "paged_adamw", "--steps", "2", "--batch-size", "2", "--max-len", "400",
                     "--eval-n", "2", "--max-new-tokens", "4", "--no-before", "--no-progress"])
    assert len(result["loss_curve"]) == 2 and "qlora on tiny" in capsys.readouterr().out


def test_grad_accumulation_equals_one_big_batch():
    big = T.train(tiny_lora(), EXAMPLES, TOK, steps=3, lr=1e-2, batch_size=4, grad_accum=1, **SHORT)
    acc = T.train(tiny_lora(), EXAMPLES, TOK, steps=3, lr=1e-2, batch_size=2, grad_accum=2, **SHORT)
    assert acc.tokens == big.tokens  # the same examples in each step
    torch.testing.assert_close(acc.loss[0], big.loss[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(acc.grad_norm[0], big.grad_norm[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(acc.loss, big.loss, rtol=1e-4, atol=0)


def test_only_trainable_parameters_change():
    model = tiny_lora()
    before = {n: p.clone() for n, p in model.named_parameters()}
    T.train(model, EXAMPLES, TOK, steps=2, lr=1e-2, batch_size=4, **SHORT)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n  # B and A move, the base does not


def test_schedule_warmup_then_cosine():
    lrs = [T.lr_at(s, 1.0, steps=10, warmup_steps=2) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] > 0
    assert T.lr_at(9, 1.0, 10, 0, min_lr_ratio=0.1) > 0.1
    assert T.lr_at(7, 1.0, 10, 2, schedule="constant") == 1.0


def test_batch_indices_cover_each_epoch_once():
    epoch = sorted(i for m in range(4) for i in T.batch_indices(8, 2, m, seed=0))
    assert epoch == list(range(8))
    second = [i for m in range(4, 8) for i in T.batch_indices(8, 2, m, seed=0)]
    assert sorted(second) == epoch and second != [i for m in range(4) for i in T.batch_indices(8, 2, m, 0)]
    assert T.batch_indices(8, 2, 1, seed=0) != T.batch_indices(8, 2, 1, seed=1)


def test_checkpoint_is_one_safetensors_file(tmp_path):
    model = tiny_lora()
    T.train(model, EXAMPLES, TOK, steps=2, lr=1e-2, batch_size=4, checkpoint_dir=tmp_path, **SHORT)
    assert [p.name for p in tmp_path.iterdir()] == [T.CKPT_NAME]  # no temp file left behind
    with safe_open(str(tmp_path / T.CKPT_NAME), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k[6:] for k in keys if k.startswith("param.")} == lora
    assert any(k.endswith("exp_avg_sq") for k in keys) and "rng.cpu" in keys
    assert json.loads(meta["trainer_state"])["step"] == 2


def test_eval_points(tmp_path):
    h = T.train(tiny_lora(), EXAMPLES, TOK, steps=4, lr=1e-2, batch_size=4, eval_every=2,
                eval_examples=EXAMPLES[:2], max_new_tokens=4, **SHORT)
    assert [p["step"] for p in h.eval] == [2, 4] and all(0 <= p["accuracy"] <= 1 for p in h.eval)
    assert h.eval[1]["val_loss"] < h.eval[0]["val_loss"] * 1.5


def test_cli_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = train_cli.main(["--model", "tiny", "--steps", "3", "--batch-size", "2", "--max-len", "400", "--eval-n", "2",
                     "--no-progress", "--out", str(tmp_path / "ck"), "--results", str(out)])
    assert json.loads(out.read_text())["loss_curve"] == result["loss_curve"] and len(result["loss_curve"]) == 3
    assert "exact match on 2 test examples" in capsys.readouterr().out
    assert (tmp_path / "ck" / T.CKPT_NAME).is_file()


def test_cli_checkpointing_changes_memory_not_the_numbers(monkeypatch):
    """--checkpointing recomputes each decoder layer in the backward pass: the same losses, fewer saved activations."""
    from lorabook import models

    enabled = []
    monkeypatch.setattr(train_cli, "enable_checkpointing",
                        lambda m: enabled.append(m) or models.enable_checkpointing(m))
    argv = ["--model", "tiny", "--steps", "2", "--batch-size", "2", "--max-len", "400", "--eval-n", "1",
            "--max-new-tokens", "2", "--no-before", "--no-progress", "--track-memory"]
    plain, ckpt = train_cli.main(argv), train_cli.main(argv + ["--checkpointing"])
    assert len(enabled) == 1 and enabled[0].model.gradient_checkpointing
    assert ckpt["loss_curve"] == plain["loss_curve"]
    assert ckpt["peak_bytes"][0]["Activation"] < plain["peak_bytes"][0]["Activation"]


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, arg", [
    (dict(steps=0), "steps"), (dict(steps=-1), "steps"), (dict(steps=2.0), "steps"), (dict(lr=0), "lr"),
    (dict(lr=-1e-3), "lr"), (dict(batch_size=0), "batch_size"), (dict(grad_accum=0), "grad_accum"),
    (dict(max_len=1), "max_len"), (dict(warmup_steps=-1), "warmup_steps"), (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(schedule="linear"), "schedule"), (dict(min_lr_ratio=2), "min_lr_ratio"), (dict(stop_after=9), "stop_after"),
    (dict(eval_every=2), "eval_examples"), (dict(resume=True), "checkpoint_dir"),
    (dict(batch_size=100), "batch_size=100 exceeds"), (dict(weight_decay=-1), "weight_decay"),
    (dict(optimizer="sgd"),
     "optimizer must be one of \\['adamw', 'paged_adamw', 'adamw8bit', 'paged_adamw8bit'\\], got 'sgd'"),
    # numbers are numbers: no NaN, no Inf, no bool where an int goes
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"), (dict(lr=float("nan")), "lr must be a finite"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0, got nan"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite"), (dict(steps=True), "steps must be a positive"),
    (dict(batch_size=True), "batch_size must be a positive int, got True"), (dict(grad_accum=True), "grad_accum"),
    (dict(seed=True), "seed must be an int >= 0, got True"), (dict(warmup_steps=0.5), "warmup_steps must be an int"),
    (dict(min_lr_ratio=float("nan")), "min_lr_ratio must be a finite"), (dict(lr=True), "lr must be a finite number"),
    (dict(progress=1), "progress must be True or False, got 1"), (dict(max_len=True), "max_len must be an int >= 2"),
])
def test_bad_train_arguments(kwargs, arg):
    kw = dict(steps=2, lr=1e-3, batch_size=2, **SHORT) | kwargs
    model = tiny_lora()
    before, rng, mode = snapshot(model), torch.get_rng_state(), model.training
    with pytest.raises(ValueError, match=arg):
        T.train(model, EXAMPLES, TOK, **kw)
    assert_same(snapshot(model), before)  # refused before anything started: weights, mode and RNG as they were
    assert model.training == mode and torch.equal(torch.get_rng_state(), rng)


def test_empty_data_and_no_trainable_parameters():
    with pytest.raises(ValueError, match="train_data must not be empty"):
        T.train(tiny_lora(), [], TOK, steps=1)
    frozen = tiny_llama(vocab_size=len(TOK)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        T.train(frozen, EXAMPLES, TOK, steps=1, **SHORT)


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train(tiny_lora(), EXAMPLES, TOK, steps=2, checkpoint_dir=tmp_path, resume=True, **SHORT)
    with pytest.raises(FileNotFoundError, match="--resume needs a checkpoint"):
        train_cli.main(["--model", "tiny", "--steps", "2", "--out", str(tmp_path), "--resume"])


def test_resume_with_other_settings_or_another_model(tmp_path):
    T.train(tiny_lora(), EXAMPLES, TOK, steps=2, lr=1e-2, batch_size=2, checkpoint_dir=tmp_path, **SHORT)
    with pytest.raises(ValueError, match="different settings.*'lr': \\(0.01, 0.02\\)"):
        T.train(tiny_lora(), EXAMPLES, TOK, steps=2, lr=2e-2, batch_size=2, checkpoint_dir=tmp_path,
                resume=True, **SHORT)
    other = add_lora(tiny_llama(vocab_size=len(TOK)), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="does not fit the model's trainable parameters"):
        T.train(other, EXAMPLES, TOK, steps=2, lr=1e-2, batch_size=2, checkpoint_dir=tmp_path, resume=True,
                **SHORT)


def test_unknown_method_and_model():
    with pytest.raises(ValueError, match="method 'dora'"):
        T.prepare(tiny_llama(), "dora")
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        train_cli.main(["--method", "dora", "--model", "tiny"])
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        T.load_model("gpt5")


@pytest.mark.parametrize("method", T.methods())
def test_every_method_trains_in_the_same_loop(method):
    torch.manual_seed(0)
    # qlora: its default r=64 exceeds the tiny model's 32-wide k_proj; qalora: r=8 exceeds 64 / 16 groups
    kwargs = {"qlora": dict(r=4), "qalora": dict(r=2, group_size=16)}.get(method, {})
    model = T.prepare(tiny_llama(seed=0, vocab_size=len(TOK), max_seq_len=512), method, **kwargs)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    h = T.train(model, EXAMPLES, TOK, steps=2, lr=1e-2, batch_size=2, **SHORT)
    assert len(h.loss) == 2 and all(torch.isfinite(torch.tensor(h.loss)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_torchrun_with_two_cpu_processes(tmp_path):
    """The WORLD_SIZE > 1 path (DDP over gloo, sharded data): two ranks train, rank 0 checkpoints and reports.
    This is the only run of that path here; it has not been run on GPUs (nccl)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lorabook.train", "--model", "tiny", "--steps", "2", "--batch-size", "2", "--max-len", "400",
           "--eval-n", "2", "--max-new-tokens", "4", "--no-before", "--no-progress", "--out", str(tmp_path / "ck"),
           "--results", str(out)]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(out.read_text())["loss_curve"]) == 2 and (tmp_path / "ck" / T.CKPT_NAME).is_file()
    assert run.stdout.count("trainable of") == 1  # rank 0 alone prints


def test_cli_prefix_from_text(capsys):
    common = ["--model", "tiny", "--method", "prefix", "--n-prefix", "6", "--steps", "1", "--batch-size", "2",
              "--max-len", "400", "--eval-n", "1", "--max-new-tokens", "2", "--no-before", "--no-progress"]
    result = train_cli.main(common + ["--prefix-text", "SELECT name FROM"])  # 16 bytes: the byte tokenizer's 16 tokens
    assert result["trainable_params"] == 2 * 2 * 6 * 2 * 16  # 2 layers · (K, V) · P · n_kv · head_dim
    with pytest.raises(ValueError, match="--prefix-text has 3 tokens, fewer than --n-prefix 6"):
        train_cli.main(common + ["--prefix-text", "abc"])
