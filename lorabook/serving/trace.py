"""Fragmentation on a request trace: the paged pool against contiguous ranges (S-LoRA §4.1, measured).

A seeded trace of requests (arrival step, prompt and output lengths, adapter) is served step by step by a scheduler
that admits requests first come, first served while memory allows, and frees a request's memory when it finishes.
The memory holds the keys and values of the running requests and the adapters they use (an adapter stays loaded
until its memory is needed by a request that cannot otherwise start, least recently used first). Two allocators:

    paged        ``PagedPool``: any free page serves any need, so a request fits when enough pages are free
    contiguous   ``ContiguousAllocator``: each request's keys and values (for its prompt and all of its output) and
                 each adapter in one range, first fit -- free memory split into holes may fit nothing

Units: pages of H values (one token's [k | v] in one layer is ``kv_pages`` pages; a rank-r adapter on one H × H
linear is 2r pages). ``simulate`` returns the steps the trace took, the mean number of running requests, and the
free memory at refusals (memory that was free but could not be used).
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from .._checks import bad_choice, check_int
from .pool import ContiguousAllocator, PagedPool, PoolExhausted

__all__ = ["TraceRequest", "request_trace", "simulate"]


@dataclass(frozen=True)
class TraceRequest:
    arrival: int      # the step it arrives at
    prompt: int       # tokens
    output: int       # tokens it will generate
    adapter: int      # which adapter (an index into the adapters' sizes)


def request_trace(n: int, n_adapters: int, seed: int = 0, rate: float = 2.0, prompt=(16, 256),
                  output=(16, 256)) -> list[TraceRequest]:
    """n requests, about ``rate`` arriving per step (exponential gaps), lengths uniform in the ranges, adapters
    drawn with a skew (adapter k with weight 1 / (k + 1), as a few adapters get most of the traffic)."""
    check_int("n", n, low=1)
    check_int("n_adapters", n_adapters, low=1)
    rng, t, out = random.Random(seed), 0.0, []
    weights = [1 / (k + 1) for k in range(n_adapters)]
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(int(t), rng.randint(*prompt), rng.randint(*output),
                                rng.choices(range(n_adapters), weights)[0]))
    return out


def simulate(trace: list[TraceRequest], capacity: int, adapter_pages: list[int], kv_pages: int,
             allocator: str = "paged", max_batch: int = 32) -> dict:
    """Serve ``trace`` in ``capacity`` pages with the chosen allocator -> {"steps", "mean_running",
    "refusals", "free_at_refusal" (mean fraction of capacity free when a request could not start)}."""
    if allocator not in ("paged", "contiguous"):
        raise bad_choice("allocator", allocator, ["paged", "contiguous"])
    check_int("capacity", capacity, low=1)
    memory = PagedPool(capacity, 1) if allocator == "paged" else ContiguousAllocator(capacity)
    need = lambda r: (r.prompt + r.output) * kv_pages
    for r in trace:
        if need(r) + adapter_pages[r.adapter] > capacity:
            raise ValueError(f"a request needs {need(r) + adapter_pages[r.adapter]} pages with its adapter, more "
                             f"than the capacity of {capacity}")
    loaded: OrderedDict[int, None] = OrderedDict()        # adapters in memory, least recently used first
    waiting, running, step, running_sum, refusals, free_sum = list(trace), [], 0, 0, 0, 0.0
    free = lambda: memory.free_pages if allocator == "paged" else capacity - memory.used

    def make_room(owner: str, size: int, keep: set) -> bool:
        """Allocate, evicting idle adapters (least recently used first, none in ``keep``) until it fits."""
        while True:
            try:
                memory.allocate(owner, size)
                return True
            except PoolExhausted:
                idle = next((a for a in loaded if a not in keep), None)
                if idle is None:
                    return False
                memory.release(f"adapter {idle}")
                del loaded[idle]

    while waiting or running:
        while waiting and waiting[0].arrival <= step and len(running) < max_batch:
            r = waiting[0]
            keep = {x.adapter for x, _ in running} | {r.adapter}
            fits = r.adapter in loaded or make_room(f"adapter {r.adapter}", adapter_pages[r.adapter], keep)
            if fits:
                loaded[r.adapter] = None
                loaded.move_to_end(r.adapter)
                fits = make_room(f"request {id(r)}", need(r), keep)
            if not fits:
                refusals, free_sum = refusals + 1, free_sum + free() / capacity
                break
            running.append((r, step + r.output))
            waiting.pop(0)
        step += 1
        running_sum += len(running)
        for r, end in [x for x in running if x[1] <= step]:
            memory.release(f"request {id(r)}")
            running.remove((r, end))
        if not running and waiting and waiting[0].arrival > step:
            step = waiting[0].arrival                     # idle until the next arrival
    return {"steps": step, "mean_running": running_sum / max(step, 1), "refusals": refusals,
            "free_at_refusal": free_sum / refusals if refusals else 0.0}
