"""Benchmarks for ``lorabook.lora``: the LoRA paper's inference-latency table and the cost of a training step.

``python -m lorabook.bench lora-latency`` -- Hu et al. (2021, arXiv:2106.09685) Table 1 times a GPT-2 medium
forward (24 layers, d_model 1024, 16 heads) at batch 1 and a short sequence, the "online" case, where an
adapter's extra sequential work shows most; a merged LoRA costs exactly the base. We time, on one seeded model
with random weights (latency does not depend on their values), eval mode, no_grad:

    base                the plain GPT-2
    merged LoRA         lorabook, ΔW merged into W            goal: / base ≤ 1.01
    unmerged LoRA       lorabook, W x + s · B (A x)           goal: / base ≤ 1.10 at batch 1
                        (``lora_forward_fused``: s · (A x) Bᵀ added into W x by one addmm), and against
                        lorabook's readable path (``LoRALinear(backend="reference")``, ``lora_forward``)
    peft unmerged LoRA  peft's lora.Linear, same A, B, r, α    (lorabook / peft: lower is better)
    switch adapter      unmerge one adapter, merge another (lorabook ``switch_adapter`` vs peft's
                        unmerge_adapter + set_adapter + merge_adapter)

Targets: GPT-2 fuses W_q, W_k, W_v into one ``c_attn`` Conv1D (1024 -> 3072). The paper's loralib adapts its
q and v thirds (MergedLinear); lorabook and peft adapt a module as a whole, so both put one rank-r adapter on all
of ``c_attn``: r · (1024 + 3072) parameters per layer instead of 2 · r · (1024 + 1024). r = 4, α = 8.
All variants share the same base weights (the LoRA layers wrap the same Conv1D objects and are swapped in and
out), and the variants are timed in interleaved rounds so a change in the machine's load hits all of them.
Each row's ``lorabook`` / ``peer_value`` are medians over all calls; ``paired_ratio`` (JSON only) is the median
over rounds of the within-round ratio, the steadier number on a busy machine. CPU timings use one thread
(see ``_threads``).

``python -m lorabook.bench lora-step`` -- one training step (forward, backward, AdamW step, zero_grad) on a
SmolLM2-135M-shaped Llama (random weights, 30 layers, d 576, vocab 49152): lorabook LoRA (q_proj, v_proj, r 8,
α 16) vs full fine-tuning vs peft's LoRA with the same settings; goal: lorabook / peft ≤ 1.0. Peak memory per
step comes from ``lorabook.memory.measure`` (torch's MemTracker; on CUDA the allocator's peak): the seed's
"LoRA trains ≈ 25% faster with up to 3x less memory" is for GPT-3 175B, where optimizer states dominate.
``--quick`` runs tiny models (seconds); the full runs take minutes on a CPU.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable

import torch
import torch.nn as nn

from ..lora import LoRALinear, add_lora, merge_lora, set_adapter, switch_adapter, unmerge_lora
from . import register, row
from .harness import bench_device, gpt2_medium, interleaved, nothing, paired_ratio, step_batch, threads

RANK, ALPHA = 4, 8  # latency: the paper's GPT-2 rank
STEP_RANK, STEP_ALPHA = 8, 16  # step: the common q_proj, v_proj default


@register("lora-latency")
@threads()  # a context manager as a decorator: the whole benchmark on one CPU thread
def lora_latency(quick: bool = False) -> list[dict]:
    import peft

    dev = bench_device()
    model = gpt2_medium(quick=quick).to(dev)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=False)  # B random too: the LoRA path does real work
    peft_model = peft.get_peft_model(model, config)  # injects peft's layers into `model` in place
    peft_model.add_adapter("two", config)
    peft_layers = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    base_layers = {n: m.base_layer for n, m in peft_layers.items()}
    ours = {}
    for n, pl in peft_layers.items():  # lorabook's layers on the same Conv1D objects, with peft's A and B
        ours[n] = LoRALinear(pl.base_layer, r=RANK, alpha=ALPHA)
        ours[n].add_adapter("two", r=RANK, alpha=ALPHA)
        with torch.no_grad():
            for name in ("default", "two"):
                ours[n].lora_A[name].copy_(pl.lora_A[name].weight)
                ours[n].lora_B[name].copy_(pl.lora_B[name].weight)
        ours[n].active_adapter = "default"
    peft_model.set_adapter("default")

    def use(layers):
        return lambda: [model.set_submodule(n, m) for n, m in layers.items()]

    def use_ours(backend):
        def setup():
            use(ours)()
            for layer in ours.values():
                layer.backend = backend
        return setup

    def merged_in():
        use(ours)()
        merge_lora(model, "default")

    def merged_out():
        unmerge_lora(model)
        set_adapter(model, "default")

    names = itertools.cycle(["two", "default"])

    def peft_switch():
        peft_model.base_model.unmerge_adapter()
        peft_model.base_model.set_adapter(next(names))
        peft_model.base_model.merge_adapter()

    def peft_merged_out():
        peft_model.base_model.unmerge_adapter()
        peft_model.base_model.set_adapter("default")

    shapes = [(1, 32)] if quick else [(1, 128)] + ([(16, 256)] if dev.type == "cuda" else [(4, 128)])
    rows = []
    for B, T in shapes:
        ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)

        def forward():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits

        variants = {"base": (use(base_layers), forward, nothing),
                    "merged": (merged_in, forward, merged_out),
                    "unmerged": (use(ours), forward, nothing),
                    "reference": (use_ours("reference"), forward, use_ours("auto")),
                    "peft": (use(peft_layers), forward, nothing)}
        rounds, repeat = (3, 1) if quick else ((12, 1) if B * T <= 128 else (6, 1))
        t = interleaved(variants, rounds=rounds, repeat=repeat, warmup=1, device=dev)
        pr = lambda a, b: {"paired_ratio": paired_ratio(t[a], t[b], repeat)}
        use(ours)()
        out = forward()
        use_ours("reference")()
        reference_diff = (out - forward()).abs().max().item()
        use_ours("auto")()
        use(peft_layers)()
        diff = (out - forward()).abs().max().item()
        case = f"GPT-2{' (quick)' if quick else ' M'} b{B} s{T}"
        rows += [row(f"{case}: merged LoRA", "seconds", t["merged"].median, "base", t["base"].median,
                     goal="<= 1.01", **pr("merged", "base")),
                 row(f"{case}: unmerged LoRA", "seconds", t["unmerged"].median, "base", t["base"].median,
                     **({"goal": "<= 1.10"} if B == 1 else {}), **pr("unmerged", "base")),
                 row(f"{case}: unmerged LoRA", "seconds", t["unmerged"].median, f"peft {peft.__version__}",
                     t["peft"].median, max_abs_logit_diff=diff, **pr("unmerged", "peft")),
                 row(f"{case}: unmerged LoRA", "seconds", t["unmerged"].median, "lorabook reference forward",
                     t["reference"].median, max_abs_logit_diff=reference_diff, **pr("unmerged", "reference"))]
    use(ours)()
    merge_lora(model, "default")
    cycle = itertools.cycle(["two", "default"])
    variants = {"ours": (nothing, lambda: switch_adapter(model, next(cycle)), nothing),
                "peft": (lambda: (unmerge_lora(model), use(peft_layers)(), peft_model.base_model.merge_adapter()),
                         peft_switch, lambda: (peft_merged_out(), use(ours)(), merge_lora(model, "default")))}
    t = interleaved(variants, rounds=3, repeat=2, warmup=1, device=dev)
    rows.append(row(f"switch adapter, {len(ours)} c_attn layers", "seconds", t["ours"].median,
                    f"peft {peft.__version__}", t["peft"].median))
    return rows


def _trainer(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    model.train()
    model.config.use_cache = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@register("lora-step")
@threads()  # a context manager as a decorator: the whole benchmark on one CPU thread
def lora_step(quick: bool = False) -> list[dict]:
    import peft

    from ..memory import measure

    dev = bench_device()
    base, ids = step_batch(quick, dev)
    B, T = ids.shape
    targets = ["q_proj", "v_proj"]
    full = copy.deepcopy(base).requires_grad_(True)
    ours = add_lora(copy.deepcopy(base), targets, r=STEP_RANK, alpha=STEP_ALPHA)
    peft_cfg = peft.LoraConfig(r=STEP_RANK, lora_alpha=STEP_ALPHA, target_modules=targets, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg).get_base_model()
    steps = {"ours": _trainer(ours, ids), "full": _trainer(full, ids), "peft": _trainer(theirs, ids)}
    rounds, repeat = (2, 1) if quick else (8, 1)
    t = interleaved({k: (nothing, fn, nothing) for k, fn in steps.items()}, rounds=rounds, repeat=repeat,
                    warmup=1, device=dev)
    pr = lambda a, b: {"paired_ratio": paired_ratio(t[a], t[b], repeat)}
    del steps, full, ours
    kw = dict(optimizer="adamw", batch_size=B, seq_len=T, steps=1)
    peak = {"ours": measure(base, method="lora", lora_rank=STEP_RANK, lora_targets=tuple(targets), **kw),
            "full": measure(base, method="full", **kw),
            "peft": measure(theirs, method="full", **kw)}  # "full" trains what requires grad: peft's A and B
    mem = {k: m.allocator_peak or m.total for k, m in peak.items()}
    case = f"{'tiny Llama' if quick else 'SmolLM2-135M-shaped'} b{B} s{T}"
    pv = f"peft {peft.__version__} LoRA"
    return [row(f"{case}: LoRA step", "seconds", t["ours"].median, pv, t["peft"].median, goal="<= 1.0",
                **pr("ours", "peft")),
            row(f"{case}: LoRA step", "seconds", t["ours"].median, "full fine-tuning", t["full"].median,
                **pr("ours", "full")),
            row(f"{case}: LoRA peak", "bytes", mem["ours"], pv, mem["peft"]),
            row(f"{case}: LoRA peak", "bytes", mem["ours"], "full fine-tuning", mem["full"])]
