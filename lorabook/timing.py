"""One timer for every timed demo and benchmark: CUDA events on a GPU, ``perf_counter`` on a CPU.

A GPU runs asynchronously: wall-clock time around a kernel launch measures the launch, not the work. CUDA
events are recorded in the stream and read after a synchronize, so they time the work itself. On a CPU the
work is synchronous and ``time.perf_counter`` is right. Either way we warm up first (allocator, caches,
lazy initialisation) and report the median of the repeats, which a stray slow run does not move.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._checks import check_int, check_positive_int


@dataclass
class Timing:
    """Seconds per call over ``repeat`` runs after ``warmup`` untimed ones."""

    times: list[float] = field(repr=False)
    device: str

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        """Spread: the middle half of the runs lies within this many seconds."""
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms (median of {len(self.times)}, ±{self.iqr * 1e3:.3f} IQR, {self.device})"


def _device_of(device) -> torch.device:
    if device is None:
        import lorabook
        return lorabook.device()  # the one device picker
    return torch.device(device)


def benchmark(fn: Callable[[], object], warmup: int = 3, repeat: int = 10, device=None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones; CUDA events when on CUDA."""
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    check_int("warmup", warmup, low=0)
    check_positive_int("repeat", repeat)
    dev = _device_of(device)
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
    else:  # the CPU; on Apple's MPS the queue is drained before each reading
        sync = torch.mps.synchronize if dev.type == "mps" else (lambda: None)
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return Timing(times=times, device=str(dev))


@contextmanager
def torch_threads(n: int | None):
    """Inside, torch's CPU ops use ``n`` threads (None or 0: as they were); the count is restored after, so a
    command run in a notebook's process (``lorabook.train.__main__.main``) does not change the notebook's."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(check_positive_int("n", n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
