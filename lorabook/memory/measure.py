"""Memory measured: real training steps under torch's MemTracker, peak bytes by category (``Measurement``), and what
autograd saves per module (``saved_by_module``) -- the measured side of ``lorabook.memory.estimate``.

    measure(model, method, optimizer, batch_size, seq_len, ...) -> Measurement(weights, gradients, optimizer,
                                                                             activations, total, ...)
    Measurement.slots        the seed's four slots, each measured at its own moment of the step
    peak_over_slots(m)       measured peak minus the sum of those slots, split into what makes the difference
    state_bytes_after_step(make_optimizer, shapes)   bytes an optimizer really keeps, after one step on such tensors

MemTracker categories map to ours as Parameter + Buffer -> weights, Gradient -> gradients, Optstate ->
optimizer, Activation + Temp + Other (the input ids) -> activations. On CUDA the allocator's own peak is kept too.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._checks import bad_choice, check_module, check_positive_int
from ..models import enable_checkpointing
from .estimate import CATEGORIES, ESTIMATE_METHODS, ESTIMATE_OPTIMIZERS, human
from .spec import as_spec, lora_modules

__all__ = ["Measurement", "measure", "saved_by_module", "peak_over_slots", "state_bytes_after_step", "step_peak"]


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
    after_forward: dict[str, int] = field(default_factory=dict)  # MemTracker's categories once the loss exists
    after_backward: dict[str, int] = field(default_factory=dict)  # ... once loss.backward() returned

    @property
    def slots(self) -> dict[str, int]:
        """The seed's four slots, measured: weights and optimizer states after the forward, all gradients after
        the backward, and the forward's saved activations (live after the forward, before the backward)."""
        f, b = self.after_forward, self.after_backward
        return {"weights": f.get("Parameter", 0) + f.get("Buffer", 0), "gradients": b.get("Gradient", 0),
                "optimizer": f.get("Optstate", 0), "forward": self.saved_activations}

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
    if not isinstance(model, str):
        copied = copy.deepcopy(check_module("model", model))  # the caller's model is never touched
    elif model == "smollm2-135m":
        from ..models import load_base_model
        copied = load_base_model()[0]
    elif model == "tiny":
        from ..models import tiny_llama
        copied = tiny_llama(seed=0)
    else:
        raise ValueError(f"model must be an nn.Module, 'smollm2-135m' or 'tiny' to measure; got {model!r}")
    if getattr(copied, "config", None) is not None:
        copied.config.use_cache = False  # training keeps no KV cache (and checkpointing refuses one)
    return copied


def _lion(params, lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' 32-bit Lion (Chen et al. 2023, arXiv:2302.06675): one fp32 momentum per parameter."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns at import about an optional CPU kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from bitsandbytes.optim import Lion
    return Lion(params, lr=lr, optim_bits=32)


def _tracked(kind: str, model: nn.Module, optimizer, *inputs: torch.Tensor):
    """A tracker (``_tracker``) that knows ``model``'s parameters and buffers, ``optimizer``'s state (a paged one's
    pages too) and the ``inputs``, made before the step it will watch."""
    mt = _tracker(kind)
    mt.track_external(model, *([] if optimizer is None else [optimizer]), *inputs)
    for page in _pages(optimizer):  # a paged optimizer keeps its state in pages, not in opt.state
        mt._update_and_maybe_create_winfos(page, _optstate())
    for p in model.parameters():  # MemTracker hooks every parameter it sees, which raises for frozen
        if not p.requires_grad:  # ones (LoRA): mark them as hooked already
            mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    return mt


def step_peak(step, model: nn.Module, *inputs: torch.Tensor, optimizer=None) -> dict[str, int]:
    """MemTracker's peak (bytes by category, and "Total") over one call of ``step()``: any training step of
    ``model`` on ``inputs`` -- another library's too (``python -m lorabook.bench qlora-step`` measures peft's)."""
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    check_module("model", model)
    mt = _tracked("peak-only", model, optimizer, *inputs)
    with mt:
        step()
    return _mt_snapshot(mt, next(model.parameters()).device, "peak")


def _optstate():
    from torch.distributed._tools.mem_tracker import _MemRefType
    return _MemRefType.OPT


def _pages(optimizer) -> list[torch.Tensor]:
    """The state pages of a ``lorabook.paged`` optimizer (on the device and on the host); [] for any other."""
    pools = getattr(optimizer, "pools", {}).values()  # (None: no optimizer)
    return [page for pool in pools for where in (pool.on_device, pool.on_host) for page in where.values()]


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    from ..adamw8bit import AdamW8bit
    from ..paged import PagedAdamW, PagedAdamW8bit

    makers = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
              "adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit, "paged_adamw": PagedAdamW,
              "paged_adamw8bit": PagedAdamW8bit, "lion": _lion}
    if name not in makers:
        raise bad_choice("optimizer", name, makers)
    return makers[name](params, lr=lr)


def _tracker(kind: str):
    """torch's MemTracker ("memtracker"), or ("peak-only") the same tracker keeping only the whole step's peak.

    MemTracker updates a peak for every module entered so far on every op (a loop over ~400 modules per op for
    SmolLM2); ``measure`` reads only the whole step's peak and snapshots, so "peak-only" skips that loop -- the
    rest of the tracker (what is counted, and when) is torch's own. Tested equal on every field
    (tests/test_memory.py). Where torch's internals differ from 2.13's, "peak-only" falls back to MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    if kind == "peak-only" and all(hasattr(tracker, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap")):
        def update_peak_stats(peak_state) -> None:  # the last loop of MemTracker._update_peak_stats, alone
            for dev, snap in tracker._curr_mem_snap.items():
                if tracker._peak_mem.get(dev, 0) < snap["Total"]:
                    tracker._peak_mem[dev] = snap["Total"]
                    tracker._peak_mem_snap[dev] = dict(snap)
        tracker._update_peak_stats = update_peak_stats
    return tracker


TRACKERS = ("peak-only", "memtracker")


class _NoHook:
    def remove(self) -> None:
        pass


def _mt_snapshot(mt, dev: torch.device, kind: str) -> dict[str, int]:
    snap = mt.get_tracker_snapshot(kind)
    snap = next((v for k, v in snap.items() if torch.device(k) == dev), {})
    return {getattr(k, "value", str(k)): int(v) for k, v in snap.items()}


def measure(model, method: str = "full", optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 128,
            gradient_checkpointing: bool = False, lora_rank: int = 8, lora_targets=("q_proj", "v_proj"),
            lora_dropout: float = 0.0, steps: int = 2, seed: int = 0, lr: float = 1e-4,
            tracker: str = "peak-only") -> Measurement:
    """Run ``steps`` real training steps on a copy of ``model`` under MemTracker; return the peak by category.

    One untracked warm-up step first creates the optimizer states, so the tracked steps are steady state.
    Each step: ``loss = model(input_ids, labels=input_ids).loss; loss.backward(); optimizer.step();
    optimizer.zero_grad(set_to_none=True)`` on random token ids (fixed ``seed``). Checkpointing is HF's
    (non-reentrant) with ``enable_input_require_grads()``, as ``estimate`` assumes. model: an nn.Module
    (HF causal LM), "smollm2-135m" or "tiny". MemTracker categories map to ours as Parameter + Buffer ->
    weights, Gradient -> gradients, Optstate -> optimizer, Activation + Temp + Other (the ids) -> activations.
    On CUDA ``allocator_peak`` adds torch.cuda.max_memory_allocated (which also sees kernel workspaces).
    ``tracker``: "peak-only" (default: MemTracker without its per-module peaks, which nothing here reads; about
    twice as fast on SmolLM2) or "memtracker" (torch's, unchanged); both give the same numbers.
    """
    if tracker not in TRACKERS:
        raise bad_choice("tracker", tracker, TRACKERS)
    if method not in ESTIMATE_METHODS:
        raise bad_choice("method", method, ESTIMATE_METHODS)
    B, T = check_positive_int("batch_size", batch_size), check_positive_int("seq_len", seq_len)
    check_positive_int("lora_rank", lora_rank), check_positive_int("steps", steps)
    if optimizer not in ESTIMATE_OPTIMIZERS:
        raise bad_choice("optimizer", optimizer, ESTIMATE_OPTIMIZERS)
    m = _training_copy(model).train()
    if method != "full":
        lora_modules(as_spec(m), lora_targets)  # the same ValueError as estimate for a target matching nothing
    if method == "lora":
        from ..lora import add_lora
        add_lora(m, lora_targets, r=lora_rank, dropout=lora_dropout)
    if method == "qlora":  # NF4 + double-quantized base (bf16 compute), LoRA on the targets (fp32)
        from ..qlora import add_qlora
        add_qlora(m, r=lora_rank, dropout=lora_dropout, target_modules=lora_targets, gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_checkpointing(m)
    opt = _make_optimizer(optimizer, [p for p in m.parameters() if p.requires_grad], lr)
    dev = next(m.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (B, T), generator=gen).to(dev)  # (batch, seq)
    after_forward: dict[str, int] = {}
    after_backward: dict[str, int] = {}

    def step(tracker=None) -> None:
        loss = m(input_ids=ids, labels=ids).loss
        if tracker is not None:
            after_forward.update(_mt_snapshot(tracker, dev, "current"))
        loss.backward()
        if tracker is not None:
            after_backward.update(_mt_snapshot(tracker, dev, "current"))
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
            mt = _tracked(tracker, m, opt, ids)
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
                                   lora_rank=lora_rank if method != "full" else None),
                       after_forward=dict(after_forward), after_backward=dict(after_backward))


def peak_over_slots(m: Measurement) -> dict[str, int]:
    """Measured peak minus the seed's sum of four slots (``m.slots``), split by MemTracker's categories at the
    peak; the values add up to ``m.total - sum(m.slots.values())`` exactly.

    - "gradients not yet made": the gradients that do not exist yet at the peak moment (<= 0);
    - "activations freed (-) or recomputed (+)": the forward's tensors the backward has released, plus what
      gradient checkpointing recomputes (MemTracker files a recomputed forward as activations);
    - "backward temporaries": MemTracker's Temp at the peak minus after the forward -- tensors the backward
      creates that are not parameter gradients: gradients of activations (d logits, d log-probs: 4 B T V each
      in fp32), the engine's buffer where a tied weight's two gradients wait to be summed;
    - "optimizer step scratch": Optstate at the peak beyond the states (sqrt(v) and friends; MemTracker files
      the step's temporaries there).
    MemTracker counts tensor storage bytes; the CUDA caching allocator's rounding and kernel workspaces are not
    in it (``m.allocator_peak`` has them on CUDA; see torch.cuda.memory_stats)."""
    if not isinstance(m, Measurement):
        raise TypeError(f"m must be a Measurement (from lorabook.memory.measure), got {type(m).__name__}")
    if not m.after_forward or not m.after_backward:
        raise ValueError("m has no after_forward / after_backward snapshots: measure it with lorabook.memory.measure")
    s, p, f = m.slots, m.snapshot, m.after_forward
    act = lambda x: x.get("Activation", 0) + x.get("Other", 0)
    out = {"gradients not yet made": p.get("Gradient", 0) - s["gradients"],
           "activations freed (-) or recomputed (+)": act(p) - act(f),
           "backward temporaries": p.get("Temp", 0) - f.get("Temp", 0),
           "optimizer step scratch": p.get("Optstate", 0) - s["optimizer"]}
    weights = p.get("Parameter", 0) + p.get("Buffer", 0) - s["weights"]
    if weights:
        out["weights"] = weights
    return out


def state_bytes_after_step(make_optimizer, shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the tensors an optimizer keeps after one step on parameters of these shapes (each storage once):
    what ``optimizer_state_bytes`` predicts, counted on the real thing. Works for any ``torch.optim`` optimizer
    (or bitsandbytes'); ``make_optimizer(params)`` builds it, e.g. ``torch.optim.Adafactor`` or
    ``lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)``. Plain Python numbers in the state (bitsandbytes'
    step counter) hold no tensor bytes and are not counted."""
    if not callable(make_optimizer):
        raise TypeError(f"make_optimizer must be callable (params -> optimizer), got {type(make_optimizer).__name__}")
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise ValueError(f"shapes must be a non-empty list of tensor shapes, got {shapes!r}")
    for i, shape in enumerate(shapes):
        if not isinstance(shape, (list, tuple)) or not shape:
            raise ValueError(f"shapes[{i}] must be a non-empty tuple of positive ints, got {shape!r}")
        for n in shape:
            check_positive_int(f"shapes[{i}]", n)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(tuple(s), generator=gen).to(dtype)) for s in shapes]
    optimizer = make_optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    optimizer.step()
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def saved_by_module(model: nn.Module, input_ids: torch.Tensor) -> dict[str, int]:
    """Bytes autograd saves for the backward in one training forward, by the module that first saves each
    storage (parameters excluded, shared storages counted once): the activation formula, checked term by term.

    Runs ``model(input_ids, labels=input_ids)`` in train mode under ``torch.autograd.graph.saved_tensors_hooks``
    (what the loss saves is filed under ""). Not for checkpointed models (checkpoints keep their own hooks)."""
    check_module("model", model)
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
