"""Does a QLoRA adapter fit only the 4-bit weights it was trained on? Notebook 07's adapter, scored on 100 test
questions on the 4-bit base and on the fp32 base, written to data/qlora_transfer.json.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) trains LoRA against ``doubleDequant(W_NF4)`` in
bf16; a deployed adapter is often loaded onto the 16-bit weights instead. Notebook 07 runs its recipe live (8
steps) and scores it on 10 questions on both bases: an anecdote. Here the same recipe, twice -- once on each
base -- and every adapter scored on the first ``n`` test questions (exact match, ``lorabook.data``) on each base:

    base "nf4"        NF4 + double quantization, bf16 compute: what QLoRA trains on (``lorabook.qlora.add_qlora``)
    base "fp32"       SmolLM2's fp32 weights -- themselves de-quantized from the GGUF's Q4_1 (blocks of 32)
    base "nf4-fp32"   (with ``bases=tuple(BASES)``) the same 4-bit codes computed in fp32: tells the weights'
                      rounding from bf16 arithmetic, at one more scoring pass per adapter

    adapter trained on "nf4": LoRA r = 8, α = 16 on every linear layer but the head, gradient checkpointing,
                              PagedAdamW, 8 steps × 8 examples, lr 3e-3, warm-up 3, cosine, seed 0 (notebook 07)
    adapter trained on "fp32": the same, on the fp32 base (the same initial A: one seed, one init order)

    python -m lorabook.experiments transfer      # ~10 minutes of one CPU thread on a quiet machine

Each adapter is seeded on its own, so ``transfer(trained_on=("nf4",))`` and ``transfer(trained_on=("fp32",))``
in two processes give the two halves of one result. The file holds the settings, each adapter's loss curve and
every prediction; per (adapter, base) the number correct of all ``n`` and of the first 10 (notebook 07's live
subset), and how many answers equal those on the adapter's own base. One seed and 100 questions: about ±5
points of binomial noise per accuracy.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import torch

from .._checks import check_choice, check_int, check_positive_int
from . import DATA, file_command

__all__ = ["TRANSFER_OUT", "BASES", "DEFAULT_BASES", "TRAINED_ON", "RECIPE", "base_variant", "train_adapter", "transfer", "cli"]
TRANSFER_OUT = DATA / "qlora_transfer.json"
BASES = {"nf4": "NF4 + DQ, bf16 compute (QLoRA's base)", "nf4-fp32": "the same NF4 codes, fp32 compute",
         "fp32": "fp32 (de-quantized Q4_1)"}
TRAINED_ON = ("nf4", "fp32")
DEFAULT_BASES = ("nf4", "fp32")  # "nf4-fp32" too with bases=tuple(BASES): one more scoring pass per adapter
RECIPE = dict(r=8, alpha=16, lr=3e-3, batch_size=8, max_len=160, warmup_steps=3, optimizer="paged_adamw")


def base_variant(base: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A copy of the fp32 ``base`` as base ``kind`` (a key of BASES); ``base`` is not changed."""
    from ..quant.linear import quantize_model

    check_choice("kind", kind, tuple(BASES))
    model = copy.deepcopy(base)
    if kind != "fp32":  # as add_qlora quantizes: every linear but the output head, blocksize 64, DQ
        quantize_model(model, double_quant=True, compute_dtype=torch.bfloat16 if kind == "nf4" else torch.float32)
    return model


def train_adapter(base: torch.nn.Module, tokenizer, train_examples: list[dict], on: str, steps: int = 8,
                  seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """(model with the trained adapter, loss curve): RECIPE for ``steps`` steps on base ``on`` ("nf4": QLoRA's
    ``add_qlora``; "fp32": ``add_lora`` + checkpointing on the fp32 weights). Seeds the adapter init with ``seed``."""
    from ..lora import add_lora
    from ..models import enable_checkpointing
    from ..qlora import add_qlora
    from ..train import train

    check_choice("on", on, TRAINED_ON)
    check_positive_int("steps", steps)
    check_int("seed", seed, low=0)
    torch.manual_seed(seed)
    r, alpha = RECIPE["r"], RECIPE["alpha"]
    if on == "nf4":
        model = add_qlora(copy.deepcopy(base), r=r, alpha=alpha, dropout=0.0)
    else:
        model = enable_checkpointing(add_lora(copy.deepcopy(base), "all-linear", r=r, alpha=alpha, dropout=0.0))
    history = train(model, train_examples, tokenizer, steps=steps, lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                    max_len=RECIPE["max_len"], warmup_steps=RECIPE["warmup_steps"], optimizer=RECIPE["optimizer"],
                    seed=seed, progress=False, log_every=0)
    return model, list(history.loss)


def transfer(n: int = 100, steps: int = 8, seed: int = 0, threads: int = 1, model_name: str = "smollm2",
             bases: tuple[str, ...] = DEFAULT_BASES, trained_on: tuple[str, ...] = TRAINED_ON) -> dict:
    """Train one adapter per base in ``trained_on`` and score each on the first ``n`` test questions on every
    base in ``bases`` (each adapter is independent of the others: seeded alone, so the pieces of one result can
    run as separate processes). model_name "tiny" (a random 2-layer Llama) is for tests."""
    from .. import data
    from ..lora import load_adapter, save_adapter
    from ..train import load_model

    check_positive_int("n", n)
    check_positive_int("threads", threads)
    for kind in bases:
        check_choice("bases", kind, tuple(BASES))
    for kind in trained_on:
        check_choice("trained_on", kind, TRAINED_ON)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base, tokenizer = load_model(model_name, seed)
    train_ex, test_ex = data.load_split("train"), data.load_split("test", n=n)
    adapters = {}
    for on in trained_on:
        t1 = time.perf_counter()
        model, losses = train_adapter(base, tokenizer, train_ex, on, steps=steps, seed=seed)
        train_s = time.perf_counter() - t1
        with tempfile.TemporaryDirectory() as folder:
            save_adapter(model, folder)  # PEFT's format: what a deployment would load
            evals = {}
            for kind in bases:
                t1 = time.perf_counter()
                target = model if kind == on else load_adapter(base_variant(base, kind), folder)
                preds = data.predict(target, tokenizer, test_ex, max_new_tokens=40, progress=False)
                evals[kind] = dict(predictions=preds, accuracy=data.accuracy(preds, test_ex),
                                   correct=sum(data.exact_match(p, ex["sql"]) for p, ex in zip(preds, test_ex)),
                                   correct_first10=sum(data.exact_match(p, ex["sql"])
                                                       for p, ex in zip(preds[:10], test_ex[:10])),
                                   eval_s=time.perf_counter() - t1)
        own = evals.get(on, {}).get("predictions")
        for kind, e in evals.items():
            e["same_as_own_base"] = None if own is None else sum(a == b for a, b in zip(e["predictions"], own))
        adapters[on] = dict(trained_on=BASES[on], loss_curve=losses, train_wall_time_s=train_s, eval=evals)
    return dict(command="python -m lorabook.experiments transfer", model=model_name,
                bases={k: BASES[k] for k in bases}, recipe=dict(RECIPE, steps=steps, seed=seed, targets="all-linear"),
                eval_split="test", eval_n=len(test_ex), gold=[ex["sql"] for ex in test_ex],
                threads=torch.get_num_threads(), torch=torch.__version__, load_avg_1m=os.getloadavg()[0],
                wall_time_s=time.perf_counter() - t0, adapters=adapters)


def cli(args) -> bool:
    """``python -m lorabook.experiments transfer``: runs ``transfer`` (unless ``args.dry_run``) into TRANSFER_OUT
    (``lorabook.experiments.file_command``); True when no other table is left to run."""
    def report(result):
        return "\n".join(f"adapter trained on {on}: " + ", ".join(f"on {k} {e['accuracy']:.0%}"
                                                                   for k, e in a["eval"].items())
                         for on, a in result["adapters"].items())
    return file_command(args, "transfer", f"{len(TRAINED_ON)} adapters × {len(DEFAULT_BASES)} bases",
                        lambda: transfer(n=getattr(args, "eval_n", 100), steps=getattr(args, "steps", 8)),
                        TRANSFER_OUT, report)
