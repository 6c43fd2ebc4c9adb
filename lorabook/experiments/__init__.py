"""The seed's LoRA accuracy tables at small scale: a grid of fine-tuning runs of SmolLM2 on mini-WikiSQL.

Hu et al. 2021 (https://arxiv.org/abs/2106.09685) compare (Tables 5-6: GPT-3 175B on WikiSQL):
    Table 2  LoRA vs full fine-tuning vs BitFit vs adapters (there on GLUE with RoBERTa; here on WikiSQL's task,
             plus prefix tuning, which their Figure 2 compares on WikiSQL)
    Table 5  which attention weights to adapt at one fixed budget: W_q | W_k | W_v | W_o at r = 8, pairs at
             r = 4, all four at r = 2 (all square in GPT-3, so every cell has the same 18M parameters)
    Table 6  the rank r = 1, 2, 4, 8, 64 for W_q; W_q, W_v; and all four
and QLoRA's claim (Dettmers et al. 2023) that a 4-bit NF4 base loses nothing against a 16-bit one:
    qlora    the same LoRA adapters (W_q, W_v and all linear, r = 8) on the fp32 base and on an NF4 + double-
             quantized base (bf16 compute, paged AdamW)
and Table 1 (the latency of one GPT-2 medium forward: base, LoRA merged/unmerged, Adapter^L, Adapter^H) comes
from ``lorabook.latency.latency_table`` with many paired rounds (``table1``, written to data/lora_table1.json);
the paper's §7 (is the update low-rank?) from ``lorabook.experiments.subspace`` (data/lora_subspace.json).
Here every cell is one run of ``python -m lorabook.train`` (the lesson-03 command line: 30 AdamW steps of 8
examples, exact match on the first 100 test examples), so a cell costs ~4 minutes of one CPU thread:

    python -m lorabook.experiments table2 table5 table6 qlora [--shard 0/2] [--out data/lora_tables.json]
    python -m lorabook.experiments table1 [--rounds 30]      # ~12 minutes on a quiet machine
    python -m lorabook.experiments subspace                  # ~10 minutes: lorabook.experiments.subspace
    python -m lorabook.experiments qalora [--shard 0/2]      # QA-LoRA vs QLoRA + PTQ -> data/qalora_tables.json

Runs already in ``--out`` with the same command are skipped, so an interrupted sweep resumes; ``--shard k/n``
runs every n-th pending run, so n processes (one thread each) share the grid and the file (writes are locked).
SmolLM2 uses grouped-query attention (9 query heads, 3 key/value heads): W_k and W_v are 576 -> 192, so a
rank-r adapter on them has r·(576 + 192) parameters, not the r·(576 + 576) of W_q and W_o; the table shows
each cell's real count next to its accuracy.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from .._io import write_text
from ..data import DATA_DIR as DATA

__all__ = ["OUT", "LATENCY_OUT", "COMMON", "WEIGHTS", "PAPER", "RANKS", "PREFIX_TEXT", "BASELINES", "lora_run",
           "QALORA_BITS", "QALORA_GROUPS", "QALORA_OUT", "qalora_table", "tables", "table_file", "pending_runs", "load",
           "summarise", "record", "write_json", "file_command", "table_rows", "latency"]
OUT, LATENCY_OUT, QALORA_OUT = DATA / "lora_tables.json", DATA / "lora_table1.json", DATA / "qalora_tables.json"
COMMON = ["--steps", "30", "--batch-size", "8", "--max-len", "160", "--warmup", "3", "--schedule", "cosine",
          "--eval-n", "100", "--threads", "1", "--no-before", "--no-progress", "--seed", "0"]
WEIGHTS = {"W_q": "q_proj", "W_k": "k_proj", "W_v": "v_proj", "W_o": "o_proj",
           "W_q, W_k": "q_proj,k_proj", "W_q, W_v": "q_proj,v_proj",
           "W_q, W_k, W_v, W_o": "q_proj,k_proj,v_proj,o_proj", "all linear": "all-linear"}
PAPER = {  # WikiSQL validation accuracy (%) with GPT-3 175B, Hu et al. 2021
    "table5": {"W_q": 70.4, "W_k": 70.0, "W_v": 73.0, "W_o": 73.2, "W_q, W_k": 71.4, "W_q, W_v": 73.7,
               "W_q, W_k, W_v, W_o": 73.7},
    "table6": {"W_q": [68.8, 69.6, 70.5, 70.4, 70.0], "W_q, W_v": [73.4, 73.3, 73.7, 73.8, 73.5],
               "W_q, W_k, W_v, W_o": [74.1, 73.7, 74.0, 74.0, 73.9]},
}
RANKS = (1, 2, 4, 8, 64)


def lora_run(weights: str, r: int, method: str = "lora") -> tuple[str, list[str]]:
    """(run id, CLI arguments) of LoRA on ``weights`` (a key of WEIGHTS) at rank r (alpha 16, lr 3e-3).

    method "qlora": the same adapter on an NF4 + double-quantized base (bf16 compute) with the paged AdamW."""
    short = "all" if weights == "all linear" else "".join(w[-1] for w in weights.split(", "))  # W_q, W_v -> qv
    extra = ["--optimizer", "paged_adamw"] if method == "qlora" else []
    return f"{method}-{short}-r{r}", ["--method", method, "--targets", WEIGHTS[weights], "--rank", str(r),
                                      "--alpha", "16", "--lr", "3e-3", *extra]


# Prefix tuning starts from the keys and values of real, task-flavoured tokens (Li & Liang): random prefixes
# (N(0, 1), also peft's default) raise SmolLM2's starting loss from 1.27 to 9.4, and 30 steps do not recover.
PREFIX_TEXT = ("Translate the question into one SQL query over the given table. Reply with the SQL only. SELECT name "
               "FROM table WHERE column = 'value' AND number > 10; SELECT COUNT(name), MAX(number) FROM table")

# Table 2's baselines at about LoRA q,v r=8's 0.46M trainable parameters (BitFit has what it has: 0.16M;
# full fine-tuning all 135M). Learning rates: the usual order of magnitude per method, not tuned per cell.
BASELINES = {
    "full": ["--method", "full", "--lr", "1e-4"],
    "bitfit": ["--method", "bitfit", "--lr", "3e-3"],
    "adapter_h-m6": ["--method", "adapter_h", "--bottleneck", "6", "--lr", "3e-3"],
    "adapter_l-m12": ["--method", "adapter_l", "--bottleneck", "12", "--lr", "3e-3"],
    "prefix-p40": ["--method", "prefix", "--n-prefix", "40", "--prefix-text", PREFIX_TEXT, "--lr", "1e-2"],
}


def tables() -> dict[str, dict[str, tuple[str, list[str]]]]:
    """table -> {cell label: (run id, CLI arguments)}; a run shared by two tables appears in both."""
    t2 = {"LoRA (W_q, W_v, r=8)": lora_run("W_q, W_v", 8), "LoRA (all linear, r=8)": lora_run("all linear", 8)}
    t2.update({label: (run, BASELINES[run]) for label, run in [
        ("Full fine-tuning", "full"), ("BitFit", "bitfit"), ("Adapter^H (m=6)", "adapter_h-m6"),
        ("Adapter^L (m=12)", "adapter_l-m12"), ("Prefix (P=40)", "prefix-p40")]})
    t5 = {w: lora_run(w, 8 // len(w.split(", "))) for w in PAPER["table5"]}  # r = 8, 4, 2
    t6 = {f"{w}, r={r}": lora_run(w, r) for w in PAPER["table6"] for r in RANKS}
    qlora = {f"{name} ({w}, r=8)": lora_run(w, 8, method) for w in ("W_q, W_v", "all linear")
             for name, method in (("LoRA, fp32 base", "lora"), ("QLoRA, NF4 base", "qlora"))}
    return {"table2": t2, "table5": t5, "table6": t6, "qlora": qlora, "qalora": qalora_table()}


def table_file(name: str) -> Path:
    """The results file of table ``name``: QALORA_OUT for the qalora table, OUT for the others."""
    return QALORA_OUT if name == "qalora" else OUT


QALORA_BITS, QALORA_GROUPS = (4, 3, 2), (32, 64)  # SmolLM2's 576 inputs take groups of 64 at most (576 = 9 · 64)


def qalora_table() -> dict[str, tuple[str, list[str]]]:
    """QA-LoRA's Table 1 in shape (Xu et al. 2023): at k = 4, 3, 2 bits and groups of 32 and 64, QLoRA merged then
    rounded to INT-k (post-training quantization) against QA-LoRA merged (INT-k by construction). Every cell: r = 8
    on every linear layer, the recipe of the other tables, scored after ``--merge``."""
    _, qlora_args = lora_run("all linear", 8, "qlora")
    _, qalora_args = lora_run("all linear", 8, "qalora")
    cells = {"QLoRA unmerged (NF4 + LoRA branch)": ("qlora-all-r8", qlora_args),
             "QLoRA merged, full precision": ("qlora-all-r8-merged", qlora_args + ["--merge"]),
             "QLoRA merged -> NF4 again": ("qlora-all-r8-nf4", qlora_args + ["--merge", "--ptq-nf4"]),
             "QA-LoRA INT4 g32, merged, mean pooling": (  # the authors' code's convention (lorabook.qalora)
                 "qalora-all-r8-b4-g32-mean", qalora_args + ["--bits", "4", "--group-size", "32", "--pool", "mean",
                                                             "--merge"])}
    for bits in QALORA_BITS:
        for group in QALORA_GROUPS:
            cells[f"QLoRA merged -> INT{bits} g{group} (PTQ)"] = (
                f"qlora-all-r8-ptq{bits}-g{group}",
                qlora_args + ["--merge", "--ptq-bits", str(bits), "--ptq-group-size", str(group)])
            cells[f"QA-LoRA INT{bits} g{group}, merged"] = (
                f"qalora-all-r8-b{bits}-g{group}",
                qalora_args + ["--bits", str(bits), "--group-size", str(group), "--merge"])
    return cells


def pending_runs(names: list[str], done: dict) -> list[tuple[str, list[str]]]:
    """The distinct runs of tables ``names`` whose exact command is not in ``done`` yet, in table order."""
    all_tables = tables()
    bad = [n for n in names if n not in all_tables]
    if bad:
        raise ValueError(f"unknown table(s) {bad}; tables: {sorted(all_tables)}")
    runs: dict[str, list[str]] = {}
    for name in names:
        for run, args in all_tables[name].values():
            if done.get(run, {}).get("args") != args + COMMON:
                runs.setdefault(run, args)
    return list(runs.items())


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path``'s lock file (other shards wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: Path | str = OUT) -> dict:
    """run id -> result (see ``summarise``); {} when the file does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text())["runs"] if path.is_file() else {}


def summarise(args: list[str], result: dict) -> dict:
    """What a table needs from one ``python -m lorabook.train`` result: counts, accuracy, loss curve, time and a few errors."""
    wrong = [p for p in result["predictions"] if not p["match"]]
    keep = ("trainable_params", "total_params", "accuracy_after", "eval_n", "train_wall_time_s", "tokens_per_s",
            "loss_curve", "load_avg_1m", "torch", "threads")
    merged = {k: result[k] for k in ("merge", "linear_bytes") if k in result}  # runs with --merge
    return dict(args=args, **{k: result[k] for k in keep}, **merged, errors=[
        {k: p[k] for k in ("question", "gold", "after")} for p in wrong[:3]])


def record(path: Path, run: str, summary: dict) -> None:
    """Add one run to the JSON file at ``path`` (read-modify-write under the lock; atomic rename)."""
    with _locked(path):
        runs = load(path)
        runs[run] = summary
        write_json(path, {"about": "python -m lorabook.experiments; see lorabook/experiments",
                          "runs": dict(sorted(runs.items()))})


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


def file_command(args, name: str, plan: str, run, out: Path, report) -> bool:
    """``python -m lorabook.experiments <name>`` for an experiment that writes one file: removes ``name`` from
    ``args.tables``; with ``args.dry_run`` prints ``plan``, else writes ``run()`` to ``out`` and prints
    ``report(result)``. True when no other table is left to run."""
    args.tables.remove(name)
    if args.dry_run:
        print(f"{name}: {plan} -> {out.name}")
    else:
        result = run()
        write_json(out, result)
        print(report(result))
    return not args.tables


def table_rows(name: str, runs: dict) -> list[dict]:
    """Rows of table ``name`` from measured ``runs``: label, run, trainable params, accuracy (None: not run)."""
    rows = []
    for label, (run, _) in tables()[name].items():
        got = runs.get(run, {})
        rows.append(dict(label=label, run=run, params=got.get("trainable_params"),
                         accuracy=got.get("accuracy_after")))
    return rows


def latency(rounds: int = 30, threads: int = 1) -> dict:
    """Table 1 on this machine: ``lorabook.latency.latency_table`` (CPU: CPU_SHAPES; CUDA: the paper's shapes) with
    ``rounds`` bracketed rounds (each method between two base calls), on ``threads`` CPU threads; with one, the
    clock is the thread's CPU time (``lorabook.latency.pick_clock``), which a busy machine disturbs least."""
    import torch

    import lorabook
    from ..latency import latency_table
    torch.set_num_threads(threads)
    t0, cpu0, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    rows = latency_table(rounds=rounds)
    return dict(command=f"python -m lorabook.experiments table1 --rounds {rounds}", device=str(lorabook.device()),
                threads=torch.get_num_threads(), torch=torch.__version__, rounds=rounds, clock=rows[0]["clock"],
                wall_time_s=time.perf_counter() - t0, cpu_time_s=time.process_time() - cpu0,
                load_avg_1m=[load_before, os.getloadavg()[0]],
                cpu_count=os.cpu_count(), rows=rows)
