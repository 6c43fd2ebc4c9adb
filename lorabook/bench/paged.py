"""``python -m lorabook.bench paged``: one AdamW step of ``PagedAdamW`` against torch's AdamW and bitsandbytes'
PagedAdamW, and of ``AdamW8bit`` against bitsandbytes' AdamW8bit, in the same run.

The parameters: 16 matrices of 1024 × 1024 fp32 (16.8 M parameters, 134 MB of AdamW state; ``--quick``: 16 of
128 × 128), each with a fixed gradient. We time one ``step()``:

    lorabook, no budget      vs torch.optim.AdamW(foreach=False)   the same update op for op (exact=True expected)
                             vs torch.optim.AdamW (foreach)        torch's default: one kernel over many tensors
                             vs bitsandbytes PagedAdamW            its CPU path (no unified memory on a CPU)
    lorabook, budget 1/4     vs lorabook, no budget                the cost of paging: with a budget of a quarter
                                                                   of the state, a step evicts and re-fetches all
                                                                   of it (a cyclic sweep defeats LRU)
    lorabook AdamW8bit       vs bitsandbytes AdamW8bit             8-bit m and v (blocks of 256): time, exact, and
                                                                   the bytes of state each keeps
    lorabook PagedAdamW8bit  vs bitsandbytes PagedAdamW8bit        the 8-bit state in pages, budget 1/4 of it
                                                                   (bitsandbytes does not page on a CPU)

``exact`` compares the parameters after 3 steps from the same start. On a CPU "device" and "host" are one memory,
so a page move is a memcpy; on a GPU it is a PCIe copy, and the paging row is the one to watch.
"""
from __future__ import annotations

import warnings

import torch

from . import register, row
from .harness import bench_device, interleaved, nothing, paired_ratio, threads
from ..adamw8bit import AdamW8bit, state8_bytes
from ..paged import PagedAdamW, PagedAdamW8bit, PageStats

LR = 1e-3


def _parameters(quick: bool, device, seed: int = 0) -> list[torch.nn.Parameter]:
    side = 128 if quick else 1024
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(16):
        p = torch.nn.Parameter(torch.randn(side, side, generator=g).to(device))
        p.grad = torch.randn(side, side, generator=g).to(device) * 1e-2
        params.append(p)
    return params


def _after_steps(make, quick: bool, device, steps: int = 3) -> list[torch.Tensor]:
    params = _parameters(quick, device)
    optimizer = make(params)
    for _ in range(steps):
        optimizer.step()
    return [p.detach() for p in params]


@register("paged")
def paged_bench(quick: bool = False) -> list[dict]:
    with threads(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")  # bnb, each state
        return _paged_bench(quick)


def _paged_bench(quick: bool) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an optional CPU kernel package bitsandbytes looks for
        import bitsandbytes

    dev = bench_device()
    state_bytes = 2 * 4 * 16 * (128 if quick else 1024) ** 2  # m and v, fp32
    page_bytes = 2 ** 16 if quick else 2 ** 20
    state8 = 16 * state8_bytes((128 if quick else 1024) ** 2)  # AdamW8bit's: 2 bytes per parameter + 8 per block
    makers = {
        "lorabook": lambda ps: PagedAdamW(ps, lr=LR, page_bytes=page_bytes),
        "lorabook budget 1/4": lambda ps: PagedAdamW(ps, lr=LR, page_bytes=page_bytes, budget_bytes=state_bytes // 4),
        "torch loop": lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True),
        "bnb": lambda ps: bitsandbytes.optim.PagedAdamW(ps, lr=LR),
        "lorabook 8bit": lambda ps: AdamW8bit(ps, lr=LR),
        "bnb 8bit": lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=LR),
        "lorabook paged 8bit": lambda ps: PagedAdamW8bit(ps, lr=LR, page_bytes=page_bytes,
                                                         budget_bytes=state8 // 4),
        "bnb paged 8bit": lambda ps: bitsandbytes.optim.PagedAdamW8bit(ps, lr=LR),
    }
    results = {name: _after_steps(make, quick, dev) for name, make in makers.items()}
    ours = lambda name: "lorabook 8bit" if name.endswith("8bit") else "lorabook"  # noqa: E731  what it is compared with
    # (the paged 8-bit result is compared with bitsandbytes' 8-bit one, like every "8bit" row: all must be equal)
    exact = {name: all(torch.equal(a, b) for a, b in zip(results[ours(name)], result)) for name, result in results.items()}
    optimizers = {name: make(_parameters(quick, dev)) for name, make in makers.items()}
    for optimizer in optimizers.values():
        optimizer.step()  # the state exists before timing starts
    repeat = 2 if quick else 3
    t = interleaved({name: (nothing, optimizer.step, nothing) for name, optimizer in optimizers.items()},
                    rounds=3 if quick else 5, repeat=repeat, warmup=1, device=dev)
    case = f"16 x {128 if quick else 1024}^2 fp32 step"
    peers = {"torch loop": "torch AdamW foreach=False", "torch foreach": "torch AdamW (foreach)",
             "bnb": f"bitsandbytes {bitsandbytes.__version__} PagedAdamW"
                    + (" (unpaged on CPU)" if dev.type == "cpu" else "")}
    rows = [row(case, "seconds", t["lorabook"].median, label, t[name].median, exact=exact[name],
                paired_ratio=paired_ratio(t["lorabook"], t[name], repeat)) for name, label in peers.items()]
    pool = next(iter(optimizers["lorabook budget 1/4"].pools.values()))
    pool.stats = PageStats()
    optimizers["lorabook budget 1/4"].step()  # one more step, counted
    rows += [row(f"{case}, budget 1/4", "seconds", t["lorabook budget 1/4"].median, "lorabook, no budget",
                 t["lorabook"].median, exact=exact["lorabook budget 1/4"]),
             row(f"{case}, budget 1/4", "bytes paged in per step", pool.stats.bytes_in,
                 "state bytes", state_bytes, peak_device_bytes=pool.stats.peak_device_bytes)]
    held = {name: sum(v.numel() * v.element_size() for st in optimizers[name].state.values() for k, v in st.items()
                      if isinstance(v, torch.Tensor) and not k.startswith("qmap"))  # the maps are shared constants
            for name in ("lorabook 8bit", "bnb 8bit")}
    label8 = f"bitsandbytes {bitsandbytes.__version__} AdamW8bit"
    rows += [row(f"{case}, 8-bit state", "seconds", t["lorabook 8bit"].median, label8, t["bnb 8bit"].median,
                 exact=exact["bnb 8bit"], paired_ratio=paired_ratio(t["lorabook 8bit"], t["bnb 8bit"], repeat)),
             row(f"{case}, 8-bit state", "bytes of state", held["lorabook 8bit"], label8, held["bnb 8bit"])]
    rows += [row(f"{case}, 8-bit state in pages, budget 1/4", "seconds", t["lorabook paged 8bit"].median,
                 f"bitsandbytes {bitsandbytes.__version__} PagedAdamW8bit" + (" (unpaged on CPU)" if dev.type == "cpu"
                                                                              else ""),
                 t["bnb paged 8bit"].median, exact=exact["bnb paged 8bit"] and exact["lorabook paged 8bit"],
                 paired_ratio=paired_ratio(t["lorabook paged 8bit"], t["bnb paged 8bit"], repeat))]
    return rows
