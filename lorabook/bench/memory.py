"""``python -m lorabook.bench memory``: ``lorabook.memory.estimate`` (analytic) against ``measure`` (torch's
MemTracker) on the same training step, fp32 + AdamW, for a tiny Llama and SmolLM2, full and LoRA, with and without
gradient checkpointing. The ratio is estimate / measured peak."""
from __future__ import annotations

import time

from ..memory import estimate, measure
from . import register, row


BENCH_SHAPES = {"tiny": (4, 64), "smollm2-135m": (2, 128)}  # (batch, seq): SmolLM2 ~10-40 s a case on a CPU


@register("memory")
def bench_memory(quick: bool = False) -> list[dict]:
    """estimate() vs measure() peak, fp32 + AdamW: {tiny, SmolLM2} x {full, LoRA q,v r=8} x {checkpointing}."""
    from ..models import load_base_model, tiny_llama

    models = {"tiny": tiny_llama(seed=0)}
    if not quick:
        models["smollm2-135m"] = load_base_model()[0]
    rows = []
    for name, model in models.items():
        B, T = BENCH_SHAPES[name]
        for method in ("full", "lora"):
            for ckpt in (False, True):
                t0 = time.perf_counter()
                kw = dict(method=method, batch_size=B, seq_len=T, gradient_checkpointing=ckpt)
                # one tracked step after measure's warm-up is already steady state; MemTracker is slow on big graphs
                est, got = estimate(model, **kw), measure(model, steps=2 if name == "tiny" else 1, **kw)
                case = f"{name} {method}{' +ckpt' if ckpt else ''} B{B} T{T}"
                rows.append(row(case, "bytes", est.total, "measured (MemTracker)", got.total,
                                peak_moment=est.peak_moment, saved_activations=est.saved_activations,
                                measured_saved_activations=got.saved_activations,
                                seconds=round(time.perf_counter() - t0, 2)))
    return rows
