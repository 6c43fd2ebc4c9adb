"""The one-page "which method when" guide, ``notebooks/WHICH_METHOD.md``, generated from the measured tables in data/.

Every number in the guide is read from a data/ file or computed here from one, so the guide cannot drift from
the measurements; after any of them changes, regenerate it (``tests/test_guide.py`` fails until you do)::

    python -c "from lorabook.experiments.guide import write; write()"

Inputs and what the guide takes from each:

    data/lora_tables.json       exact match and trainable parameters of each fine-tuning run: the seed's LoRA
                                Table 2 (methods), Tables 5-6 (which weights, which rank) and LoRA vs QLoRA
                                (Hu et al. 2021, https://arxiv.org/abs/2106.09685; Dettmers et al. 2023,
                                https://arxiv.org/abs/2305.14314), SmolLM2-135M on mini-WikiSQL
    data/lora_sql_results.json  the base model's score before fine-tuning; the runs' batch size and length
    data/lora_table1.json       Table 1: the inference latency overhead of merged / unmerged LoRA and adapters
    data/bench_nf4.json         what QLoRA's 4-bit weights cost in time: (de)quantizing one weight vs bitsandbytes
    data/bench_paged.json       what the paged optimizer costs in time (optional: left out when absent)
    data/bench_serving.json     lesson 10's serving throughput against peft (optional)
    data/qlora_transfer.json    a QLoRA adapter on the base it was trained on vs on the other base (notebook 07;
                                optional: left out when absent)

Memory is not measured in data/: the memory table is ``lorabook.memory.estimate`` (the analytic estimate that
notebook 01 checks against measured peaks) at the runs' batch and length, and for LLaMA-65B (QLoRA's Figure 1).

Accuracy on n questions carries binomial noise: each score gets a 95% Wilson interval (Wilson 1927), and two
scores are "within noise" when their difference is inside 1.96 standard errors of a difference of two proportions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .._checks import check_int, check_number, check_positive_int
from .._io import write_text
from ..data import DATA_DIR, exact_match
from . import OUT, table_file, tables

__all__ = ["GUIDE", "Z95", "wilson", "within_noise", "accuracy_rows", "memory_rows", "latency_rows",
           "bench_rows", "transfer_rows", "mcnemar", "render", "write"]

GUIDE = DATA_DIR.parent / "notebooks" / "WHICH_METHOD.md"
Z95 = 1.959963984540054  # the normal quantile of 0.975
REGENERATE = 'python -c "from lorabook.experiments.guide import write; write()"'
LATENCY_LABELS = {"lora_merged": "LoRA, merged", "lora": "LoRA, unmerged", "adapter_l": "Adapter^L",
                  "adapter_h": "Adapter^H"}
MEMORY_CASES = {  # notebook 07's Figure 1 settings (the QLoRA paper's r = 64 on every linear layer)
    "full": dict(method="full", dtype="mixed"),
    "lora": dict(method="lora", dtype="bf16", lora_rank=64, lora_targets="all-linear"),
    "qlora": dict(method="qlora", lora_rank=64, lora_targets="all-linear"),
}
MEMORY_LABELS = {"full": "Full fine-tuning (mixed precision)", "lora": "LoRA (bf16 base)",
                 "qlora": "QLoRA (NF4 + double-quantized base)"}
BIG = dict(model="llama-65b", batch_size=1, seq_len=512)  # the scale of QLoRA's Figure 1

# ---- statistics ----------------------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a proportion with k successes in n trials, as fractions."""
    n = check_positive_int("n", n)
    k = check_int("k", k, low=0, high=n)
    z = check_number("z", z, low=0, low_open=True)
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact ends, no rounding


def within_noise(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> bool:
    """Whether accuracies p1 (of n1) and p2 (of n2) differ by at most z standard errors of their difference."""
    p1, p2 = check_number("p1", p1, low=0, high=1), check_number("p2", p2, low=0, high=1)
    n1, n2 = check_positive_int("n1", n1), check_positive_int("n2", n2)
    z = check_number("z", z, low=0, low_open=True)
    return abs(p1 - p2) <= z * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def mcnemar(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Two scorings of the same questions, compared paired (McNemar 1947, exact): only_a = questions right under
    a and wrong under b, only_b the reverse, p = the two-sided binomial probability of a split at least this
    uneven if either was equally likely (questions both get right or both get wrong say nothing about which is
    better). Stronger than comparing two accuracies as if the questions were different."""
    if not isinstance(correct_a, (list, tuple)) or not isinstance(correct_b, (list, tuple)):
        raise TypeError("correct_a and correct_b must be lists of bools (one per question)")
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"correct_a and correct_b must be non-empty and of one length, got {len(correct_a)} and "
                         f"{len(correct_b)}")
    if not all(isinstance(x, bool) for x in (*correct_a, *correct_b)):
        raise TypeError("correct_a and correct_b must hold bools (True = answered right)")
    only_a = sum(a and not b for a, b in zip(correct_a, correct_b))
    only_b = sum(b and not a for a, b in zip(correct_a, correct_b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return dict(only_a=only_a, only_b=only_b, p=p)


# ---- the tables ----------------------------------------------------------------------------------------------

def _row(label: str, run: str, trainable: int, accuracy: float, n: int, rank=None) -> dict:
    lo, hi = wilson(round(accuracy * n), n)
    return dict(label=label, run=run, trainable=trainable, accuracy=accuracy, n=n, low=lo, high=hi, rank=rank)


def accuracy_rows(runs: dict, sql: dict) -> dict[str, list[dict]]:
    """{"table2": [...], "qlora": [...], "table5": [...], "table6": [...], "base": [row]}: one row per cell with
    label, run, trainable, accuracy (fraction), n, its Wilson interval (low, high) and the LoRA rank (or None)."""
    out = {}
    for name, cells in tables().items():
        if table_file(name) != OUT:  # the qalora table has its own file and notebook (08)
            continue
        out[name] = []
        for label, (run, _) in cells.items():
            if run not in runs:
                raise KeyError(f"run {run!r} ({label}) is missing from lora_tables.json: "
                               f"run python -m lorabook.experiments {name}")
            r, args = runs[run], runs[run]["args"]
            rank = int(args[args.index("--rank") + 1]) if "--rank" in args else None
            out[name].append(_row(label, run, r["trainable_params"], r["accuracy_after"], r["eval_n"], rank))
    out["base"] = [_row("SmolLM2-135M-Instruct, not fine-tuned", "lora_sql_results.json: before", 0,
                        sql["accuracy_before"], sql["eval_n"])]
    return out


def memory_rows(batch_size: int, seq_len: int) -> dict[str, dict]:
    """Analytic peak memory (``lorabook.memory.estimate``) of one AdamW step with gradient checkpointing, per
    MEMORY_CASES: SmolLM2-135M at (batch_size, seq_len) and LLaMA-65B at BIG. {case: {small_* / big_*: weights,
    state (gradients + optimizer states), activations (the rest), peak}}, all at the step's peak moment, so they
    add up to the peak."""
    from ..memory.estimate import estimate
    scales = {"small": dict(model="smollm2-135m", batch_size=batch_size, seq_len=seq_len), "big": BIG}
    rows = {}
    for case, kw in MEMORY_CASES.items():
        rows[case] = {}
        for scale, where in scales.items():
            e = estimate(**where, **kw, gradient_checkpointing=True)
            rows[case].update({f"{scale}_weights": e.weights, f"{scale}_state": e.gradients + e.optimizer,
                               f"{scale}_activations": e.activations, f"{scale}_peak": e.total})
    return rows


def latency_rows(table1: dict) -> tuple[list[tuple[int, int]], list[dict]]:
    """(shapes, rows): one row per method with, per (batch, seq), the overhead in % and its noise verdict.

    With a confidence interval in the file (ci_low_pct / ci_high_pct) an overhead is "slower" / "faster" when the
    interval excludes 0 ("within" when not); without one, when it exceeds the method's interquartile range (% of
    its median)."""
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in table1["rows"]))
    rows = []
    for method, label in LATENCY_LABELS.items():
        cells = {}
        for r in table1["rows"]:
            if r["method"] != method:
                continue
            pct = r["overhead_pct"]
            if "ci_low_pct" in r:
                lo, hi = r["ci_low_pct"], r["ci_high_pct"]
                verdict = "slower" if lo > 0 else "faster" if hi < 0 else "within"
                spread = f"95% CI [{lo:+.1f}, {hi:+.1f}]"
            else:
                iqr = 100 * r["iqr_ms"] / r["ms"]
                verdict = "within" if abs(pct) <= iqr else "slower" if pct > 0 else "faster"
                spread = f"IQR {iqr:.1f}%"
            cells[(r["batch"], r["seq"])] = dict(pct=pct, spread=spread, verdict=verdict, trainable=r["trainable"])
        if cells:
            rows.append(dict(method=method, label=label, cells=cells))
    return shapes, rows


def bench_rows(nf4: dict, paged: dict | None) -> list[dict]:
    """Benchmark rows against bitsandbytes (bench_nf4: quantize / dequantize, seconds) and every row of
    bench_paged: source, case, metric, lorabook, peer, peer_value, ratio, exact (None when not compared)."""
    rows = [dict(r, source="bench_nf4.json") for r in nf4["rows"] if r["peer"].startswith("bitsandbytes")
            and r["metric"] == "seconds"]
    rows += [dict(r, source="bench_paged.json") for r in (paged or {}).get("rows", [])]
    return [{k: r.get(k) for k in ("source", "case", "metric", "lorabook", "peer", "peer_value", "ratio", "exact")}
            for r in rows]


def transfer_rows(transfer: dict) -> list[dict]:
    """Per adapter: its score on its own base and on the other, and the paired test of the two (``mcnemar``)."""
    n, gold, steps, out = transfer["eval_n"], transfer["gold"], transfer["recipe"]["steps"], []
    name_of = {"nf4": "NF4", "fp32": "fp32"}
    for name, adapter in transfer["adapters"].items():
        right = {base: [exact_match(p, g) for p, g in zip(ev["predictions"], gold)]
                 for base, ev in adapter["eval"].items()}
        other = next(b for b in right if b != name)
        out.append(dict(adapter=name, label=f"the {name_of[name]}-trained adapter", n=n, steps=steps,
                        other=name_of[other],
                        own=sum(right[name]) / n, moved=sum(right[other]) / n, **mcnemar(right[name], right[other])))
    return out


# ---- rendering ----------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e4 else f"{n:,}"


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _value(x: float, metric: str) -> str:
    if metric == "seconds":
        return f"{1e3 * x:,.0f} ms" if x >= 0.1 else f"{1e3 * x:.3g} ms"
    return f"{x / 2 ** 20:.0f} MiB" if "bytes" in metric else f"{x:.3g}"


def _score(r: dict) -> str:
    return f"{r['label']} {_pct(r['accuracy'])}"


def _versus(a: dict, b: dict) -> str:
    """'within noise' or 'Z points above / below, more than the noise' (a against b)."""
    gap = round(100 * (a["accuracy"] - b["accuracy"]))
    if within_noise(a["accuracy"], a["n"], b["accuracy"], b["n"]):
        return "within noise"
    return f"{abs(gap)} points {'above' if gap > 0 else 'below'}, more than the noise"


def _compare(a: dict, b: dict) -> str:
    """'a X% vs b Y%: within noise' or '...: Z points below, more than the noise'."""
    return f"{_score(a)} vs {_score(b)}: {_versus(a, b)}"


def _acc_table(rows: list[dict], base_params: int) -> list[str]:
    out = ["| method | trainable | of the base's params | exact match | 95% interval |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['trainable'] / base_params:.2f}%" if r["trainable"] else "—"
        out.append(f"| {r['label']} | {_params(r['trainable']) if r['trainable'] else '0'} | {share} | "
                   f"{_pct(r['accuracy'])} | {_pct(r['low'])}–{_pct(r['high'])} |")
    return out


def render(data_dir: Path | str = DATA_DIR) -> str:
    """The guide's markdown from the files in ``data_dir``."""
    data_dir = Path(data_dir)
    read = lambda name: json.loads((data_dir / name).read_text())  # noqa: E731
    runs = read("lora_tables.json")["runs"]
    sql, table1, nf4 = read("lora_sql_results.json"), read("lora_table1.json"), read("bench_nf4.json")
    paged = read("bench_paged.json") if (data_dir / "bench_paged.json").is_file() else None
    moved = transfer_rows(read("qlora_transfer.json")) if (data_dir / "qlora_transfer.json").is_file() else []
    serving = read("bench_serving.json") if (data_dir / "bench_serving.json").is_file() else None
    acc = accuracy_rows(runs, sql)
    by_run = {}
    for rows in acc.values():  # a run in two tables keeps its first (Table 2) label
        for r in rows:
            by_run.setdefault(r["run"], r)
    full, qv, allr8 = by_run["full"], by_run["lora-qv-r8"], by_run["lora-all-r8"]
    q_qv, q_all = (next(r for r in acc["qlora"] if r["run"] == k) for k in ("qlora-qv-r8", "qlora-all-r8"))
    base_params = runs["full"]["trainable_params"]
    grid = {r["run"]: r for r in acc["table5"] + acc["table6"]}.values()
    best = max(grid, key=lambda r: (r["accuracy"], -r["trainable"]))
    best = dict(best, label=f"LoRA {best['label'].split(', r=')[0]}, r={best['rank']} (best of Tables 5–6)")
    table5 = sorted(acc["table5"], key=lambda r: r["accuracy"])
    ranges = []
    for w in ("W_q", "W_q, W_v", "W_q, W_k, W_v, W_o"):
        cells = [r["accuracy"] for r in acc["table6"] if r["label"].startswith(w + ", r=")]
        ranges.append((w, min(cells), max(cells)))
    disjoint = all(ranges[i][2] < ranges[i + 1][1] for i in range(len(ranges) - 1))
    s = sql["settings"]
    mem = memory_rows(s["batch_size"], s["max_len"])
    lora_m, full_m, qlora_m = mem["lora"], mem["full"], mem["qlora"]
    act_small = all(r["small_activations"] > r["small_peak"] / 2 for r in (lora_m, full_m))
    state_big = full_m["big_state"] > full_m["big_peak"] / 2
    shapes, lat = latency_rows(table1)
    merged = [r for r in lat if r["method"] == "lora_merged"]
    unmerged = [r for r in lat if r["method"] != "lora_merged"]
    paired = any("ci_low_pct" in r for r in table1["rows"])
    # what "within" means: a paired sweep's interval contains 0; an older sweep's overhead is inside the IQR
    within_words, outside_words = (("intervals contain 0", "intervals exclude 0") if paired
                                   else ("within the IQR", "outside the IQR"))
    outside = sum(c["verdict"] != "within" for r in unmerged for c in r["cells"].values())
    ns = sorted({r["n"] for rows in acc.values() for r in rows})

    L = ["# Which method when", "",
         "*Generated from the measured tables in `data/` by `lorabook.experiments.guide`: do not edit by hand. "
         "After any `data/*.json` file changes, regenerate it from the repository root "
         "(`tests/test_guide.py` fails until you do):*", "",
         f"    .venv/bin/{REGENERATE}", "",
         f"Scale: SmolLM2-135M-Instruct on the mini-WikiSQL task, {s['steps']} steps × {s['batch_size']} examples, "
         f"one seed each, exact match on {' / '.join(map(str, ns))} test questions (each score's 95% interval is in "
         "the accuracy table); latency and benchmarks on a 2-core CPU. Lessons: [01](01_memory_accounting.ipynb) "
         "memory, [02](02_lora_from_scratch.ipynb)–[03](03_lora_finetuning.ipynb) LoRA and these tables, "
         "[04](04_nf4.ipynb)–[07](07_qlora.ipynb) QLoRA; the words: [GLOSSARY.md](GLOSSARY.md).", "",
         "## The short answer", "",
         "1. **" + ("Start with LoRA on all linear layers, r = 8." if _versus(allr8, full) == "within noise"
                    or allr8["accuracy"] > full["accuracy"] else "LoRA on all linear layers vs full fine-tuning:")
         + f"** {_compare(allr8, full)}, with "
         f"{100 * allr8['trainable'] / base_params:.1f}% of the parameters trainable. Estimated peak of one step "
         "(r = 64, below): "
         f"{_gib(lora_m['small_peak'])} vs {_gib(full_m['small_peak'])} at 135M"
         + (" (the activations are most of it)" if act_small else "")
         + f", {_gib(lora_m['big_peak'])} vs {_gib(full_m['big_peak'])} at 65B"
         + (" (full fine-tuning's gradients and AdamW states are most of it)." if state_big else "."),
         "2. **" + ("Adapt more kinds of weights before raising r." if disjoint and table5[-1]["run"].startswith(
             "lora-qkvo") else "Which weights, which rank:") + "** Table 5, one budget (r = 8 on one kind of weight, "
         f"4 on two, 2 on four): from {_score(table5[-1])} down to {_score(table5[0])}. Table 6, r = "
         + ", ".join(str(r) for r in sorted({r["rank"] for r in acc["table6"]})) + ": "
         + ", ".join(f"{w} {_pct(lo)}–{_pct(hi)}" for w, lo, hi in ranges)
         + ("; each set's worst rank beats the previous set's best." if disjoint else "; the ranges overlap.")
         + f" Best cell: {_score(best)} with {_params(best['trainable'])} trainable.",
         "3. **" + ("QLoRA when the base in 16 bits does not fit." if all(
             _versus(a, b) == "within noise" or a["accuracy"] > b["accuracy"] for a, b in ((q_qv, qv), (q_all, allr8)))
             else "QLoRA against LoRA:") + f"** {_compare(q_qv, qv)}; {_compare(q_all, allr8)}. "
         f"LLaMA-65B, estimated peak: {_gib(qlora_m['big_peak'])} "
         + ("(under 48 GB)" if qlora_m["big_peak"] <= 48e9 else "(over 48 GB)")
         + f" vs {_gib(lora_m['big_peak'])} for LoRA on a bf16 base."
         + (" Keep the adapter on the base it was trained on "
            f"(notebook 07, {moved[0]['n']} questions, {moved[0]['steps']} steps): "
            + "; ".join(f"{r['label']} {_pct(r['own'])} on its own base, {_pct(r['moved'])} on {r['other']} "
                        f"({r['only_a']} questions right only on its own base, {r['only_b']} only on {r['other']}: "
                        f"paired exact p = {r['p']:.2g}" + (", more than the noise)" if r["p"] < 0.05 else ")")
                        for r in moved) + "."
            if moved else ""),
         "4. **Merge LoRA before serving one task.** Merged, the model has the base model's shapes and FLOPs"
         + "".join(": measured " + ", ".join(f"{c['pct']:+.1f}%" for c in r["cells"].values())
                   + f" ({sum(c['verdict'] == 'within' for c in r['cells'].values())} of {len(r['cells'])} "
                   f"{within_words})" for r in merged)
         + ". Unmerged LoRA and adapters add work in every adapted layer: "
         + "; ".join(f"{r['label']} " + ", ".join(f"{c['pct']:+.1f}%" for c in r["cells"].values()) for r in unmerged)
         + f" ({outside} of {sum(len(r['cells']) for r in unmerged)} {outside_words}). Adapters cannot be merged.",
         f"5. **Other methods, against {_score(qv)} ({_params(qv['trainable'])} trainable):** "
         + "; ".join(f"{_score(by_run[k])} ({_params(by_run[k]['trainable'])}): {_versus(by_run[k], qv)}"
                     for k in ("adapter_h-m6", "adapter_l-m12", "bitfit", "prefix-p40"))
         + ". The adapters' latency: rule 4.",
         "6. **Measured in their own lessons:** QA-LoRA, a fine-tune whose merged model stays INT-k "
         "([08](08_qa_lora.ipynb)); LongLoRA, a longer context for little compute ([09](09_longlora.ipynb)); "
         "S-LoRA, many adapters served in one batch over one base ([10](10_serving_many_adapters.ipynb))"
         + (": " + "; ".join(f"{r['ratio']:.2f}× the tokens/s of {r['peer']}" for r in serving["rows"]
                            if r["metric"] == "tokens_per_s")
            + f" ({serving['device']}, `data/bench_serving.json`)" if serving else "") + ".", ""]

    L += ["## Accuracy on the SQL task (exact match)", "",
          "From `data/lora_tables.json` and `data/lora_sql_results.json`; the paper's GPT-3 175B numbers are in "
          "notebook 03.", ""]
    L += _acc_table(acc["base"] + acc["table2"] + [q_qv, q_all, best], base_params)
    L += ["", "## Memory of one training step (estimated)", "",
          "`lorabook.memory.estimate` (analytic; notebook 01 checks it against measured peaks) in notebook 07's "
          "Figure 1 settings: AdamW, gradient checkpointing, LoRA r = 64 on every linear layer; SmolLM2-135M at the "
          f"runs' batch {s['batch_size']} × {s['max_len']} tokens, LLaMA-65B at batch {BIG['batch_size']} × "
          f"{BIG['seq_len']}. All at the step's peak moment: state = gradients + optimizer states then, and the "
          "rest of the peak is activations.", "",
          "| method | 135M weights | 135M state | 135M peak | 65B weights | 65B state | 65B peak |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {MEMORY_LABELS[case]} | " + " | ".join(_gib(r[k]) for k in ("small_weights", "small_state", "small_peak",
                                                                          "big_weights", "big_state", "big_peak"))
          + " |" for case, r in mem.items()]
    L += ["", "## Inference latency overhead vs the base model (Table 1)", "",
          f"From `data/lora_table1.json`: GPT-2 medium with random weights, one CPU thread, {table1['rounds']} "
          f"rounds; " + ("the median of the paired ratios (each call between two base calls) as an overhead, its "
                         "95% bootstrap interval, and whether that interval excludes 0." if paired else
                         "the median's overhead, its IQR and whether the overhead lies outside it."), "",
          "| method | " + " | ".join(f"batch {b} × {q}" for b, q in shapes) + " |", "|---|" + "---:|" * len(shapes)]
    L += [f"| {r['label']} | " + " | ".join(
        (f"{c['pct']:+.1f}% ({c['spread']}, {c['verdict']})" if (c := r["cells"].get(sh)) else "—") for sh in shapes)
        + " |" for r in lat]
    L += ["", "## What QLoRA's machinery costs in time on this CPU", "",
          "From `data/bench_nf4.json`" + (" and `data/bench_paged.json`" if paged else "")
          + " (ratio = lorabook / peer in the same run; rerun the benchmarks where you read them).", "",
          "| file | case | lorabook | peer | peer value | ratio |", "|---|---|---:|---|---:|---:|"]
    L += [f"| {r['source']} | {r['case']} ({r['metric']}) | {_value(r['lorabook'], r['metric'])} | {r['peer']} | "
          f"{_value(r['peer_value'], r['metric'])} | {r['ratio']:.2f} |" for r in bench_rows(nf4, paged)]
    return "\n".join(L) + "\n"


def write(path: Path | str = GUIDE, data_dir: Path | str = DATA_DIR) -> Path:
    """Render the guide from ``data_dir`` and write it to ``path`` atomically; returns the path."""
    return write_text(Path(path), render(data_dir))
