"""``python -m lorabook.bench NAME [--json]``: each benchmark measures lorabook against its peer in one run.

A benchmark is a function returning rows; a row compares one number of lorabook's with the peer's:

    {"case": str, "metric": "seconds" | "bytes" | "tokens_per_s" | ..., "lorabook": float,
     "peer": str, "peer_value": float, "ratio": lorabook / peer_value}   (optionally "exact": bool)

Without ``--json`` the rows print as a table; with it, one JSON object goes to stdout:
``{"benchmark": NAME, "device": "cpu" | "cuda:...", "rows": [...]}``. Speed and memory goals live here,
never in tests (tests do not assert wall-clock times).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Callable

import torch

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
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return "cpu"


def format_table(name: str, rows: list[dict]) -> str:
    head = f"{'case':<40} {'metric':<10} {'lorabook':>14} {'peer':<22} {'peer value':>14} {'ratio':>7}"
    lines = [f"== {name} on {device_name()} ==", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<40} {r['metric']:<10} {r['lorabook']:>14.6g} {r['peer']:<22} "
                     f"{r['peer_value']:>14.6g} {r['ratio']:>7.3f}" + ("" if "exact" not in r else
                                                                         f"  exact={r['exact']}"))
    return "\n".join(lines)


def _load_all() -> dict[str, Callable[..., list[dict]]]:
    """Import the modules that register benchmarks (each keeps its benchmark next to its code).

    Returns the registry of the importable ``lorabook.bench``: under ``python -m`` this file also runs as
    ``__main__``, a second module object whose own BENCHMARKS the others never see."""
    import lorabook.bench as registry
    from . import memory  # noqa: F401  (registers "memory")
    from . import lora_bench  # noqa: F401
    from . import nf4_bench  # noqa: F401  (registers "nf4")
    from . import paged_bench  # noqa: F401  (registers "paged")
    from . import qlora_bench  # noqa: F401  (registers "qlora-step")
    return registry.BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns at import about an optional CPU kernel
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # peft calls deprecated API
    benchmarks = _load_all()
    parser = argparse.ArgumentParser(prog="python -m lorabook.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of {sorted(benchmarks)} or 'all'")
    parser.add_argument("--json", action="store_true", help="print one JSON object per benchmark on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller cases (a smoke run)")
    args = parser.parse_args(argv)
    if args.name != "all" and args.name not in benchmarks:
        parser.error(f"unknown benchmark {args.name!r}; choose one of {sorted(benchmarks)} or 'all'")
    names = sorted(benchmarks) if args.name == "all" else [args.name]
    for name in names:
        rows = benchmarks[name](quick=args.quick)
        if args.json:
            print(json.dumps({"benchmark": name, "device": device_name(), "rows": rows}))
        else:
            print(format_table(name, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
