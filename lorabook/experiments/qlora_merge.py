"""Merging a QLoRA adapter, three ways: into dequant(W4), into dequant(W4) quantized again, and -- the common
mistake -- into the original weights. Notebook 07's measurement, written to data/qlora_merge.json.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) trains ΔW = (α/r)·B·A against
W' = doubleDequant(c1, c2, W_NF4), never against the weights W it was quantized from. The variants:

    "unmerged"     W_NF4 (bf16 compute) + the LoRA path: the model as trained      lorabook.qlora.add_qlora + train
    "merged"       W' + ΔW, an fp32 nn.Linear per layer                            merge_qlora(model)
    "requantized"  NF4(W' + ΔW), bf16 compute                                      merge_qlora(model, requantize=True)
    "wrong"        W + ΔW, W the fp32 weights W_NF4 was made from                  load_adapter(base) + merge_lora
    "no adapter"   W_NF4 alone: the scale of what the adapter changes              qlora_eval.base_variant

Logits (``compare_logits``): on the answer tokens of the first ``n_logits`` test examples (teacher-forced: the
prompt and the gold SQL, ``lorabook.data.collate``), each variant against the unmerged model computed in fp32
(the same function without bf16 rounding): the largest |Δ logit|, ‖Δ‖ / ‖logits‖, and how often the most likely
next token is the same. Exact match: every variant answers the first ``n`` test questions (greedy, 40 tokens).

    python -m lorabook.experiments merge       # ~10 minutes of one CPU thread (an adapter, five scorings)

The adapter is notebook 07's recipe (``lorabook.experiments.qlora_eval.train_adapter``: 8 steps, seed 0).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import torch

from .._checks import check_positive_int
from . import DATA, file_command

__all__ = ["MERGE_OUT", "VARIANTS", "variants", "compare_logits", "requantization_stats", "merge", "cli"]
MERGE_OUT = DATA / "qlora_merge.json"
VARIANTS = {"unmerged": "NF4 + LoRA path, as trained", "merged": "dequant(W4) + ΔW, fp32",
            "requantized": "NF4(dequant(W4) + ΔW)", "wrong": "original W + ΔW, fp32", "no adapter": "NF4 alone"}


def variants(qlora_model: torch.nn.Module, base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """VARIANTS' models, built from a trained QLoRA model and the fp32 ``base`` it was quantized from (neither is
    changed): copies merged as the table in the module docstring says."""
    from ..lora import load_adapter, merge_lora, save_adapter
    from ..qlora import merge_qlora
    from .qlora_eval import base_variant

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(qlora_model, folder)  # the adapter as a PEFT folder: how it reaches other weights
        wrong = merge_lora(load_adapter(copy.deepcopy(base), folder))
    return {"unmerged": qlora_model, "merged": merge_qlora(copy.deepcopy(qlora_model)),
            "requantized": merge_qlora(copy.deepcopy(qlora_model), requantize=True), "wrong": wrong,
            "no adapter": base_variant(base, "nf4")}


@torch.no_grad()
def compare_logits(models: dict[str, torch.nn.Module], reference: torch.nn.Module, batch: dict) -> dict[str, dict]:
    """Per model: its logits on ``batch``'s answer tokens (labels != -100) against ``reference``'s:
    {"max_abs": max |Δ|, "rel_norm": ‖Δ‖ / ‖reference‖, "same_top1": share of positions with the same argmax}."""
    def answer_logits(model):  # (answer tokens, vocab) fp32
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"][:, 1:] != -100  # the logits at t predict token t + 1
        return logits[:, :-1][keep].float()
    if not (batch["labels"][:, 1:] != -100).any():
        raise ValueError("batch has no answer tokens (labels != -100) after the first position: nothing to compare")
    ref = answer_logits(reference)
    out = {}
    ref_top1 = ref.argmax(-1)
    for name, model in models.items():
        logits = answer_logits(model)
        diff = logits - ref
        out[name] = dict(max_abs=diff.abs().max().item(), rel_norm=(diff.norm() / ref.norm()).item(),
                         same_top1=logits.argmax(-1).eq(ref_top1).float().mean().item())
    return out


@torch.no_grad()
def requantization_stats(qlora_model: torch.nn.Module) -> dict:
    """What quantizing W' + ΔW again (``merge_qlora(requantize=True)``) does to ΔW, over every LoRA layer on a
    LinearNF4 (W' = dequant(W4), Q = dequant(NF4(W' + ΔW)), sums over all layers):

        codes_changed   share of the 4-bit codes of NF4(W' + ΔW) that differ from W4's
        kept            <Q - W', ΔW> / ‖ΔW‖²: the share of ΔW the re-quantized weights still carry (1 = all)
        error           ‖Q - (W' + ΔW)‖ / ‖ΔW‖: the second rounding's error, in units of ΔW
    """
    from ..lora import lora_layers
    from ..qlora import merged_weight, requantized_weight
    from ..quant import LinearNF4, dequantize_4bit
    from ..quant.nf4 import unpack_4bit

    changed = codes = 0
    inner = delta_sq = error_sq = 0.0
    for layer in lora_layers(qlora_model).values():
        base = layer.base
        if not isinstance(base, LinearNF4):
            continue
        w0 = dequantize_4bit(base.quantized, torch.float32)  # (out, in) W'
        merged = merged_weight(layer, layer.active_adapter)  # (out, in) W' + ΔW
        q = requantized_weight(layer, layer.active_adapter, merged)  # what merge_qlora(requantize=True) stores
        n = base.in_features * base.out_features
        changed += int((unpack_4bit(q.packed, n) != unpack_4bit(base.quantized.packed, n)).sum())
        codes += n
        delta, requantized = merged - w0, dequantize_4bit(q, torch.float32)
        inner += float(((requantized - w0) * delta).sum())
        delta_sq += float(delta.pow(2).sum())
        error_sq += float((requantized - merged).pow(2).sum())
    if codes == 0 or delta_sq == 0:
        raise ValueError("qlora_model has no active LoRA adapter on a LinearNF4 layer with ΔW != 0 (B starts at "
                         "zero: train it first)")
    return dict(codes_changed=changed / codes, kept=inner / delta_sq, error=(error_sq / delta_sq) ** 0.5)


def merge(n: int = 100, n_logits: int = 16, steps: int = 8, seed: int = 0, threads: int = 1,
          model_name: str = "smollm2") -> dict:
    """Train notebook 07's adapter, build VARIANTS, compare their logits on ``n_logits`` test examples and their
    exact match on the first ``n`` test questions. model_name "tiny" (a random 2-layer Llama) is for tests."""
    from .. import data
    from ..quant.linear import set_compute_dtype
    from ..train import load_model
    from .qlora_eval import RECIPE, train_adapter

    check_positive_int("n", n)
    check_positive_int("n_logits", n_logits)
    check_positive_int("threads", threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base, tokenizer = load_model(model_name, seed)
    train_ex, test_ex = data.load_split("train"), data.load_split("test", n=max(n, n_logits))
    model, losses = train_adapter(base, tokenizer, train_ex, "nf4", steps=steps, seed=seed)
    model.eval()
    models = variants(model, base)
    batch = data.collate(test_ex[:n_logits], tokenizer, max_len=512)  # whole examples (the tiny model's bytes too)
    reference = set_compute_dtype(copy.deepcopy(model), torch.float32)  # the unmerged model, without bf16 rounding
    logits = compare_logits(models, reference, batch)
    evals = {}
    for name, m in models.items():
        t1 = time.perf_counter()
        preds = data.predict(m, tokenizer, test_ex[:n], max_new_tokens=40, progress=False)
        evals[name] = dict(predictions=preds, accuracy=data.accuracy(preds, test_ex[:n]),
                           eval_s=time.perf_counter() - t1)
    for e in evals.values():
        e["same_as_unmerged"] = sum(a == b for a, b in zip(e["predictions"], evals["unmerged"]["predictions"]))
    return dict(command="python -m lorabook.experiments merge", model=model_name, variants=VARIANTS,
                recipe=dict(RECIPE, steps=steps, seed=seed, targets="all-linear"), loss_curve=losses,
                logits=dict(n_examples=n_logits, answer_tokens=int((batch["labels"][:, 1:] != -100).sum()),
                            reference="unmerged, fp32 compute", by_variant=logits),
                eval_split="test", eval_n=n, gold=[ex["sql"] for ex in test_ex[:n]], eval=evals,
                threads=torch.get_num_threads(), torch=torch.__version__, load_avg_1m=os.getloadavg()[0],
                wall_time_s=time.perf_counter() - t0)


def cli(args) -> bool:
    """``python -m lorabook.experiments merge``: runs ``merge`` (unless ``args.dry_run``) into MERGE_OUT
    (``lorabook.experiments.file_command``); True when no other table is left to run."""
    def report(result):
        return "\n".join(f"{name:<12} exact match {e['accuracy']:.0%}  logits max |Δ| "
                         f"{result['logits']['by_variant'][name]['max_abs']:.3g}" for name, e in result["eval"].items())
    return file_command(args, "merge", f"1 adapter, {len(VARIANTS)} variants", merge, MERGE_OUT, report)
