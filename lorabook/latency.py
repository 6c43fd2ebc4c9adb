"""The seed's Table 1 (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the latency of one GPT-2 medium forward.

    rows = latency_table()            # base, merged LoRA, unmerged LoRA, Adapter^L, Adapter^H × (batch, seq)
    print(format_table(rows))

Every variant is built on one seeded random-weight GPT-2 (latency does not depend on the values) with
``lorabook.baselines``; each adapter or LoRA is sized to the paper's |Θ| per column (``size_for_budget``). The
paper's shapes (batch 32 × 512, 16 × 256, 1 × 128) run on CUDA; on a CPU both are divided by 8. Methods are timed
in interleaved rounds, so a change in the machine's load hits them all.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import lora
from ._checks import check_number, check_positive_int
from ._table import text_table
from .baselines import prepare
from .bench.harness import gpt2_config, gpt2_model, interleaved

PAPER_SHAPES = ((32, 512), (16, 256), (1, 128))  # (batch, seq) of Table 1's columns
PAPER_BUDGETS = (0.5e6, 11e6, 11e6)  # its |Θ| row: trainable parameters of the adapter / LoRA in each column
CPU_SHAPES = ((4, 64), (2, 32), (1, 16))  # batch and sequence both / 8: seconds, not minutes, on a CPU
LATENCY_METHODS = ("base", "lora_merged", "lora", "adapter_l", "adapter_h")


def size_for_budget(method: str, config, budget: float) -> int:
    """The bottleneck m (adapters) or rank r (LoRA on c_attn) whose |Θ| on a GPT-2 config is nearest ``budget``.

    adapter_h: 2L(2dm + d + m) · adapter_l: L(2dm + m + 3d) · lora: L·r·(d + 3d) = 4Ldr (= q and v at rank r).
    GPT-2 medium: 0.5M → m 5 / m 9 / r 5 (541k / 516k / 492k); 11M → m 111 / m 222 / r 112 (11.0M each).
    """
    check_number("budget", budget, low=0, low_open=True)
    L, d = config.num_hidden_layers, config.hidden_size
    per = {"adapter_h": ((budget / (2 * L) - d) / (2 * d + 1)), "adapter_l": (budget / L - 3 * d) / (2 * d + 1),
           "lora": budget / (4 * L * d), "lora_merged": budget / (4 * L * d)}
    if method not in per:
        raise ValueError(f"method must be one of {sorted(per)}, got {method!r}")
    size = max(1, round(per[method]))
    return min(size, d) if method.startswith("lora") else size


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are the original's tensors (no extra 1.4 GB per method)."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def _merge(model: nn.Module) -> nn.Module:
    """Merged LoRA (W ← W0 + ΔW, plain layers again); each wrapped layer first gets its own copy of W0,
    because merging adds in place and W0 is shared with the base and the other variants."""
    for layer in lora.lora_layers(model).values():
        layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
    return lora.merge_and_unload(model)


def _variant(base: nn.Module, method: str, size: int) -> tuple[nn.Module, int]:
    """(the model to time, its |Θ|) -- LoRA's |Θ| is counted before merging folds it into W."""
    if method == "base":
        return base, 0
    model = _shared_copy(base)
    if method in ("lora", "lora_merged"):
        prepare(model, "lora", r=size, alpha=2 * size)
    else:
        prepare(model, method, bottleneck=size)
    trainable = lora.count_trainable(model)[0]
    return (_merge(model) if method == "lora_merged" else model), trainable


def latency_table(config="gpt2-medium", shapes=None, budgets=PAPER_BUDGETS, methods=LATENCY_METHODS,
                  warmup: int = 1, repeat: int = 1, rounds: int = 5, device=None, seed: int = 0) -> list[dict]:
    """Table 1 again: one forward pass (eval, no_grad, seeded random weights) per method and (batch, seq).

    shapes: None = the paper's on CUDA, CPU_SHAPES on a CPU. budgets: |Θ| per shape (sizes from size_for_budget).
    Each round times every method in turn, ``repeat`` calls each, starting one method later than the round
    before (so a busy machine slows them alike); the median is over all rounds' calls. On a shared CPU many
    short rounds beat a few long ones.
    Rows: method, batch, seq, size (m or r), trainable (|Θ|), ms (median), iqr_ms, overhead_pct (vs base).
    """
    import lorabook

    cfg = gpt2_config(config)
    dev = torch.device(device) if device is not None else lorabook.device()
    shapes = tuple(shapes) if shapes is not None else (PAPER_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    for b, s in shapes:
        check_positive_int("batch", b), check_positive_int("seq", s)
        if s > cfg.n_positions:
            raise ValueError(f"seq {s} exceeds the config's n_positions {cfg.n_positions}")
    if len(budgets) != len(shapes):
        raise ValueError(f"budgets must give one |Θ| per shape: {len(budgets)} budgets for {len(shapes)} shapes")
    methods = tuple(methods)
    bad = [m for m in methods if m not in LATENCY_METHODS]
    if bad or "base" not in methods:
        raise ValueError(f"methods must include 'base' and come from {LATENCY_METHODS}, got {methods}")
    for name, value in (("repeat", repeat), ("rounds", rounds)):
        check_positive_int(name, value)
    base = gpt2_model(cfg, seed).to(dev)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, cfg.vocab_size, shape, generator=gen).to(dev) for shape in shapes]
    rows = []
    for (b, s), budget, x in zip(shapes, budgets, inputs):
        sizes = {m: 0 if m == "base" else size_for_budget(m, cfg, budget) for m in methods}
        variants = {m: _variant(base, m, sizes[m]) for m in methods}
        models = {m: model.eval() for m, (model, _) in variants.items()}
        forward = lambda model: lambda: model(x, use_cache=False)  # noqa: E731
        with torch.no_grad():  # rounds rotate: no method always runs first, or right after the same other one
            timings = interleaved({m: (None, forward(models[m]), None) for m in methods}, rounds=rounds,
                                  repeat=repeat, warmup=warmup, device=dev)
        base_ms = timings["base"].median * 1e3
        for m in methods:
            t = timings[m]
            rows.append(dict(method=m, batch=b, seq=s, size=sizes[m], trainable=variants[m][1], ms=t.median * 1e3,
                             iqr_ms=t.iqr * 1e3, overhead_pct=100 * (t.median * 1e3 / base_ms - 1)))
        variants = models = None  # free this shape's copies (a merged one holds its own weights) first
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``latency_table`` as a text table."""
    return text_table(["method", "batch", "seq", "size", "|Θ|", "ms", "±iqr", "overhead"],
                      [[r["method"], r["batch"], r["seq"], r["size"], f"{r['trainable']:,}", f"{r['ms']:.2f}",
                        f"{r['iqr_ms']:.2f}", f"{r['overhead_pct']:+.1f}%"] for r in rows], align="<>>>>>>>", rule=False)
