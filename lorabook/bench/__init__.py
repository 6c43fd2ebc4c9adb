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

from .._table import text_table

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


def format_table(name: str, rows: list[dict], device: str | None = None) -> str:
    """``== name on device ==`` and the rows: case, metric, lorabook, peer, peer value, ratio (and exact=...).

    device: where the rows were measured (default: this machine's ``device_name()``)."""
    table = text_table(["case", "metric", "lorabook", "peer", "peer value", "ratio", ""],
                       [[r["case"], r["metric"], f"{r['lorabook']:.6g}", r["peer"], f"{r['peer_value']:.6g}",
                         f"{r['ratio']:.3f}", f"exact={r['exact']}" if "exact" in r else ""] for r in rows],
                       align="<<><>><")
    return f"== {name} on {device or device_name()} ==\n{table}"
