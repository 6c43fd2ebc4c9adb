"""What training costs in memory: an analytic estimate, derived tensor by tensor, checked against a measurement.

References: Hu et al., "LoRA" (2021, arXiv:2106.09685) sec. 4.2 (GPT-3 175B: VRAM 1.2 TB -> 350 GB, 10,000x
fewer trainable parameters); Dettmers et al., "QLoRA" (2023, arXiv:2305.14314) sec. 3-4 (NF4 with double
quantization, 4 + 8/64 + 32/(64*256) = 4.127 bits per weight; the LLaMA-7B footprint); Rajbhandari et al.,
"ZeRO" (2020, arXiv:1910.02054) sec. 3.1 (mixed-precision Adam: 2 + 2 + 12 bytes per parameter); Dettmers et
al., "8-bit Optimizers" (2022, arXiv:2110.02861) (1-byte states, an fp32 absmax per block of 256); Korthikanti
et al. (2022, arXiv:2205.05198) sec. 4 (activations per layer as a sum of saved tensors); Chen et al., "Symbolic
Discovery of Optimization Algorithms" (2023, arXiv:2302.06675) Algorithm 2 (Lion: one momentum per parameter).

The seed's picture, fp32 + Adam, per parameter: weights 4 B + gradients 4 B + Adam m and v 8 B, plus the forward
activations, which grow with batch B and sequence T, not with the parameter count P:

    memory ~ 16 P + activations(B, T)             (``naive_total``: the four ``slots`` added up)

A step never holds all four at once: with ``zero_grad(set_to_none=True)`` no gradient exists during the forward,
and the backward frees saved activations while it creates gradients. ``estimate`` follows one steady-state step
(the optimizer states exist) through its moments and reports the largest as ``total``; W weights, O optimizer
states, A saved activations, G gradients, N = B T tokens, V vocabulary, d width, a / g bytes per activation /
gradient element:

    forward, at the loss   W + O + A + a N V (logits) (+ 4 N V: their fp32 upcast when a = 2)
    backward, at the loss  W + O + A + 2 * 4 N V      d log-probs and d logits, fp32
    backward, lm_head      W + O + A - 4 N V + a N V + G(head)
    backward, layer i      W + O + G(head, layers > i) + A(layers <= i) + the peak of layer i's backward,
                           replayed node by node (each node allocates its input and weight gradients, then
                           autograd frees what it consumed and what it had saved)
    backward, embedding    W + O + G + 2 V d g         tied head: its gradient waits in the engine's buffer for
                                                       the embedding's, and the two are summed into a third
    optimizer step         W + O + G + scratch         torch AdamW on CPU: sqrt(v), then sqrt(v)/c, for the largest
                                                       trainable tensor (2x it); foreach on CUDA: 1x all of them;
                                                       bitsandbytes' Lion on CPU: g * scale, the interpolation and
                                                       its sign for the largest tensor (3x it); in place on CUDA

Full fine-tuning of SmolLM2 peaks at the end of the backward (tied embeddings) / the optimizer step; LoRA at the
start of the backward, where the B T V terms of a 49152-word vocabulary weigh as much as all layers.

Saved activations per decoder layer are derived term by term in ``lorabook.memory.activations``. In short:

fp32 full fine-tuning: 4 (8 d + 2 d_kv + 4 f + 2) + 4 H bytes per token and layer. A frozen weight needs no
input: LoRA on q, v drops both x^ terms, the MLP input and the down_proj input. With frozen embeddings layer 0's
input does not require grad, so layer 0 also drops its input RMSNorm. Once per model: RoPE cos and sin (2 T
d_head a, shared by all layers), the final RMSNorm, the lm_head input (if it trains), the fp32 log-probabilities
of cross-entropy (4 V per token: 196 KB for SmolLM2) and the int64 targets (with B = 1 the shifted labels keep the
padded (1, T + 1) tensor), plus the input ids. Gradient checkpointing (HF, non-reentrant, which also makes the
embedding output require grad) keeps each layer's input (a d per token) and the position ids, and recomputes one
layer's activations during its backward. qlora: bitsandbytes' 4-bit matmul saves only the packed weight, like a
frozen linear, and de-quantizes one weight (a x in x out bytes) for a moment.

``measure`` (lorabook.memory.measure) runs real steps under torch's MemTracker; the bench
``python -m lorabook.bench memory`` puts the two side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


from .._checks import bad_choice, check_number, check_positive_int
from ..adamw8bit import CHUNK, MIN_8BIT_SIZE, SCRATCH_BYTES_PER_ELEMENT, state8_bytes
from .activations import layer_backward, layer_saved
from .spec import as_spec, lora_modules


ESTIMATE_METHODS = ("full", "lora", "qlora")
DTYPES = ("fp32", "bf16", "fp16", "mixed")
ESTIMATE_OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "lion")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 2}  # bytes of a weight / activation element
_STATES = {"sgd": 0, "rmsprop": 1, "adam": 2, "adamw": 2, "adamw8bit": 2, "paged_adamw": 2, "paged_adamw8bit": 2,
           "lion": 1}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 code + FP8 absmax per 64 + fp32 per 256 absmaxes = 4.127 bits
CATEGORIES = ("weights", "gradients", "optimizer", "activations")


@dataclass
class Estimate:
    """Bytes by category at the peak moment of a steady-state training step, plus how it was derived."""
    weights: int
    gradients: int
    optimizer: int
    activations: int  # everything else live at the peak: saved activations, temporaries, inputs
    total: int
    peak_moment: str
    saved_activations: int  # all saved activations at the end of the forward (the seed's "forward" slot)
    naive_total: int  # the seed's sum of its four slots (below)
    slots: dict[str, int] = field(default_factory=dict)  # weights, gradients, optimizer, forward: whole-step sizes
    moments: dict[str, int] = field(default_factory=dict)
    activation_terms: dict[str, int] = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)  # weights / optimizer split: NF4 codes, constants, ...
    trainable_params: int = 0
    params: int = 0
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def categories(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in CATEGORIES}

    def as_dict(self) -> dict:
        return {**self.categories(), "total": self.total, "peak_moment": self.peak_moment,
                "saved_activations": self.saved_activations, "naive_total": self.naive_total, "slots": dict(self.slots),
                "trainable_params": self.trainable_params, "params": self.params, "moments": dict(self.moments),
                "parts": dict(self.parts), "activation_terms": dict(self.activation_terms),
                "notes": list(self.notes), **self.config}

    def table(self) -> str:
        c = self.config
        head = (f"{c.get('model')}: {c.get('method')}, {c.get('dtype')}, {c.get('optimizer')}, "
                f"batch {c.get('batch_size')} x seq {c.get('seq_len')}"
                + (", checkpointing" if c.get("gradient_checkpointing") else ""))
        row = lambda k, v: f"  {k:<38} {human(v):>11}"
        lines = [head, f"at the peak ({self.peak_moment}):"] + [row(k, v) for k, v in self.categories().items()]
        lines += [row("total", self.total), "the seed's four slots, added up:"]
        lines += [row(k, v) for k, v in self.slots.items()] + [row("sum", self.naive_total)]
        lines += ["parts:"] + [row(k, v) for k, v in self.parts.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = table


def human(n: float) -> str:
    """Bytes as MiB / GiB / TiB (powers of 1024)."""
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def optimizer_state_bytes(sizes: list[int], optimizer: str = "adamw", dtype: str = "fp32") -> int:
    """Bytes of optimizer state for trainable tensors with these element counts (the seed: SGD 0, RMSProp 1,
    Adam 2 values per parameter).

    torch keeps the states in the parameter dtype (fp32 under "mixed", where they update the master copy) and,
    for Adam(W) and RMSprop, one fp32 ``step`` counter per tensor. bitsandbytes' 8-bit AdamW keeps both states
    in 1 byte, in blocks of 256 with an fp32 absmax each, for tensors of >= 4096 elements (32-bit below that).
    Lion (Chen et al. 2023, arXiv:2302.06675, Algorithm 2) keeps one state, the momentum m: bitsandbytes'
    ``Lion`` (32-bit) holds it in fp32 whatever the parameter dtype, and counts steps in a Python int (no tensor).
    """
    if optimizer not in ESTIMATE_OPTIMIZERS:
        raise bad_choice("optimizer", optimizer, ESTIMATE_OPTIMIZERS)
    if dtype not in DTYPES:
        raise bad_choice("dtype", dtype, DTYPES)
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return sum(state8_bytes(n) for n in sizes)
    state = 4 if dtype == "mixed" or optimizer in ("paged_adamw", "lion") else _BYTES[dtype]
    counters = 4 * len(sizes) if optimizer in ("adam", "adamw", "paged_adamw", "rmsprop") else 0
    return _STATES[optimizer] * state * sum(sizes) + counters


def estimate(model, method: str = "full", dtype: str | None = None, optimizer: str = "adamw",
             batch_size: int = 1, seq_len: int = 512, lora_rank: int = 8, lora_targets=("q_proj", "v_proj"),
             gradient_checkpointing: bool = False, lora_dropout: float = 0.0, device: str = "cpu") -> Estimate:
    """Analytic peak memory of one steady-state training step (see the module docstring for the moments).

    dtype: "fp32" | "bf16" | "fp16" | "mixed" (16-bit weights and grads, fp32 master copy and Adam states,
    counted with the optimizer as in ZeRO); None = "fp32", or "bf16" for qlora (the paper's compute dtype).
    method "qlora": decoder linears in NF4 with double quantization (4.127 bits), the rest and LoRA in ``dtype``.
    device: "cpu" (torch optimizers run per tensor) or "cuda" (foreach: scratch for all trainable tensors).
    """
    spec = as_spec(model)
    dtype = dtype or ("bf16" if method == "qlora" else "fp32")
    for arg, value, allowed in (("method", method, ESTIMATE_METHODS), ("dtype", dtype, DTYPES),
                                ("optimizer", optimizer, ESTIMATE_OPTIMIZERS), ("device", device, ("cpu", "cuda"))):
        if value not in allowed:
            raise bad_choice(arg, value, allowed)
    B, T = check_positive_int("batch_size", batch_size), check_positive_int("seq_len", seq_len)
    r = check_positive_int("lora_rank", lora_rank)
    check_number("lora_dropout", lora_dropout, low=0, high=1, high_open=True)
    N, d, V, L = B * T, spec.d_model, spec.vocab_size, spec.n_layers
    a = w = _BYTES[dtype]  # activation and weight element bytes
    full = method == "full"
    lora = [] if full else lora_modules(spec, lora_targets)
    by_layer: list[set[str]] = [set() for _ in range(L)]
    for n in lora:
        if n != "lm_head":
            i, k = n.split(".")[2], n.rsplit(".", 1)[-1]
            by_layer[int(i)].add(k)
    lins = spec.linears()
    short = {k.rsplit(".", 1)[-1]: v for k, v in lins.items()}
    head_lora = "lm_head" in lora

    # ---- parameters: (numel, trainable) per tensor; LoRA adds r (in + out) per adapted linear
    P = spec.n_params or spec.count()
    P_linear = L * sum(i * o for i, o in lins.values())
    tensors = [(spec.vocab_size * d, full)] + [(i * o, full) for _ in range(L) for i, o in lins.values()]
    if not spec.tie_embeddings:
        tensors.append((V * d, full))
    small = P - sum(n for n, _ in tensors)  # norms, biases, positions: many small tensors
    tensors += [(d, full)] * (small // d) + ([(small % d, full)] if small % d else [])  # exact total: P
    tensors += [(r * n, True) for k in lora for n in ((d, V) if k == "lm_head" else short[k.rsplit(".", 1)[-1]])]
    trainable = [n for n, t in tensors if t]
    P_train = P if full else sum(trainable)

    notes, parts = [], {}
    if method == "qlora":  # decoder linears as NF4 codes + constants; embeddings, head, norms in dtype
        parts["weights: NF4 codes (4 bits)"] = P_linear // 2
        parts["weights: quantization constants"] = math.ceil(P_linear * (NF4_BITS - 4) / 8)
        parts[f"weights: embeddings, norms ({dtype})"] = (P - P_linear) * w
        notes.append(f"qlora: {P_linear:,} linear weights at {NF4_BITS:.3f} bits (NF4 + double-quantized "
                     f"constants), the rest and LoRA in {dtype}")
    else:
        parts[f"weights: base ({dtype})"] = P * w
    if not full:
        parts[f"weights: LoRA ({dtype})"] = sum(trainable) * w
    parts["weights: RoPE buffers"] = 4 * spec.hd if spec.n_positions == 0 else 0  # inv_freq: 2 copies of hd/2
    weights = sum(parts.values())
    g = w  # gradients in the parameter dtype (16-bit under "mixed", as in ZeRO)
    gradients = P_train * g
    s = 4 if dtype == "mixed" or optimizer in ("paged_adamw", "lion") else w  # bytes of one state element
    opt = optimizer_state_bytes(trainable, optimizer, dtype)
    parts["optimizer: states"] = opt
    if dtype == "mixed":
        opt += 4 * P_train  # fp32 master weights live with the optimizer (ZeRO's K = 12 for Adam)
        parts["optimizer: fp32 master weights"] = 4 * P_train
        notes.append("mixed: fp32 master weights counted with the optimizer states (ZeRO's 2+2+12 bytes/param)")
    if optimizer.startswith("paged_"):
        notes.append(f"{optimizer}: the bytes of {optimizer[6:]}, in pages that can be evicted to host memory "
                     "under pressure (NVIDIA unified memory), so they need not all sit on the GPU at the peak")

    # ---- saved activations, layer by layer (the derivation in the module docstring)
    # LoRA dropout's mask: CUDA's fused kernel keeps a bool per element, the CPU path a float noise tensor
    drop = 0 if lora_dropout == 0 else (1 if device == "cuda" else a)
    x_req = full or gradient_checkpointing  # (HF's checkpointing makes the embedding output require grad)
    per_layer, terms, saved, reqs = [], {}, [], []
    for i in range(L):
        t, out_req = layer_saved(spec, a, full, by_layer[i], r, x_req, N, drop)
        per_layer.append(sum(t.values()))
        saved.append(t), reqs.append(x_req)
        for k, v in t.items():
            terms[k] = terms.get(k, 0) + v
        x_req = out_req
    ckpt_in = a * d * N  # what checkpointing keeps per layer: its input hidden states
    top = {"RoPE cos, sin (shared)": 2 * T * spec.hd * a if spec.n_positions == 0 and x_req else 0,
           "position ids (kept by checkpoints)": 8 * T if gradient_checkpointing else 0}
    top.update({"final norm x (fp32)": 4 * d * N + 4 * N if x_req else 0,
                "final norm x^": a * d * N if full else 0,
                "lm_head input": a * d * N if full or head_lora else 0,
                "lm_head LoRA: A x": a * r * N if head_lora else 0,
                "cross-entropy log-probs (fp32)": 4 * V * N if x_req or head_lora else 0,
                # labels shifted by pad + slice + .contiguous(): with B = 1 the slice is already contiguous
                # and keeps the padded (1, T + 1) storage alive
                "cross-entropy targets": 8 * (N + (B == 1)), "loss, total weight (scalars)": 8})
    if spec.norm == "layernorm":
        top["final norm x (fp32)"], top["final norm x^"] = ((a * d + 8) * N if x_req else 0), 0
    inputs = 8 * N  # the token ids we feed (labels are the same tensor; the embedding saves this one too)
    A_top = sum(top.values())
    if gradient_checkpointing:
        A_layers = [ckpt_in] * L
        notes.append("checkpointing: each layer keeps its input; one layer is recomputed during its backward")
    else:
        A_layers = per_layer
    A = sum(A_layers) + A_top + inputs
    terms = {**{f"layers: {k}": v for k, v in terms.items() if v}, **{k: v for k, v in top.items() if v},
             "inputs (token ids)": inputs}
    if gradient_checkpointing:
        terms = {"layers: checkpointed inputs": ckpt_in * L, **{k: v for k, v in top.items() if v},
                 "inputs (token ids)": inputs}

    # ---- the moments of one step (W, O: always there; G: built up during the backward)
    W, O = weights, opt
    lp = 4 * V * N if top["cross-entropy log-probs (fp32)"] else 0
    moments = {"forward: loss": W + O + A + a * V * N + (4 * V * N if a != 4 else 0)}
    if lp:
        moments["backward: loss"] = W + O + A + 2 * 4 * V * N
    head_train = (V * d if full else 0) + (r * (d + V) if head_lora else 0)
    G_head = head_train * g + (d * g if full else 0)  # lm_head (tied: the embedding's) and the final norm
    moments["backward: lm_head"] = W + O + A - lp + a * V * N + G_head + a * d * N
    norm_p = d * (2 if spec.norm == "layernorm" else 1)
    G_layer = [(sum((i + spec.bias) * o for i, o in lins.values()) + 2 * norm_p if full else
                sum(r * sum(short[k]) for k in by_layer[j])) * g for j in range(L)]
    stream = a * d * N  # the gradient flowing down the residual stream
    # qlora: one weight de-quantized for a matmul at a time. Counted at each layer's backward peak, the same on every
    # machine; measured, it is live there where compute_linear copies the 16-bit operands to fp32 (a CPU without
    # bf16 matrix instructions), while torch's bf16 GEMM frees it first: there this is an upper bound by one weight
    deq = max(i * o for i, o in lins.values()) * a if method == "qlora" else 0
    worst = (0, -1)
    for i in reversed(range(L)):  # each layer's backward, replayed; its start is what is live then
        peak_i, _ = layer_backward(spec, a, g, full, by_layer[i], r, reqs[i], N, saved[i])
        peak_i += deq
        # checkpointing: layer i's activations are recomputed; in fp32 its norm's x *is* the kept input
        recompute = per_layer[i] - (ckpt_in if a == 4 and reqs[i] else 0) if gradient_checkpointing else 0
        start = (W + O + G_head + sum(G_layer[i + 1:]) + sum(A_layers[:i + 1]) + recompute + inputs + stream
                 + top["RoPE cos, sin (shared)"] + top["position ids (kept by checkpoints)"])
        worst = max(worst, (start + peak_i, i))
    moments[f"backward: layer {worst[1]}"] = worst[0]
    if full:  # tied: the head's grad waits in the engine's buffer, the embedding's arrives, and they are summed
        extra = 2 * V * d * g if spec.tie_embeddings else a * d * N
        moments["backward: embedding"] = W + O + gradients + extra + inputs
    big = max(trainable, default=0)
    # torch's step: per tensor on CPU, sqrt(v) and sqrt(v)/c for the largest tensor (RMSprop: sqrt only);
    # foreach on CUDA: one sqrt for every trainable tensor at once. bitsandbytes' CUDA kernels work in place;
    # its CPU Lion makes g * gnorm_scale, the interpolation beta1 m + (1 - beta1) g and its sign (fp32 each).
    per_tensor = {"rmsprop": 1, "adam": 2, "adamw": 2, "lion": 3}.get(optimizer, 0)
    if optimizer == "lion":
        scratch = per_tensor * 4 * big if device == "cpu" else 0
    elif optimizer in ("adamw8bit", "paged_adamw8bit"):  # CHUNK elements at a time in fp32; 32-bit path: 2 temps
        big8 = max((n for n in trainable if n >= MIN_8BIT_SIZE), default=0)
        big32 = max((n for n in trainable if n < MIN_8BIT_SIZE), default=0)
        scratch = max(SCRATCH_BYTES_PER_ELEMENT * min(big8, CHUNK), 8 * big32) if device == "cpu" else 0
    else:
        scratch = per_tensor * s * big if device == "cpu" else min(per_tensor, 1) * s * P_train
    parts["optimizer: step scratch (transient)"] = scratch
    moments["optimizer step"] = W + O + gradients + scratch + inputs
    peak_moment = max(moments, key=moments.get)
    total = moments[peak_moment]
    G_peak = gradients if peak_moment in ("optimizer step", "backward: embedding") else (
        G_head if peak_moment == "backward: lm_head" else 0)
    if peak_moment.startswith("backward: layer"):
        i = int(peak_moment.rsplit(" ", 1)[-1])
        G_peak = G_head + sum(G_layer[i + 1:])  # (plus part of layer i's, counted with the rest)
    O_peak = O + (scratch if peak_moment == "optimizer step" else 0)  # MemTracker files step scratch as Optstate
    return Estimate(weights=W, gradients=G_peak, optimizer=O_peak, activations=total - W - G_peak - O_peak,
                    total=total, peak_moment=peak_moment, saved_activations=A,
                    naive_total=W + gradients + O + A, moments=moments, activation_terms=terms,
                    slots={"weights": W, "gradients": gradients, "optimizer": O, "forward": A},
                    parts={k: v for k, v in parts.items() if v},
                    trainable_params=P_train, params=P, notes=notes,
                    config=dict(model=spec.name, method=method, dtype=dtype, optimizer=optimizer, batch_size=B,
                                seq_len=T, gradient_checkpointing=gradient_checkpointing,
                                lora_rank=r if not full else None))
