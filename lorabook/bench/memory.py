"""``python -m lorabook.bench memory``: ``lorabook.memory.estimate`` (analytic) against ``measure`` (torch's
MemTracker) on the same training step, AdamW, for a tiny Llama and SmolLM2: full fine-tuning, LoRA and QLoRA (r = 8
on every linear layer but the head), each with and without gradient checkpointing -- like with like: one batch
(SmolLM2: 4 x 128), one model in fp32 (QLoRA: its linear weights in NF4 + double quantization, bf16 compute; the
embeddings, norms and LoRA fp32, so its estimate is ``dtype="fp32"``). The ratio is estimate / measured peak.

Then the fine-tune's own step (``lorabook.train``, ``track_memory=True``: its loss, and so its logits, only on the
answer tokens) for LoRA and QLoRA on SmolLM2, both checkpointed, 4 examples of at most 128 tokens: the row's ratio
is QLoRA's peak over LoRA's.
"""
from __future__ import annotations

import time

from ..memory import estimate, measure
from . import register, row


BENCH_SHAPES = {"tiny": (4, 64), "smollm2-135m": (4, 128)}  # (batch, seq): SmolLM2 ~7-40 s a case on a CPU
METHODS = {"full": {}, "lora": dict(lora_targets="all-linear"), "qlora": dict(lora_targets="all-linear")}


@register("memory")
def bench_memory(quick: bool = False) -> list[dict]:
    """estimate() vs measure() peak, AdamW: {tiny, SmolLM2} x {full, LoRA, QLoRA} x {checkpointing}."""
    from ..models import load_base_model, tiny_llama

    models = {"tiny": tiny_llama(seed=0)}
    if not quick:
        models["smollm2-135m"] = load_base_model()[0]
    rows = []
    for name, model in models.items():
        B, T = BENCH_SHAPES[name]
        for method, targets in METHODS.items():
            for ckpt in (False, True):
                t0 = time.perf_counter()
                kw = dict(method=method, batch_size=B, seq_len=T, gradient_checkpointing=ckpt, **targets)
                # one tracked step after measure's warm-up is already steady state; MemTracker is slow on big graphs
                est = estimate(model, dtype="fp32", **kw)
                got = measure(model, steps=2 if name == "tiny" else 1, **kw)
                case = f"{name} {method}{' +ckpt' if ckpt else ''} B{B} T{T}"
                rows.append(row(case, "bytes", est.total, "measured (MemTracker)", got.total,
                                peak_moment=est.peak_moment, saved_activations=est.saved_activations,
                                measured_saved_activations=got.saved_activations,
                                seconds=round(time.perf_counter() - t0, 2)))
    if not quick:
        rows.append(train_step_row())
    return rows


def train_step_row(batch_size: int = 4, max_len: int = 128) -> dict:
    """QLoRA's peak bytes over LoRA's in ``lorabook.train``'s second step (r = 8, all linear, both checkpointed)."""
    from .. import data
    from ..models import enable_checkpointing
    from ..train import load_model, prepare, train

    peak, t0 = {}, time.perf_counter()
    for method in ("lora", "qlora"):
        model, tokenizer = load_model("smollm2", seed=0)
        prepare(model, method, target_modules="all-linear", r=8, dropout=0.0)
        if method == "lora":
            enable_checkpointing(model)  # add_qlora checkpoints already
        history = train(model, data.load_split("train"), tokenizer, steps=2, batch_size=batch_size, max_len=max_len,
                        warmup_steps=0, progress=False, track_memory=True)
        peak[method] = history.peak_bytes[0]["Total"]
    return row(f"smollm2-135m train step +ckpt B{batch_size} T<={max_len}: QLoRA / LoRA", "bytes", peak["qlora"],
               "LoRA, same step", peak["lora"], seconds=round(time.perf_counter() - t0, 2))
