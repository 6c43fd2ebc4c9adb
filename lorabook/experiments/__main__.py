"""``python -m lorabook.experiments table1 | subspace | transfer | merge | peft | scaling | longlora | table2 table5
table6 qlora | qalora [--shard k/n] [--dry-run]``: the sweeps behind notebooks 03, 07, 08 and 09, written to data/
(see ``lorabook.experiments``, its ``subspace``, ``qlora_eval``, ``qlora_merge``, ``qlora_peft``, ``scaling`` and
``longlora``)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..latency import format_table
from ..train.__main__ import main as train_main
from . import (COMMON, LATENCY_OUT, OUT, QALORA_OUT, latency, load, pending_runs, record, summarise, table_file, tables,
               write_json)
from . import __doc__ as experiments_doc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lorabook.experiments", description=experiments_doc.split("\n")[0])
    p.add_argument("tables", nargs="+", help=f"table1, subspace and/or any of {sorted(tables())}")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results JSON (default: {OUT}; for the qalora table {QALORA_OUT})")
    p.add_argument("--shard", default="0/1", help="k/n: run every n-th pending run starting at k (default 0/1)")
    p.add_argument("--dry-run", action="store_true", help="list the pending runs and stop")
    p.add_argument("--rounds", type=int, default=30, help="table1: bracketed timing rounds (default 30)")
    args = p.parse_args(argv)
    from .qlora_eval import cli as transfer  # notebook 07's adapter on three bases -> data/qlora_transfer.json
    if "transfer" in args.tables and transfer(args):
        return
    from .qlora_merge import cli as merge  # notebook 07's adapter merged three ways -> data/qlora_merge.json
    if "merge" in args.tables and merge(args):
        return
    from .qlora_peft import cli as peft_run  # notebook 07's QLoRA through BitsAndBytesConfig + peft -> qlora_peft.json
    if "peft" in args.tables and peft_run(args):
        return
    from .longlora import cli as longlora  # notebook 09: passkey and perplexity past 8k tokens -> data/longlora.json
    if "longlora" in args.tables and longlora(args):
        return
    from .scaling import cli as scaling  # notebook 07's DDP / FSDP bytes, 2 processes -> data/scaling_out.json
    if "scaling" in args.tables and scaling(args):
        return
    if "table1" in args.tables:
        args.tables.remove("table1")
        if not args.dry_run:
            result = latency(args.rounds)
            write_json(LATENCY_OUT, result)
            print(format_table(result["rows"]))
        if not args.tables:
            return
    if "subspace" in args.tables:
        args.tables.remove("subspace")
        if not args.dry_run:
            from .subspace import SUBSPACE_OUT, subspace
            write_json(SUBSPACE_OUT, subspace())
            print(f"wrote {SUBSPACE_OUT.name}")
        if not args.tables:
            return
    if args.out is None:
        files = {table_file(t) for t in args.tables}
        if len(files) > 1:
            raise ValueError(f"run the qalora table on its own: it goes to {QALORA_OUT.name}, the others to {OUT.name}")
        args.out = files.pop()
    k, n = (int(x) for x in args.shard.split("/"))
    if not 0 <= k < n:
        raise ValueError(f"--shard must be k/n with 0 <= k < n, got {args.shard!r}")
    todo = pending_runs(args.tables, load(args.out))[k::n]
    print(f"{len(todo)} run(s) to do in shard {k}/{n}: {[run for run, _ in todo]}")
    if args.dry_run:
        return
    for i, (run, run_args) in enumerate(todo):
        t0 = time.perf_counter()
        result = train_main(run_args + COMMON)
        record(args.out, run, summarise(run_args + COMMON, result))
        print(f"[{i + 1}/{len(todo)}] {run}: exact match {result['accuracy_after']:.0%} "
              f"({result['trainable_params']:,} params, {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
