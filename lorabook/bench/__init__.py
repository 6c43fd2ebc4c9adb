"""``python -m lorabook.bench NAME [--json]``: each benchmark measures lorabook against its peer in one run.

One module per benchmark (``memory``, ``lora`` (lora-latency, lora-step), ``nf4``, ``paged``, ``qlora``
(qlora-step)); ``harness`` holds what they share; ``__main__`` the command line.

A benchmark is a function returning rows; a row compares one number of lorabook's with the peer's:

    {"case": str, "metric": "seconds" | "bytes" | "tokens_per_s" | ..., "lorabook": float,
     "peer": str, "peer_value": float, "ratio": lorabook / peer_value}   (optionally "exact": bool)

Without ``--json`` the rows print as a table; with it, one JSON object goes to stdout:
``{"benchmark": NAME, "device": "cpu" | "cuda:...", "rows": [...]}``. Speed and memory goals live here,
never in tests (tests do not assert wall-clock times).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BENCHMARKS", "register", "row", "device_name", "format_table"]

BENCHMARKS: dict[str, Callable[..., list[dict]]] = {}


def register(name: str):
    """Decorator: make a ``fn(quick: bool) -> rows`` runnable as ``python -m lorabook.bench name``."""
    def wrap(fn):
        BENCHMARKS[name] = fn
        return fn
    return wrap


def row(case: str, metric: str, lorabook: float, peer: str, peer_value: float, **extra) -> dict:
    """One comparison; ``ratio`` is lorabook / peer, both measured in the same run."""
    ratio = float(lorabook) / float(peer_value) if peer_value else float("nan")
    return {"case": case, "metric": metric, "lorabook": float(lorabook), "peer": peer,
            "peer_value": float(peer_value), "ratio": ratio, **extra}


def device_name() -> str:
    """"cuda:<card>" on a GPU, else the device's type ("cpu", "mps")."""
    import lorabook

    dev = lorabook.device()
    return f"cuda:{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else dev.type


def format_table(name: str, rows: list[dict]) -> str:
    head = f"{'case':<40} {'metric':<10} {'lorabook':>14} {'peer':<22} {'peer value':>14} {'ratio':>7}"
    lines = [f"== {name} on {device_name()} ==", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<40} {r['metric']:<10} {r['lorabook']:>14.6g} {r['peer']:<22} "
                     f"{r['peer_value']:>14.6g} {r['ratio']:>7.3f}" + ("" if "exact" not in r else
                                                                         f"  exact={r['exact']}"))
    return "\n".join(lines)
