"""What every benchmark shares: the device, one CPU thread, interleaved rounds, paired ratios, the models.

    interleaved(variants, rounds, repeat, warmup, device) -> {name: Timing}   variants timed in rotating rounds
    paired_ratio(a, b, repeat)                                               median of within-round ratios
    threads(n)                                                               CPU timings on n threads
    gpt2_medium / smollm2_shaped / step_batch                                the seeded random models they time

Timing itself is ``lorabook.timing`` (CUDA events on a GPU, perf_counter on the CPU, warm-ups, medians).
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

import lorabook
from ..timing import Timing, benchmark, torch_threads

__all__ = ["CPU_THREADS", "bench_device", "threads", "GPT2_SIZES", "gpt2_config", "gpt2_model", "gpt2_medium", "smollm2_shaped", "step_batch", "interleaved",
           "paired_ratio", "nothing"]

CPU_THREADS = 1  # see ``_threads``


def bench_device() -> torch.device:
    """Where the benchmarks run: lorabook's device picker (CUDA, then MPS, then the CPU)."""
    return lorabook.device()


@contextmanager
def threads(n: int = CPU_THREADS):
    """Run the CPU timings on ``n`` threads. On a shared machine, torch's threads wait for each other at every
    op whenever one is descheduled: with 2 threads under load we saw medians swing 10x run to run, with one
    the spread is a few percent. Ratios, not absolute speed, are what these benchmarks report."""
    with torch_threads(n):
        yield


GPT2_SIZES = {"gpt2-toy": dict(n_layer=2, n_embd=256, n_head=4), "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
              "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16)}


def gpt2_config(config="gpt2-medium"):
    """A GPT2Config (sdpa attention): "gpt2-medium" (L 24, d 1024, 16 heads, 355M), "gpt2" (L 12, d 768),
    "gpt2-toy" (L 2, d 256), or a GPT2Config passed in."""
    from transformers import GPT2Config

    if isinstance(config, GPT2Config):
        return config
    if config not in GPT2_SIZES:
        raise ValueError(f"config must be one of {sorted(GPT2_SIZES)} or a GPT2Config, got {config!r}")
    return GPT2Config(**GPT2_SIZES[config], attn_implementation="sdpa")


def gpt2_model(config="gpt2-medium", seed: int = 0) -> nn.Module:
    """A GPT2LMHeadModel of ``gpt2_config(config)`` with seeded random weights (latency does not depend on them),
    in eval mode; the global RNG is left as it was."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(gpt2_config(config)).eval()


def gpt2_medium(seed: int = 0, quick: bool = False) -> nn.Module:
    """GPT-2 medium's shape (n_layer 24, n_embd 1024, n_head 16) with seeded random weights; a 2-layer toy if quick."""
    return gpt2_model("gpt2-toy" if quick else "gpt2-medium", seed)


def smollm2_shaped(seed: int = 0, quick: bool = False) -> nn.Module:
    """A random Llama of SmolLM2-135M's shape (no download); lorabook.models.tiny_llama's default if quick."""
    from ..models import tiny_llama

    if quick:
        return tiny_llama(seed=seed)
    return tiny_llama(seed=seed, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536, vocab_size=49152,
                      max_seq_len=2048)


def step_batch(quick: bool, device, batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """The training-step benchmarks' model and batch: ``smollm2_shaped(quick)`` on ``device`` and seeded random
    token ids (batch, 128) ((2, 32) if quick)."""
    base = smollm2_shaped(quick=quick).to(device)
    shape = (2, 32) if quick else (batch, 128)
    ids = torch.randint(0, base.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)
    return base, ids


def interleaved(variants: dict[str, tuple[Callable, Callable, Callable]], rounds: int, repeat: int,
                warmup: int, device) -> dict[str, Timing]:
    """Time each variant's ``fn`` in ``rounds`` interleaved rounds of ``repeat`` calls (``warmup`` more in round 0).

    variants: name -> (setup, fn, teardown); setup/teardown (or None) put the variant's modules in and out of the
    model.
    Round k starts at the k-th variant (a rotation), so no variant always runs right after the same other one."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for rnd in range(rounds):
        for name in order[rnd % len(order):] + order[:rnd % len(order)]:
            setup, fn, teardown = variants[name]
            (setup or nothing)()
            try:
                times[name] += benchmark(fn, warmup=warmup if rnd == 0 else 0, repeat=repeat, device=device).times
            finally:
                (teardown or nothing)()
    return {name: Timing(times=t, device=str(device)) for name, t in times.items()}


def paired_ratio(a: Timing, b: Timing, repeat: int) -> float:
    """Median over rounds of (a's median / b's median) within the round: load that drifts between rounds,
    which moves both alike, cancels; a burst inside one round moves one ratio, which the median ignores."""
    chunks = lambda t: [statistics.median(t.times[i:i + repeat]) for i in range(0, len(t.times), repeat)]
    return statistics.median(x / y for x, y in zip(chunks(a), chunks(b)))


def nothing() -> None:
    pass
