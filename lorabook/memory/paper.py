"""The seed's memory numbers next to ours: each ``seed_*`` function returns rows ``{"quantity", "paper", "ours",
"ratio", "note"}`` (strings, ready to print with ``format_rows``), ours computed by ``lorabook.memory.estimate``;
``ratio`` is ours / paper computed from the unrounded numbers ("-" where the paper gives no number).

    seed_four_slots      the "4 slots" picture: weights, gradients, Adam states, forward activations (B/param)
    seed_gpt3_lora       GPT-3 175B: full fine-tuning vs LoRA (Hu et al. 2021, sec. 4.2)
    seed_qlora_llama7b   LLaMA-7B under QLoRA (Dettmers et al. 2023, Fig. 6)

Paper sizes are decimal like the papers' arithmetic (175e9 params x 2 B = 350 GB), so our numbers in these tables
use GB = 1e9 and MB = 1e6 bytes; ``Estimate.table()`` prints binary MiB / GiB.
"""
from __future__ import annotations

from .._checks import check_flag
from .._table import text_table
from .estimate import estimate
from .spec import as_spec, lora_modules

__all__ = ["seed_four_slots", "seed_gpt3_lora", "seed_qlora_llama7b", "format_rows"]


def _params_of_lora(spec, targets, r: int) -> int:
    """LoRA parameters r (in + out) over the linears ``targets`` selects."""
    short = {k.rsplit(".", 1)[-1]: v for k, v in spec.linears().items()}
    return sum(r * sum(short[n.rsplit(".", 1)[-1]]) for n in lora_modules(spec, targets))


def _d(x: float, unit: str) -> str:
    div = {"TB": 1e12, "GB": 1e9, "MB": 1e6}[unit]
    return f"{x / div:,.1f} {unit}" if x / div < 100 else f"{x / div:,.0f} {unit}"


def _ratio(ours: float, paper: float | None) -> str:
    return "-" if paper is None else f"{ours / paper:.2f}"


def seed_four_slots(model="smollm2-135m", batch_size: int = 1, seq_len: int = 512) -> list[dict]:
    """(a) The seed's "4 slots" (fp32, Adam, no mixed precision), in bytes per parameter, ours from estimate()."""
    e = estimate(model, "full", "fp32", "adamw", batch_size=batch_size, seq_len=seq_len)
    P, s = e.params, e.slots
    per_token = e.saved_activations / (batch_size * seq_len)
    rows = [dict(quantity="weights (B/param)", paper="4", ours=f"{s['weights'] / P:.2f}",
                 ratio=_ratio(s["weights"] / P, 4), note="fp32: 4 bytes per parameter (+ RoPE buffers)"),
            dict(quantity="gradients (B/param)", paper="4", ours=f"{s['gradients'] / P:.2f}",
                 ratio=_ratio(s["gradients"] / P, 4), note="one fp32 gradient per trainable parameter"),
            dict(quantity="Adam states (B/param)", paper="8", ours=f"{s['optimizer'] / P:.2f}",
                 ratio=_ratio(s["optimizer"] / P, 8),
                 note="exp_avg + exp_avg_sq, fp32 (+ a 4-byte step counter per tensor)"),
            dict(quantity="forward (B/param)", paper="4", ours=f"{s['forward'] / P:.2f}",
                 ratio=_ratio(s["forward"] / P, 4),
                 note=f"not a per-parameter cost: {per_token / 1e3:,.0f} KB per token here (B={batch_size}, "
                      f"T={seq_len}); equals 4 B/param at B*T = {4 * P / per_token:,.0f} tokens"),
            dict(quantity="sum of the slots", paper="20 x P bytes", ours=_d(e.naive_total, "GB"),
                 ratio=_ratio(e.naive_total, 20 * P), note=f"{as_spec(model).name}, P = {P:,}"),
            dict(quantity="peak of a real step", paper="-", ours=_d(e.total, "GB"), ratio="-",
                 note=f"at '{e.peak_moment}': the backward frees activations as it makes gradients, so the "
                      "slots never all peak together (but logit gradients add 8 B x vocabulary per token)")]
    return rows


def seed_gpt3_lora(seq_len: int = 2048, batch_size: int = 1) -> list[dict]:
    """(b) GPT-3 175B: LoRA's trainable parameters and VRAM vs full fine-tuning (LoRA paper, sec. 4.2)."""
    spec = as_spec("gpt3-175b")
    P, qv = spec.count(), ("q_proj", "v_proj")
    r1, r4 = _params_of_lora(spec, qv, 1), _params_of_lora(spec, qv, 4)
    kw = dict(optimizer="adam", batch_size=batch_size, seq_len=seq_len)
    full16, lora16 = estimate(spec, "full", "fp16", **kw), estimate(spec, "lora", "fp16", lora_rank=4, **kw)
    fullmx = estimate(spec, "full", "mixed", **kw)
    return [
        dict(quantity="parameters", paper="175B", ours=f"{P / 1e9:.1f}B", ratio=_ratio(P, 175e9),
             note="96 layers x 12 d^2 + embeddings (12288 x 50257) + positions"),
        dict(quantity="LoRA trainable params (Wq, Wv)", paper="4.7M", ours=f"{r1 / 1e6:.2f}M", ratio=_ratio(r1, 4.7e6),
             note=f"r = 1: 2 matrices x 96 layers x r (d + d); r = 4 gives {r4 / 1e6:.1f}M, r = 8 {2 * r4 / 1e6:.1f}M"),
        dict(quantity="fewer trainable params", paper="10,000x", ours=f"{P / r4:,.0f}x", ratio=_ratio(P / r4, 1e4),
             note=f"at r = 4 (the paper's 10,000x; r = 1 would be {P / r1:,.0f}x); "
                  f"checkpoint {_d(2 * P, 'GB')} -> {_d(2 * r4, 'MB')} in fp16 (paper: 350 GB -> 35 MB)"),
        dict(quantity="VRAM, full fine-tuning", paper="1.2 TB", ours=_d(full16.total, "TB"),
             ratio=_ratio(full16.total, 1.2e12),
             note=f"fp16 weights, grads and Adam states, B={batch_size}, T={seq_len}; with an fp32 master copy "
                  f"(mixed, ZeRO's 16 B/param) {_d(fullmx.total, 'TB')}"),
        dict(quantity="VRAM, LoRA (r=4, Wq, Wv)", paper="350 GB", ours=_d(lora16.total, "GB"),
             ratio=_ratio(lora16.total, 350e9),
             note=f"the fp16 weights alone are {_d(2 * P, 'GB')}; the rest is activations (frozen weights still "
                  "pass gradients to their inputs)"),
        dict(quantity="VRAM reduction", paper="1/3", ours=f"1/{full16.total / lora16.total:.1f}",
             ratio=_ratio(lora16.total / full16.total, 1 / 3),
             note="the paper's 'up to 2/3' drops the Adam states (2 of 3 weight-sized slots); we also drop the "
                  f"gradients (another slot), so 1/{full16.total / lora16.total:.1f} at this batch; batch and sequence"
                  " are not stated in the paper"),
    ]


def _closest_lora(spec, target_params: float, ranks=(1, 2, 4, 8, 16, 32, 64)) -> tuple:
    options = [(abs(_params_of_lora(spec, t, r) - target_params), name, r, _params_of_lora(spec, t, r))
               for name, t in (("Wq, Wv", ("q_proj", "v_proj")), ("Wq, Wk, Wv, Wo", ("q_proj", "k_proj",
                               "v_proj", "o_proj")), ("all linear", "all-linear")) for r in ranks]
    return min(options)[1:]


def seed_qlora_llama7b(seq_len: int | None = None) -> list[dict]:
    """(c) LLaMA-7B under QLoRA (QLoRA paper sec. 4): 4-bit base, LoRA weights, "input gradients" per sequence.

    seq_len: None = the length at which our saved activations match the paper's 567 MB (batch 1)."""
    spec = as_spec("llama-7b")
    P = spec.count()
    name, r, n = _closest_lora(spec, 26e6 / 2)  # 26 MB of bf16 LoRA weights = 13M params
    targets = {"Wq, Wv": ("q_proj", "v_proj"), "Wq, Wk, Wv, Wo": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "all linear": "all-linear"}[name]
    kw = dict(method="qlora", lora_rank=r, lora_targets=targets, batch_size=1)
    if seq_len is None:  # activations grow linearly in T: solve from two points
        a1, a2 = (estimate(spec, seq_len=t, **kw).saved_activations for t in (64, 128))
        seq_len = max(1, round(64 + (567e6 - a1) / ((a2 - a1) / 64)))
    e, ck = estimate(spec, seq_len=seq_len, **kw), estimate(spec, seq_len=seq_len, gradient_checkpointing=True, **kw)
    base = e.slots["weights"] - 2 * n
    return [
        dict(quantity="4-bit base model", paper="5,048 MB", ours=_d(base, "MB"), ratio=_ratio(base, 5048e6),
             note=f"NF4 + double quantization (4.127 bits) on the {spec.n_layers * sum(i * o for i, o in spec.linears().values()) / 1e9:.2f}B"
                  " linear weights, embeddings and head in bf16; the paper's figure is measured (CUDA context, "
                  "buffers, allocator rounding are not in ours)"),
        dict(quantity="LoRA weights", paper="26 MB (0.2%)", ours=f"{_d(2 * n, 'MB')} ({100 * n / P:.2f}%)",
             ratio=_ratio(2 * n, 26e6),
             note=f"closest standard config: {name}, r = {r} ({n / 1e6:.1f}M params in bf16); the paper does not "
                  "say which (26 MB in 16 bits = 13M params = 0.19%)"),
        dict(quantity="input gradients, batch 1", paper="567 MB", ours=f"{_d(e.saved_activations, 'MB')} at T = {seq_len}",
             ratio=_ratio(e.saved_activations, 567e6),
             note=f"the paper states no sequence length, so T = {seq_len} is solved from our formula to give "
                  "567 MB: this row calibrates T, it checks nothing; the next row, at the same T, does"),
        dict(quantity="... with gradient checkpointing", paper="18 MB", ours=_d(ck.saved_activations, "MB"),
             ratio=_ratio(ck.saved_activations, 18e6),
             note=f"same T; ours keep {spec.n_layers} layer inputs + the fp32 log-probs (4 V T); the paper's "
                  f"567/18 = 31.5 ~ {spec.n_layers} layers suggests it counts about one layer's activations"),
    ]


def format_rows(rows: list[dict], ratios: bool = False) -> str:
    """The rows as an aligned text table: quantity, paper, ours, (with ``ratios``: ours/paper,) note."""
    check_flag("ratios", ratios)
    if ratios and not all("ratio" in r for r in rows):
        raise ValueError("ratios=True needs a 'ratio' in every row (the seed_* functions give one)")
    keys = ["quantity", "paper", "ours"] + (["ratio"] if ratios else []) + ["note"]
    head = [{"ratio": "ours/paper"}.get(k, k) for k in keys]
    return text_table(head, [[r[k] for k in keys] for r in rows], rule=False)
