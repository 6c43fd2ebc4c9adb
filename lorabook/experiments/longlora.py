"""LongLoRA at small scale: SmolLM2 past its 8192-token context, before and after a short fine-tune with position
interpolation and S²-Attn, and what trainable embeddings and norms add -- written to data/longlora.json.

LongLoRA (Chen et al. 2023, https://arxiv.org/abs/2309.12307) extends Llama2-7B from 4k to 32k tokens: position
interpolation (factor 8), S²-Attn in training (groups of n/4), LoRA on the attention weights plus trainable
embeddings and norms ("LoRA+"), 1000 steps on RedPajama at the target length; perplexity at 32k: full FT 8.08,
LoRA 11.44, LoRA+ 8.12 (their Table 2). Here, on a 2-core CPU, the same recipe as short as it can be:

    passkey     accuracy (``lorabook.longdata``: the Landmark template, seeded keys and depths) at LENGTHS tokens:
                SmolLM2 as it is; SmolLM2 + position interpolation x2 (beyond 8192 only); after the fine-tune
    fine-tune   factor 2 (a 16k context), S²-Attn (groups of a quarter), STEPS AdamW steps on windows of
                TRAIN_LEN tokens of Python's reference manual (``longdata.long_text_windows``), three ways:
                "LoRA" (W_q, W_k, W_v, W_o, r 8), "LoRA+" (the same + embeddings + norms), "full"
    perplexity  on the first held-out windows of that text at PPL_LENGTHS, every model, full attention (as at
                inference)

On a CPU the fine-tune trains on 2048-token windows (LongLoRA's on windows of the target length) for 20 steps
(theirs: 1000): a measurement of direction, not of the paper's numbers. With a GPU (``scale="gpu"``) the windows
are 16384 tokens long, the steps 100 and the passkey set larger.

    python -m lorabook.experiments longlora          # ~70 minutes on 2 CPU cores; resumes a stopped run

Each part (a passkey sweep or the perplexities of one model; a fine-tune with its evaluations) is written to the
file as soon as it is done; a run with the same settings skips the parts already there.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

import lorabook
from .._checks import check_choice
from . import DATA, file_command, write_json

__all__ = ["LONGLORA_OUT", "SETTINGS", "PAPER_PPL", "position_nll", "window_perplexity", "prepare", "measurements",
           "run", "cli"]
LONGLORA_OUT = DATA / "longlora.json"
PAPER_PPL = {"full": 8.08, "LoRA": 11.44, "LoRA+": 8.12}  # Llama2-7B at 32k, PG-19 validation (their Table 2)
SETTINGS = {
    "cpu": dict(lengths=[1024, 2048, 4096, 8192, 12288], passkey_n=5, factor=2, train_len=2048, steps=20,
                lr=5e-4, ppl_lengths=[4096, 12288], ppl_windows=2, seed=0),
    "gpu": dict(lengths=[1024, 2048, 4096, 8192, 12288, 16384], passkey_n=20, factor=2, train_len=16384, steps=100,
                lr=5e-4, ppl_lengths=[4096, 12288, 16384], ppl_windows=4, seed=0),
    "smoke": dict(lengths=[256], passkey_n=1, factor=2, train_len=128, steps=2, lr=5e-4, ppl_lengths=[256],
                  ppl_windows=1, seed=0),
}
METHODS = ("LoRA", "LoRA+", "full")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@torch.no_grad()
def position_nll(model, windows: list[torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy at each position, averaged over token windows (length,) of one length: (length − 1,).
    One forward per window; the output head runs on ``chunk`` positions at a time (12k positions × 49152 logits
    would be 2.4 GB at once)."""
    device = next(model.parameters()).device
    model.eval()
    head, total = model.get_output_embeddings(), 0
    for ids in windows:
        ids = ids[None].to(device)                                         # (1, T)
        hidden = model.model(ids).last_hidden_state                        # (1, T, d)
        nll = [F.cross_entropy(head(hidden[0, s:s + chunk][:ids.shape[1] - 1 - s]).float(),
                               ids[0, s + 1:s + 1 + chunk], reduction="none")
               for s in range(0, ids.shape[1] - 1, chunk)]                 # [(c,)], c <= chunk
        total = total + torch.cat(nll).cpu()                               # (T − 1,)
    return total / len(windows)


def window_perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over the windows (``position_nll``): lower is better."""
    return math.exp(position_nll(model, windows).mean().item())


def prepare(base, method: str, factor: float):
    """A copy of ``base`` ready for a LongLoRA fine-tune by ``method`` (a METHODS name): position interpolation
    ×factor, S²-Attn on, and what trains; returns (model, parameter counts)."""
    from ..longlora import enable_s2attn, interpolate_positions, longlora_trainable
    from ..lora import add_lora

    check_choice("method", method, METHODS)
    model = copy.deepcopy(base)
    interpolate_positions(model, factor=factor)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        counts = dict(lora=0, embeddings=0, norms=0, trainable=n, total=n)
    else:
        torch.manual_seed(0)  # one initial A for both LoRA runs
        add_lora(model, target_modules=TARGETS, r=8, alpha=16)
        counts = longlora_trainable(model, embeddings=method == "LoRA+", norms=method == "LoRA+")
    return enable_s2attn(model), counts


def _passkey(model, tokenizer, lengths, n, seed) -> list[dict]:
    from ..longdata import passkey_examples, passkey_predict

    rows = []
    for length in lengths:
        t0 = time.perf_counter()
        examples = passkey_examples(tokenizer, length, n, seed)
        found = passkey_predict(model, tokenizer, examples, progress=False)
        rows.append(dict(length=length, n=n, correct=sum(f == ex["key"] for f, ex in zip(found, examples)),
                         found=found, keys=[ex["key"] for ex in examples], tokens=[ex["tokens"] for ex in examples],
                         seconds=time.perf_counter() - t0))
        print(f"  passkey {length:6d} tokens: {rows[-1]['correct']}/{n} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def _perplexities(model, tokenizer, lengths, n_windows: int, block: int = 4096) -> dict:
    """Per length: the perplexity of the first ``n_windows`` held-out windows, over all positions and over each
    block of ``block`` positions (past the model's trained context, the last blocks tell what the first hide)."""
    from ..longdata import long_text_windows

    out = {}
    for length in lengths:
        windows = long_text_windows(tokenizer, length, "eval")[:n_windows]
        nll = position_nll(model, windows)                                 # (length − 1,)
        blocks = {f"{a}-{min(a + block, len(nll)) - 1}": math.exp(nll[a:a + block].mean().item())
                  for a in range(0, len(nll), block)}
        out[str(length)] = dict(ppl=math.exp(nll.mean().item()), windows=len(windows), by_positions=blocks)
        print(f"  perplexity at {length:6d} tokens: {out[str(length)]['ppl']:.3f} "
              f"(by positions: {', '.join(f'{k} {v:.2f}' for k, v in blocks.items())})", flush=True)
    return out


def run(scale: str | None = None, out=LONGLORA_OUT) -> dict:
    """Every stage not yet in ``out`` (same settings), each written there when done; returns the whole result."""
    from ..longdata import long_text_windows
    from ..longlora import disable_s2attn, interpolate_positions
    from ..models import load_base_model
    from ..train.loop import train

    dev = lorabook.device()
    scale = scale or ("gpu" if dev.type == "cuda" else "cpu")
    s = SETTINGS[check_choice("scale", scale, tuple(SETTINGS))]
    old = json.loads(out.read_text()) if out.is_file() else {}
    result = old if old.get("settings") == s else {}
    result.update(command="python -m lorabook.experiments longlora", scale=scale, settings=s,
                  python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                  device=dev.type, paper_ppl=PAPER_PPL)
    result.setdefault("stages", {})
    stages = result["stages"]
    base, tokenizer = load_base_model(device=dev)
    original = base.config.max_position_embeddings
    result["original_context"] = original

    def part(name, key, fn):  # one measurement of one model, written to the file when done
        stage = stages.setdefault(name, {})
        if key in stage:
            print(f"{name}: {key} done already", flush=True)
            return
        print(f"{name}: {key}", flush=True)
        t0 = time.perf_counter()
        stage[key] = fn()
        stage[f"{key}_seconds"] = time.perf_counter() - t0
        write_json(out, result)

    stages.setdefault("SmolLM2", {})["factor"] = 1
    part("SmolLM2", "passkey", lambda: _passkey(base, tokenizer, s["lengths"], s["passkey_n"], s["seed"]))
    part("SmolLM2", "perplexity", lambda: _perplexities(base, tokenizer, s["ppl_lengths"], s["ppl_windows"]))
    pi = copy.deepcopy(base)
    interpolate_positions(pi, factor=s["factor"])
    name = f"SmolLM2 + PI x{s['factor']}"
    stages.setdefault(name, {})["factor"] = s["factor"]
    part(name, "passkey", lambda: _passkey(pi, tokenizer, [n for n in s["lengths"] if n > original], s["passkey_n"],
                                           s["seed"]))
    part(name, "perplexity", lambda: _perplexities(pi, tokenizer, s["ppl_lengths"], s["ppl_windows"]))

    windows = long_text_windows(tokenizer, s["train_len"], "train")
    batches = [dict(input_ids=w[None], attention_mask=torch.ones_like(w[None]), labels=w[None]) for w in windows]

    def finetune(method):  # one part: the model exists only in this process
        model, counts = prepare(base, method, s["factor"])
        t0 = time.perf_counter()
        history = train(model, batches, tokenizer, steps=s["steps"], lr=s["lr"], batch_size=1, warmup_steps=2,
                        max_len=s["train_len"], seed=s["seed"], log_every=5, progress=False)
        disable_s2attn(model)   # full attention at inference
        lengths = s["lengths"] if method == "LoRA+" else []
        return dict(factor=s["factor"], counts=counts, loss=history.loss, train_seconds=time.perf_counter() - t0,
                    passkey=_passkey(model, tokenizer, lengths, s["passkey_n"], s["seed"]),
                    perplexity=_perplexities(model, tokenizer, s["ppl_lengths"], s["ppl_windows"]))
    for method in ("LoRA+", "LoRA", "full"):
        part(f"LongLoRA {method}", "result", lambda m=method: finetune(m))
    return result


def measurements(result: dict) -> dict[str, dict]:
    """model name -> its measurements (passkey rows, perplexities; for a fine-tune also counts and loss), from a
    ``run`` result: a fine-tune's are under "result" in the file."""
    return {name: {**{k: v for k, v in st.items() if k != "result"}, **st.get("result", {})}
            for name, st in result["stages"].items()}


def cli(args) -> bool:
    """``python -m lorabook.experiments longlora`` (``lorabook.experiments.file_command``): True when no other table
    is left to run."""
    def report(result):
        lines = []
        for name, st in measurements(result).items():
            pk = ", ".join(f"{r['length']}: {r['correct']}/{r['n']}" for r in st["passkey"])
            pp = ", ".join(f"{k}: {v['ppl']:.2f}" for k, v in st["perplexity"].items())
            lines.append(f"{name:22s} passkey {pk or '-'} | perplexity {pp}")
        return "\n".join(lines)
    return file_command(args, "longlora", "passkey and perplexity, SmolLM2 vs LongLoRA fine-tunes (LoRA, LoRA+, full)",
                        run, LONGLORA_OUT, report)
