"""The measuring and notebook side of ``lorabook.memory`` (re-exported there): ``measure`` with torch's
MemTracker, what autograd saves per module, the seed's numbers next to ours, plots, a calculator, the benchmark.

Each ``seed_*`` function returns rows ``{"quantity", "paper", "ours", "note"}`` (strings, ready to print with
``format_rows``). Paper sizes are decimal like the papers' arithmetic (175e9 params x 2 B = 350 GB), so our
numbers in these tables use GB = 1e9 and MB = 1e6 bytes; ``Estimate.table()`` prints binary MiB / GiB.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .bench import register, row
from .memory import CATEGORIES, KNOWN_MODELS, OPTIMIZERS, _bad, _positive, as_spec, estimate, human, lora_modules
from .models import enable_checkpointing

COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#c44e52", "activations": "#55a868"}


@dataclass
class Measurement:
    """Peak bytes by category over real training steps, from torch's MemTracker (same fields as Estimate)."""
    weights: int  # Parameter + Buffer
    gradients: int  # Gradient
    optimizer: int  # Optstate (MemTracker files the optimizer step's scratch here too)
    activations: int  # Activation + Temp + Other (the inputs)
    total: int
    saved_activations: int  # live right after the forward, before the backward (the last step)
    snapshot: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    allocator_peak: int | None = None  # torch.cuda.max_memory_allocated during the tracked steps (CUDA only)
    config: dict = field(default_factory=dict)

    def categories(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in CATEGORIES}

    def as_dict(self) -> dict:
        return {**self.categories(), "total": self.total, "saved_activations": self.saved_activations,
                "snapshot": dict(self.snapshot), "seconds": self.seconds, "allocator_peak": self.allocator_peak,
                **self.config}

    def table(self) -> str:
        lines = [f"{'category':<34} {'size':>12}"] + [f"{k:<34} {human(v):>12}" for k, v in self.categories().items()]
        return "\n".join(lines + [f"{'total (measured peak)':<34} {human(self.total):>12}"])

    __str__ = table


def _training_copy(model) -> nn.Module:
    if isinstance(model, nn.Module):
        copied = copy.deepcopy(model)  # the caller's model is never touched
    elif model == "smollm2-135m":
        from .models import load_base_model
        copied = load_base_model()[0]
    elif model == "tiny":
        from .models import tiny_llama
        copied = tiny_llama(seed=0)
    else:
        raise ValueError(f"model must be an nn.Module, 'smollm2-135m' or 'tiny' to measure; got {model!r}")
    if getattr(copied, "config", None) is not None:
        copied.config.use_cache = False  # training keeps no KV cache (and checkpointing refuses one)
    return copied


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    makers = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
              "adamw": torch.optim.AdamW}
    if name not in makers:
        raise _bad("optimizer", name, makers)
    return makers[name](params, lr=lr)


class _NoHook:
    def remove(self) -> None:
        pass


def _mt_snapshot(mt, dev: torch.device, kind: str) -> dict[str, int]:
    snap = mt.get_tracker_snapshot(kind)
    snap = next((v for k, v in snap.items() if torch.device(k) == dev), {})
    return {getattr(k, "value", str(k)): int(v) for k, v in snap.items()}


def measure(model, method: str = "full", optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 128,
            gradient_checkpointing: bool = False, lora_rank: int = 8, lora_targets=("q_proj", "v_proj"),
            lora_dropout: float = 0.0, steps: int = 2, seed: int = 0, lr: float = 1e-4) -> Measurement:
    """Run ``steps`` real training steps on a copy of ``model`` under MemTracker; return the peak by category.

    One untracked warm-up step first creates the optimizer states, so the tracked steps are steady state.
    Each step: ``loss = model(input_ids, labels=input_ids).loss; loss.backward(); optimizer.step();
    optimizer.zero_grad(set_to_none=True)`` on random token ids (fixed ``seed``). Checkpointing is HF's
    (non-reentrant) with ``enable_input_require_grads()``, as ``estimate`` assumes. model: an nn.Module
    (HF causal LM), "smollm2-135m" or "tiny". MemTracker categories map to ours as Parameter + Buffer ->
    weights, Gradient -> gradients, Optstate -> optimizer, Activation + Temp + Other (the ids) -> activations.
    On CUDA ``allocator_peak`` adds torch.cuda.max_memory_allocated (which also sees kernel workspaces).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    if method not in ("full", "lora"):
        raise _bad("method", method, ("full", "lora"))
    B, T = _positive("batch_size", batch_size), _positive("seq_len", seq_len)
    _positive("lora_rank", lora_rank), _positive("steps", steps)
    if optimizer not in OPTIMIZERS:
        raise _bad("optimizer", optimizer, OPTIMIZERS)
    m = _training_copy(model).train()
    if method == "lora":
        from .lora import add_lora
        lora_modules(as_spec(m), lora_targets)  # the same ValueError as estimate for a target matching nothing
        add_lora(m, lora_targets, r=lora_rank, dropout=lora_dropout)
    if gradient_checkpointing:
        enable_checkpointing(m)
    opt = _make_optimizer(optimizer, [p for p in m.parameters() if p.requires_grad], lr)
    dev = next(m.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (B, T), generator=gen).to(dev)  # (batch, seq)
    after_forward: dict[str, int] = {}

    def step(tracker=None) -> None:
        loss = m(input_ids=ids, labels=ids).loss
        if tracker is not None:
            after_forward.update(_mt_snapshot(tracker, dev, "current"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        step()  # warm-up: creates the optimizer states
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        t0, peak = time.perf_counter(), {}
        for _ in range(steps):
            # A fresh tracker per step: one tracker across steps keeps the previous step's embedding output
            # alive through its hooks when it is a leaf (enable_input_require_grads), which plain training
            # does not. ``reset_mod_stats`` would be needed to reuse one.
            mt = MemTracker()
            mt.track_external(m, opt, ids)
            for p in m.parameters():  # MemTracker hooks every parameter it sees, which raises for frozen
                if not p.requires_grad:  # ones (LoRA): mark them as hooked already
                    mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            with mt:
                step(mt)
            now = _mt_snapshot(mt, dev, "peak")
            peak = now if now.get("Total", 0) > peak.get("Total", 0) else peak
        seconds = time.perf_counter() - t0
    alloc = None
    if dev.type == "cuda":  # the allocator's view (includes what MemTracker cannot see: workspaces)
        alloc = torch.cuda.max_memory_allocated(dev)
    act = lambda s: s.get("Activation", 0) + s.get("Temp", 0) + s.get("Other", 0)
    return Measurement(weights=peak.get("Parameter", 0) + peak.get("Buffer", 0), gradients=peak.get("Gradient", 0),
                       optimizer=peak.get("Optstate", 0), activations=act(peak), total=peak.get("Total", 0),
                       saved_activations=act(after_forward), snapshot=peak, seconds=seconds, allocator_peak=alloc,
                       config=dict(method=method, optimizer=optimizer, batch_size=B, seq_len=T,
                                   gradient_checkpointing=gradient_checkpointing,
                                   lora_rank=lora_rank if method != "full" else None))



def saved_by_module(model: nn.Module, input_ids: torch.Tensor) -> dict[str, int]:
    """Bytes autograd saves for the backward in one training forward, by the module that first saves each
    storage (parameters excluded, shared storages counted once): the activation formula, checked term by term.

    Runs ``model(input_ids, labels=input_ids)`` in train mode under ``torch.autograd.graph.saved_tensors_hooks``
    (what the loss saves is filed under ""). Not for checkpointed models (checkpoints keep their own hooks)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, seen, hooks = [""], {}, []
    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, n=name: stack.append(n)))
            hooks.append(mod.register_forward_hook(lambda m, i, o: stack.pop() and None))
    keep = []  # hold the saved tensors so that no address is reused while we count

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (stack[-1], st.nbytes())
        keep.append(t)
        return t

    was_training = model.training
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=input_ids, labels=input_ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: dict[str, int] = {}
    for where, nbytes in seen.values():
        out[where] = out.get(where, 0) + nbytes
    return out


def _params_of_lora(spec, targets, r: int) -> int:
    """LoRA parameters r (in + out) over the linears ``targets`` selects."""
    short = {k.rsplit(".", 1)[-1]: v for k, v in spec.linears().items()}
    return sum(r * sum(short[n.rsplit(".", 1)[-1]]) for n in lora_modules(spec, targets))


def _d(x: float, unit: str) -> str:
    div = {"TB": 1e12, "GB": 1e9, "MB": 1e6}[unit]
    return f"{x / div:,.1f} {unit}" if x / div < 100 else f"{x / div:,.0f} {unit}"


def seed_four_slots(model="smollm2-135m", batch_size: int = 1, seq_len: int = 512) -> list[dict]:
    """(a) The seed's "4 slots" (fp32, Adam, no mixed precision), in bytes per parameter, ours from estimate()."""
    e = estimate(model, "full", "fp32", "adamw", batch_size=batch_size, seq_len=seq_len)
    P, s = e.params, e.slots
    per_token = e.saved_activations / (batch_size * seq_len)
    rows = [dict(quantity="weights (B/param)", paper="4", ours=f"{s['weights'] / P:.2f}",
                 note="fp32: 4 bytes per parameter (+ RoPE buffers)"),
            dict(quantity="gradients (B/param)", paper="4", ours=f"{s['gradients'] / P:.2f}",
                 note="one fp32 gradient per trainable parameter"),
            dict(quantity="Adam states (B/param)", paper="8", ours=f"{s['optimizer'] / P:.2f}",
                 note="exp_avg + exp_avg_sq, fp32 (+ a 4-byte step counter per tensor)"),
            dict(quantity="forward (B/param)", paper="4", ours=f"{s['forward'] / P:.2f}",
                 note=f"not a per-parameter cost: {per_token / 1e3:,.0f} KB per token here (B={batch_size}, "
                      f"T={seq_len}); equals 4 B/param at B*T = {4 * P / per_token:,.0f} tokens"),
            dict(quantity="sum of the slots", paper="20 x P bytes", ours=_d(e.naive_total, "GB"),
                 note=f"{as_spec(model).name}, P = {P:,}"),
            dict(quantity="peak of a real step", paper="-", ours=_d(e.total, "GB"),
                 note=f"at '{e.peak_moment}': the backward frees activations as it makes gradients, so the "
                      "slots never all peak together (but logit gradients add 8 B x vocabulary per token)")]
    return rows


def seed_gpt3_lora(seq_len: int = 2048, batch_size: int = 1) -> list[dict]:
    """(b) GPT-3 175B: LoRA's trainable parameters and VRAM vs full fine-tuning (LoRA paper, sec. 4.2)."""
    spec = as_spec("gpt3-175b")
    P, qv = spec.count(), ("q_proj", "v_proj")
    r1, r4 = _params_of_lora(spec, qv, 1), _params_of_lora(spec, qv, 4)
    kw = dict(optimizer="adam", batch_size=batch_size, seq_len=seq_len)
    full16, lora16 = estimate(spec, "full", "fp16", **kw), estimate(spec, "lora", "fp16", lora_rank=4, **kw)
    fullmx = estimate(spec, "full", "mixed", **kw)
    return [
        dict(quantity="parameters", paper="175B", ours=f"{P / 1e9:.1f}B",
             note="96 layers x 12 d^2 + embeddings (12288 x 50257) + positions"),
        dict(quantity="LoRA trainable params (Wq, Wv)", paper="4.7M", ours=f"{r1 / 1e6:.2f}M",
             note=f"r = 1: 2 matrices x 96 layers x r (d + d); r = 4 gives {r4 / 1e6:.1f}M, r = 8 {2 * r4 / 1e6:.1f}M"),
        dict(quantity="fewer trainable params", paper="10,000x", ours=f"{P / r4:,.0f}x",
             note=f"at r = 4 (the paper's 10,000x; r = 1 would be {P / r1:,.0f}x); "
                  f"checkpoint {_d(2 * P, 'GB')} -> {_d(2 * r4, 'MB')} in fp16 (paper: 350 GB -> 35 MB)"),
        dict(quantity="VRAM, full fine-tuning", paper="1.2 TB", ours=_d(full16.total, "TB"),
             note=f"fp16 weights, grads and Adam states, B={batch_size}, T={seq_len}; with an fp32 master copy "
                  f"(mixed, ZeRO's 16 B/param) {_d(fullmx.total, 'TB')}"),
        dict(quantity="VRAM, LoRA (r=4, Wq, Wv)", paper="350 GB", ours=_d(lora16.total, "GB"),
             note=f"the fp16 weights alone are {_d(2 * P, 'GB')}; the rest is activations (frozen weights still "
                  "pass gradients to their inputs)"),
        dict(quantity="VRAM reduction", paper="1/3", ours=f"1/{full16.total / lora16.total:.1f}",
             note="the paper's 'up to 2/3' drops the Adam states (2 of 3 weight-sized slots); we also drop the "
                  f"gradients (another slot), so 1/{full16.total / lora16.total:.1f} at this batch; batch and sequence"
                  " are not stated in the paper"),
    ]


def _closest_lora(spec, target_params: float, ranks=(1, 2, 4, 8, 16, 32, 64)) -> tuple:
    options = [(abs(_params_of_lora(spec, t, r) - target_params), name, r, _params_of_lora(spec, t, r))
               for name, t in (("Wq, Wv", ("q_proj", "v_proj")), ("Wq, Wk, Wv, Wo", ("q_proj", "k_proj",
                               "v_proj", "o_proj")), ("all linear", "all-linear")) for r in ranks]
    return min(options)[1:]


def seed_qlora_llama7b(seq_len: int | None = None) -> list[dict]:
    """(c) LLaMA-7B under QLoRA (QLoRA paper sec. 4): 4-bit base, LoRA weights, "input gradients" per sequence.

    seq_len: None = the length at which our saved activations match the paper's 567 MB (batch 1)."""
    spec = as_spec("llama-7b")
    P = spec.count()
    name, r, n = _closest_lora(spec, 26e6 / 2)  # 26 MB of bf16 LoRA weights = 13M params
    targets = {"Wq, Wv": ("q_proj", "v_proj"), "Wq, Wk, Wv, Wo": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "all linear": "all-linear"}[name]
    kw = dict(method="qlora", lora_rank=r, lora_targets=targets, batch_size=1)
    if seq_len is None:  # activations grow linearly in T: solve from two points
        a1, a2 = (estimate(spec, seq_len=t, **kw).saved_activations for t in (64, 128))
        seq_len = max(1, round(64 + (567e6 - a1) / ((a2 - a1) / 64)))
    e, ck = estimate(spec, seq_len=seq_len, **kw), estimate(spec, seq_len=seq_len, gradient_checkpointing=True, **kw)
    base = e.slots["weights"] - 2 * n
    return [
        dict(quantity="4-bit base model", paper="5,048 MB", ours=_d(base, "MB"),
             note=f"NF4 + double quantization (4.127 bits) on the {spec.n_layers * sum(i * o for i, o in spec.linears().values()) / 1e9:.2f}B"
                  " linear weights, embeddings and head in bf16; the paper's figure is measured (CUDA context, "
                  "buffers, allocator rounding are not in ours)"),
        dict(quantity="LoRA weights", paper="26 MB (0.2%)", ours=f"{_d(2 * n, 'MB')} ({100 * n / P:.2f}%)",
             note=f"closest standard config: {name}, r = {r} ({n / 1e6:.1f}M params in bf16); the paper does not "
                  "say which (26 MB in 16 bits = 13M params = 0.19%)"),
        dict(quantity="input gradients, batch 1", paper="567 MB", ours=f"{_d(e.saved_activations, 'MB')} at T = {seq_len}",
             note=f"the paper states no sequence length, so T = {seq_len} is solved from our formula to give "
                  "567 MB: this row calibrates T, it checks nothing; the next row, at the same T, does"),
        dict(quantity="... with gradient checkpointing", paper="18 MB", ours=_d(ck.saved_activations, "MB"),
             note=f"same T; ours keep {spec.n_layers} layer inputs + the fp32 log-probs (4 V T); the paper's "
                  f"567/18 = 31.5 ~ {spec.n_layers} layers suggests it counts about one layer's activations"),
    ]


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    keys = ["quantity", "paper", "ours", "note"]
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys[:3]}
    lines = ["  ".join(k.ljust(width[k]) for k in keys[:3]) + "  note"]
    lines += ["  ".join(str(r[k]).ljust(width[k]) for k in keys[:3]) + "  " + r["note"] for r in rows]
    return "\n".join(lines)


def plot_breakdown(results: dict, ax=None, title: str | None = None):
    """Stacked bars by category (weights, gradients, optimizer, activations) at the peak, one per label.

    results: {label: Estimate or Measurement}. A dash marks an Estimate's seed sum (the four slots added up).
    Returns the matplotlib figure (call plt.show())."""
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results must map at least one label to an Estimate or a Measurement")
    fig, ax = (plt.subplots(figsize=(5, 3)) if ax is None else (ax.figure, ax))
    top = max(max(r.total, getattr(r, "naive_total", 0)) for r in results.values())
    unit, div = next((u, d) for u, d in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10),
                                          ("B", 1)) if top >= d or d == 1)
    labels = list(results)
    bottom = [0.0] * len(labels)
    for cat in CATEGORIES:
        vals = [getattr(results[k], cat) / div for k in labels]
        ax.bar(labels, vals, bottom=bottom, color=COLORS[cat], label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, k in enumerate(labels):
        if hasattr(results[k], "naive_total"):
            ax.plot([i - 0.4, i + 0.4], [results[k].naive_total / div] * 2, "k--", lw=1,
                    label="seed sum" if i == next(j for j, l in enumerate(labels) if hasattr(results[l],
                                                                                         "naive_total")) else None)
    ax.set_ylabel(unit)
    ax.set_title(title or "memory at the peak of a training step", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def calculator():
    """An ipywidgets calculator: pick a model, method, batch, sequence, rank, dtype, optimizer, checkpointing;
    the stacked bars (full fine-tuning next to the chosen method) and the table update."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    c = dict(model=widgets.Dropdown(options=list(KNOWN_MODELS), value="smollm2-135m", description="model"),
             method=widgets.Dropdown(options=["full", "lora", "qlora"], value="lora", description="method"),
             batch_size=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
             seq_len=widgets.SelectionSlider(options=[2 ** k for k in range(6, 15)], value=512, description="seq len"),
             lora_rank=widgets.SelectionSlider(options=[2 ** k for k in range(9)], value=8, description="rank"),
             dtype=widgets.Dropdown(options=["fp32", "bf16", "fp16", "mixed"], value="fp32", description="dtype"),
             optimizer=widgets.Dropdown(options=["sgd", "rmsprop", "adamw", "adamw8bit", "paged_adamw"],
                                        value="adamw", description="optimizer"),
             gradient_checkpointing=widgets.Checkbox(value=False, description="checkpointing"))

    def show(model, method, batch_size, seq_len, lora_rank, dtype, optimizer, gradient_checkpointing):
        kw = dict(dtype=dtype, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                  gradient_checkpointing=gradient_checkpointing)
        chosen = estimate(model, method, lora_rank=lora_rank, **kw)
        fig = plot_breakdown({"full": estimate(model, "full", **kw), method: chosen}, title=model)
        plt.show()
        plt.close(fig)
        print(chosen.table())

    out = widgets.interactive_output(show, c)
    ui = widgets.VBox([widgets.HBox([c["model"], c["method"], c["dtype"], c["optimizer"]]),
                       widgets.HBox([c["batch_size"], c["seq_len"], c["lora_rank"], c["gradient_checkpointing"]]), out])
    _ = display
    return ui


BENCH_SHAPES = {"tiny": (4, 64), "smollm2-135m": (2, 128)}  # (batch, seq): SmolLM2 ~10-40 s a case on a CPU


@register("memory")
def bench_memory(quick: bool = False) -> list[dict]:
    """estimate() vs measure() peak, fp32 + AdamW: {tiny, SmolLM2} x {full, LoRA q,v r=8} x {checkpointing}."""
    from .models import load_base_model, tiny_llama

    models = {"tiny": tiny_llama(seed=0)}
    if not quick:
        models["smollm2-135m"] = load_base_model()[0]
    rows = []
    for name, model in models.items():
        B, T = BENCH_SHAPES[name]
        for method in ("full", "lora"):
            for ckpt in (False, True):
                t0 = time.perf_counter()
                kw = dict(method=method, batch_size=B, seq_len=T, gradient_checkpointing=ckpt)
                # one tracked step after measure's warm-up is already steady state; MemTracker is slow on big graphs
                est, got = estimate(model, **kw), measure(model, steps=2 if name == "tiny" else 1, **kw)
                case = f"{name} {method}{' +ckpt' if ckpt else ''} B{B} T{T}"
                rows.append(row(case, "bytes", est.total, "measured (MemTracker)", got.total,
                                peak_moment=est.peak_moment, saved_activations=est.saved_activations,
                                measured_saved_activations=got.saved_activations,
                                seconds=round(time.perf_counter() - t0, 2)))
    return rows

