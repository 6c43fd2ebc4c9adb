"""torch.distributed: two gloo processes under torchrun train exactly like one process with the same global batch.

The trap (transformers #34191): with gradient accumulation, normalising each rank's loss by its own token count
weights the ranks' answers unequally; ``lorabook.train`` divides by the global step's tokens, so the curves agree.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorabook import train as T
from lorabook.models import byte_tokenizer, tiny_llama
from lorabook.train import __main__ as train_cli

ARGS = ["--model", "tiny", "--method", "lora", "--steps", "3", "--batch-size", "4", "--grad-accum", "2",
        "--max-len", "512", "--eval-n", "1", "--max-new-tokens", "2", "--no-before", "--no-progress",
        "--warmup", "0", "--lr", "1e-2", "--threads", "1"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METHODS = {"lora": [], "qlora": ["--method", "qlora", "--targets", "all-linear", "--rank", "4",
                                 "--optimizer", "paged_adamw"]}  # NF4 base, paged AdamW
# fp32 lora agrees to 1e-6; qlora computes in bf16, and a rank pads its half-batch to its own longest example, so
# an activation now and then rounds to the neighbouring bf16 value (measured: 8e-6 on the loss)
TOLERANCE = {"lora": 1e-6, "qlora": 5e-5}


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_processes_train_like_one(tmp_path, capsys, method):
    args = ARGS + METHODS[method]
    one = train_cli.main(args + ["--out", str(tmp_path / "one"), "--results", str(tmp_path / "one.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lorabook.train", *args,
           "--out", str(tmp_path / "two"), "--results", str(tmp_path / "two.json")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(two["loss_curve"]) == 3 and min(two["loss_curve"]) > 1  # answer tokens were scored
    # same global batch, same curve: each rank dividing by its own tokens is off by 3e-4 here
    assert max(abs(a - b) for a, b in zip(one["loss_curve"], two["loss_curve"])) <= TOLERANCE[method]
    w1, w2 = (load_file(str(tmp_path / d / T.CKPT_NAME)) for d in ("one", "two"))
    adapters = [k for k in w1 if k.startswith("param.")]
    assert adapters and set(adapters) == {k for k in w2 if k.startswith("param.")}
    if method == "lora":  # the final adapter, and AdamW's moments, are the one-process ones
        for k in adapters:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    else:  # Adam moves an element whose gradient is ~0 by up to lr a step, whatever the sign of that ~0
        diff = torch.cat([(w2[k].float() - w1[k].float()).abs().flatten() for k in adapters])
        size = torch.cat([w1[k].float().abs().flatten() for k in adapters])
        off = diff > TOLERANCE[method] + 1e-5 * size
        assert off.float().mean() <= 0.01, f"{int(off.sum())} of {off.numel()} adapter elements differ"
        assert diff.max() <= 3 * 1e-2  # at most 3 steps of lr


def test_a_world_size_that_does_not_divide_the_batch_is_refused(monkeypatch):
    model, tok = tiny_llama(seed=0, vocab_size=len(byte_tokenizer())), byte_tokenizer()
    T.prepare(model, "lora", target_modules=("q_proj",), r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv("WORLD_SIZE", "2")
    examples = [{"prompt": "a", "answer": "b"}] * 8
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by the world size 2"):
        T.train(model, examples, tok, steps=1, batch_size=3, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.distributed.is_initialized()  # refused before the process group starts


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_world_size_in_the_environment_is_refused(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        T.world_size()
