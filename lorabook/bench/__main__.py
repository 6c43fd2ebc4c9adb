"""``python -m lorabook.bench NAME [--json] [--quick]``: the command line of ``lorabook.bench``."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable

from .._io import write_text
from . import BENCHMARKS, __doc__ as bench_doc, device_name, format_table


def load_all() -> dict[str, Callable[..., list[dict]]]:
    """Import every benchmark module (each registers its benchmarks in ``lorabook.bench.BENCHMARKS``)."""
    from . import lora, memory, nf4, paged, qalora, qlora, s2attn, serving  # noqa: F401  (lora-latency, lora-step;
    #                                                       memory; nf4; paged; qalora; qlora-step; s2attn; serving)
    return BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns at import about an optional CPU kernel
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # peft calls deprecated API
    benchmarks = load_all()
    parser = argparse.ArgumentParser(prog="python -m lorabook.bench", description=bench_doc.splitlines()[0])
    parser.add_argument("name", help=f"one of {sorted(benchmarks)} or 'all'")
    parser.add_argument("--json", action="store_true", help="print one JSON object per benchmark on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller cases (a smoke run)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object (with the date) to FILE, e.g. "
                                                      "data/bench_nf4.json for notebook 04 (one benchmark only)")
    args = parser.parse_args(argv)
    if args.name != "all" and args.name not in benchmarks:
        parser.error(f"unknown benchmark {args.name!r}; choose one of {sorted(benchmarks)} or 'all'")
    if args.out and args.name == "all":
        parser.error("--out FILE takes one benchmark's result; name one, not 'all'")
    names = sorted(benchmarks) if args.name == "all" else [args.name]
    for name in names:
        rows = benchmarks[name](quick=args.quick)
        result = {"benchmark": name, "device": device_name(), "rows": rows}
        print(json.dumps(result) if args.json else format_table(name, rows))
        if args.out:
            result["when"] = datetime.date.today().isoformat()
            write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
