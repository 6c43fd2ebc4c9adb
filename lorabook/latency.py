"""The seed's Table 1 (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the latency of one GPT-2 medium forward.

    rows = latency_table()            # base, merged LoRA, unmerged LoRA, Adapter^L, Adapter^H × (batch, seq)
    print(format_table(rows))

Every variant is built on one seeded random-weight GPT-2 (latency does not depend on the values) with
``lorabook.baselines``; each adapter or LoRA is sized to the paper's |Θ| per column (``size_for_budget``). The
paper's shapes (batch 32 × 512, 16 × 256, 1 × 128) run on CUDA; on a CPU both are divided by 8.

The overheads are a few percent, less than a shared machine's run-to-run spread, so they are measured **paired**
(``bracketed_rounds``): every call of a method sits between two calls of the base, and its ratio to their mean
is one sample — load that drifts over seconds cancels. The overhead is the median of those per-round ratios with
a percentile-bootstrap confidence interval (``ratio_ci``). On a CPU with one torch thread the clock can be the
thread's CPU time (``clock="thread"``, the default there): every op then runs in the calling thread, and time
spent waiting for a core while other programs run is not counted (their cache and memory traffic still is). ``extra_flops_pct`` is what the arithmetic alone
predicts: every adapter or unmerged-LoRA weight does one multiply-add per token.
"""
from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from . import lora
from ._checks import check_int, check_number, check_positive_int
from ._table import text_table
from .baselines import prepare
from .bench.harness import gpt2_config, gpt2_model
from .timing import benchmark

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


CLOCKS = ("wall", "thread")


def pick_clock(clock: str | None, device) -> str:
    """``clock`` checked, or the default: "thread" (CPU time of this thread) on a CPU with one torch thread,
    else "wall" (``lorabook.timing``: CUDA events on a GPU, perf_counter on a CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    one_cpu_thread = dev.type == "cpu" and torch.get_num_threads() == 1
    if clock is None:
        return "thread" if one_cpu_thread else "wall"
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS} or None, got {clock!r}")
    if clock == "thread" and not one_cpu_thread:
        raise ValueError("clock='thread' needs a CPU device and torch.set_num_threads(1): with more threads, or on "
                         "a GPU, the work runs outside the calling thread")
    return clock


def _seconds(fn: Callable[[], object], clock: str, device) -> float:
    """One call of ``fn``, in seconds of ``clock``."""
    if clock == "wall":
        return benchmark(fn, warmup=0, repeat=1, device=device).times[0]
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def bracketed_rounds(fns: dict[str, Callable[[], object]], base: str, rounds: int, warmup: int = 1, device=None,
                     seed: int = 0, clock: str | None = None) -> dict[str, dict[str, list[float]]]:
    """Time ``fns`` in ``rounds`` rounds of  base, m1, base, m2, base, …, base  (the other methods in a seeded
    random order each round), one call each, on ``clock`` (``pick_clock``).

    Returns name -> {"times": seconds of every call, "ratios": one per round (not for ``base``): the call's time
    over the mean of the two base calls around it}. A load change slower than three calls moves both sides of
    a ratio alike; a burst inside one moves one ratio, which a median ignores.
    """
    if base not in fns:
        raise ValueError(f"base must be one of {sorted(fns)}, got {base!r}")
    check_positive_int("rounds", rounds)
    others = [m for m in fns if m != base]
    if not others:
        raise ValueError("fns must hold at least one method besides the base")
    clock = pick_clock(clock, device)
    out = {m: {"times": [], "ratios": []} for m in fns}
    once = lambda m: _seconds(fns[m], clock, device)  # noqa: E731
    check_int("warmup", warmup, low=0)
    for m in fns:  # warm every variant up (allocator, lazy init) before anything counts
        for _ in range(warmup):
            fns[m]()
    rng = random.Random(seed)
    for _ in range(rounds):
        order = rng.sample(others, len(others))
        before = once(base)
        out[base]["times"].append(before)
        for m in order:
            t = once(m)
            after = once(base)
            out[m]["times"].append(t)
            out[m]["ratios"].append(t / (0.5 * (before + after)))
            out[base]["times"].append(after)
            before = after
    return out


def ratio_ci(ratios: list[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
             ) -> tuple[float, float, float]:
    """(median, low, high) of paired ratios: the median and its percentile-bootstrap ``confidence`` interval
    (resample the rounds with replacement ``n_boot`` times, take each resample's median)."""
    check_number("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    check_positive_int("n_boot", n_boot)
    values = [float(r) for r in ratios]
    if len(values) < 2 or not all(v > 0 and v == v and v != float("inf") for v in values):
        raise ValueError(f"ratios must hold at least 2 finite positive numbers, got {len(values)} values")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    tail = (1 - confidence) / 2
    lo, hi = meds[int(tail * (n_boot - 1))], meds[int(round((1 - tail) * (n_boot - 1)))]
    return statistics.median(values), lo, hi


def forward_flops(config, batch: int, seq: int) -> int:
    """Multiply-add FLOPs (2 per weight per token) of one GPT-2 forward: 12·d² per layer per token (c_attn 3d²,
    c_proj d², MLP 8d²), attention scores and their use 2·seq·d per layer per token, and the output head d·V."""
    cfg = gpt2_config(config)
    check_positive_int("batch", batch), check_positive_int("seq", seq)
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    return 2 * batch * seq * (L * (12 * d * d + 2 * seq * d) + d * V)


def extra_flops_pct(method: str, trainable: int, config, batch: int, seq: int) -> float:
    """What arithmetic alone predicts for ``method``'s overhead (%): an adapter or unmerged LoRA adds one
    multiply-add per trainable weight per token (2·|Θ| FLOPs); merged LoRA and the base add nothing."""
    if method not in LATENCY_METHODS:
        raise ValueError(f"method must be one of {LATENCY_METHODS}, got {method!r}")
    check_int("trainable", trainable, low=0)
    if method in ("base", "lora_merged"):
        return 0.0
    return 100 * 2 * trainable * batch * seq / forward_flops(config, batch, seq)


def latency_table(config="gpt2-medium", shapes=None, budgets=PAPER_BUDGETS, methods=LATENCY_METHODS,
                  warmup: int = 1, rounds: int = 5, device=None, seed: int = 0, confidence: float = 0.95,
                  clock: str | None = None) -> list[dict]:
    """Table 1 again: one forward pass (eval, no_grad, seeded random weights) per method and (batch, seq).

    shapes: None = the paper's on CUDA, CPU_SHAPES on a CPU. budgets: |Θ| per shape (sizes from size_for_budget).
    Timed by ``bracketed_rounds`` (each method between two base calls, ``rounds`` rounds) on ``clock``.
    Rows: method, batch, seq, size (m or r), trainable (|Θ|), ms (median), iqr_ms, overhead_pct (median paired
    ratio − 1, in %), ci_low_pct / ci_high_pct (its bootstrap ``confidence`` interval), flops_pct
    (``extra_flops_pct``), clock, and ratios (one per round; the base row has none and overhead 0).
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
    if bad or "base" not in methods or len(methods) < 2:
        raise ValueError(f"methods must include 'base', one more method, and come from {LATENCY_METHODS}, "
                         f"got {methods}")
    check_positive_int("rounds", rounds)
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (a confidence interval needs two ratios), got {rounds}")
    check_number("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    clock = pick_clock(clock, dev)
    base = gpt2_model(cfg, seed).to(dev)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, cfg.vocab_size, shape, generator=gen).to(dev) for shape in shapes]
    rows = []
    for (b, s), budget, x in zip(shapes, budgets, inputs):
        sizes = {m: 0 if m == "base" else size_for_budget(m, cfg, budget) for m in methods}
        variants = {m: _variant(base, m, sizes[m]) for m in methods}
        models = {m: model.eval() for m, (model, _) in variants.items()}
        forward = lambda model: lambda: model(x, use_cache=False)  # noqa: E731
        with torch.no_grad():
            timed = bracketed_rounds({m: forward(models[m]) for m in methods}, "base", rounds=rounds,
                                     warmup=warmup, device=dev, seed=seed, clock=clock)
        for m in methods:
            times = timed[m]["times"]
            q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
            med, lo, hi = (1.0, 1.0, 1.0) if m == "base" else ratio_ci(timed[m]["ratios"], confidence)
            rows.append(dict(method=m, batch=b, seq=s, size=sizes[m], trainable=variants[m][1],
                             ms=statistics.median(times) * 1e3, iqr_ms=(q[2] - q[0]) * 1e3,
                             overhead_pct=100 * (med - 1), ci_low_pct=100 * (lo - 1), ci_high_pct=100 * (hi - 1),
                             flops_pct=extra_flops_pct(m, variants[m][1], cfg, b, s), clock=clock,
                             ratios=[round(r, 5) for r in timed[m]["ratios"]]))
        variants = models = None  # free this shape's copies (a merged one holds its own weights) first
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``latency_table`` as a text table (overhead: median paired ratio, its confidence interval,
    and the FLOPs' prediction). Rows of an earlier sweep without a paired interval show "—" there."""
    def ci(r):
        if r["method"] == "base":
            return ""
        return "—" if "ci_low_pct" not in r else f"[{r['ci_low_pct']:+.1f}, {r['ci_high_pct']:+.1f}]"
    flops = lambda r: "—" if "flops_pct" not in r else f"+{r['flops_pct']:.1f}%"  # noqa: E731
    return text_table(["method", "batch", "seq", "size", "|Θ|", "ms", "±iqr", "overhead", "95% CI", "FLOPs"],
                      [[r["method"], r["batch"], r["seq"], r["size"], f"{r['trainable']:,}", f"{r['ms']:.1f}",
                        f"{r['iqr_ms']:.1f}", f"{r['overhead_pct']:+.1f}%", ci(r), flops(r)]
                       for r in rows], align="<>>>>>>>>>", rule=False)
