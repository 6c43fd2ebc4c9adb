"""What autograd saves in one decoder layer, and what its backward allocates and frees: the activation terms.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022, arXiv:2205.05198) §4
counts activations as the sum of the tensors each op keeps for its backward; we do the same for a HF Llama layer
(and, by analogy, a GPT layer), so ``lorabook.memory.estimate`` can add them up and ``measure`` can check them.

Saved activations A, per decoder layer of a HF Llama in eager PyTorch, in bytes per token (each storage once;
checked against ``torch.autograd.graph.saved_tensors_hooks`` term by term in the tests). Training SDPA on a CPU
runs ``_scaled_dot_product_flash_attention_for_cpu``: it saves q, k, v, its output and one fp32 log-sum-exp per
head, no T x T matrix (CUDA's flash / memory-efficient kernels save the same; GQA k, v stay at n_kv heads):

    input RMSNorm      4 d    x in fp32 (``x.to(float32)``: pow and mul save it; in fp32 it is the layer input)
                       4      rsqrt(mean x^2 + eps)
                       a d    x^ = x * rsqrt            only if the norm weight trains (weight * x^ saves x^)
    q/k/v projections  a d    their shared input y      only if a weight or a LoRA A there trains
    attention (SDPA)   a (2 d_q + 2 d_kv) + 4 H         rotated q and k, v, output; logsumexp (o_proj's input is
                                                        that output, saved once)
    post-attn RMSNorm  4 d + 4 (+ a d)                  as above, on h = x + attn
    SwiGLU MLP         a d    gate/up input             only if gate or up trains
                       3 a f  g (SiLU), silu(g) and u (their product)
                       a f    silu(g) * u               only if down_proj trains
    LoRA adapter       a r    h = A x (B's input); x is one of the inputs above, saved by A if by nobody else
                       (dropout > 0: A saves dropout(x), a d, and dropout its mask: fp32 noise on a CPU, 1 byte
                       on CUDA; only where x requires grad)

``layer_saved`` returns those terms for N = B T tokens; ``layer_backward`` replays the layer's backward node by
node (each node allocates the gradients of its inputs and weights, then autograd frees the gradient it consumed
and the tensors it had saved) and returns the peak and the net change of live bytes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import ModelSpec


def layer_saved(s: ModelSpec, a: int, full: bool, lora: set[str], r: int, x_req: bool, N: int,
                drop: int = 0) -> tuple[dict[str, int], bool]:
    """Bytes autograd saves in one decoder layer (N tokens), by term; and whether its output requires grad.

    ``lora``: short names (q_proj, ...) adapted in this layer; ``x_req``: the layer input requires grad;
    ``drop``: bytes per element of a LoRA dropout's saved mask (0: no dropout)."""
    d, dq, dkv, f, H = s.d_model, s.n_heads * s.hd, s.n_kv_heads * s.hd, s.d_ff, s.n_heads
    t: dict[str, int] = {}
    trains = lambda k: full or k in lora  # a linear's input is saved iff its weight (or LoRA A) needs a grad

    def norm(tag: str, req: bool) -> None:  # RMSNorm saves fp32 x and rsqrt; x^ only for its weight's grad
        if s.norm == "rmsnorm":
            t[f"{tag} x (fp32)"] = 4 * d * N if req else 0
            t[f"{tag} rsqrt"] = 4 * N if req else 0
            t[f"{tag} x^ (weight grad)"] = a * d * N if full else 0
        else:  # native_layer_norm saves its input, mean and rstd
            t[f"{tag} x, mean, rstd"] = (a * d + 8) * N if (req or full) else 0

    def lin_in(tag: str, keys: list[str], width: int, already: bool, x_grad: bool) -> None:
        # with LoRA dropout, A saves dropout(x) instead of x
        needs_x = full or any(k in lora for k in keys) and not drop
        t[tag] = a * width * N if needs_x and not already else 0
        for k in keys:
            if k in lora:
                t[f"{k} LoRA: A x"] = t.get(f"{k} LoRA: A x", 0) + a * r * N
                if drop:  # dropout(x) is a new tensor for A; the mask is kept only if x needs a gradient
                    t[f"{k} LoRA: dropout(x), mask"] = (a + (drop if x_grad else 0)) * width * N

    norm("norm1:", x_req)
    qkv = ["q_proj", "k_proj", "v_proj"]
    lin_in("q/k/v input", qkv, d, False, x_req or full)
    attn_req = x_req or any(trains(k) for k in qkv)  # q, k or v requires grad: SDPA saves all of them
    t["attention: q, k, v (rotated)"] = a * (dq + 2 * dkv) * N if attn_req else 0
    t["attention: output"] = a * dq * N if attn_req else 0
    t["attention: logsumexp"] = 4 * H * N if attn_req else 0
    lin_in("o_proj input", ["o_proj"], dq, attn_req, attn_req)  # the SDPA output: saved by SDPA if it needs grad
    h_req = x_req or attn_req or trains("o_proj")
    norm("norm2:", h_req)
    ups = ["gate_proj", "up_proj"] if s.mlp == "swiglu" else ["up_proj"]
    lin_in("mlp input", ups, d, False, h_req)
    g_req = h_req or any(trains(k) for k in ups)
    if s.mlp == "swiglu":  # SiLU saves g; silu(g) * u saves both factors
        t["mlp: g, silu(g), u"] = 3 * a * f * N if g_req else 0
    else:  # GELU saves its input; the down projection's input is gelu(g)
        t["mlp: g"] = a * f * N if g_req else 0
    lin_in("down_proj input", ["down_proj"], f, False, g_req)
    return t, h_req or g_req or trains("down_proj")


def layer_backward(s: ModelSpec, a: int, g: int, full: bool, lora: set[str], r: int, x_req: bool, N: int,
                   t: dict[str, int]) -> tuple[int, int]:
    """Replay one decoder layer's backward node by node: (peak, net) live bytes above its start.

    Each node allocates the gradients of its inputs (only those that require grad) and of its weights, then
    frees the gradient it consumed and the tensors it had saved (autograd releases them after the node).
    The incoming gradient of the layer output (the residual stream) is part of the start."""
    d, dq, dkv, f = s.d_model, s.n_heads * s.hd, s.n_kv_heads * s.hd, s.d_ff
    Nd, norm_g = a * d * N, (d * g * (2 if s.norm == "layernorm" else 1) if full else 0)  # (+ LayerNorm bias)
    live = peak = 0

    def step(alloc: int = 0, free: int = 0) -> None:
        nonlocal live, peak
        live += alloc
        peak = max(peak, live)
        live -= free

    def linear(k: str, n_in: int, n_out: int, grad_in: bool) -> int:
        """Backward of a (LoRA-)linear; weight grads stay (they are gradients); returns input-grad bytes."""
        dx = a * n_in * N if grad_in else 0
        if k in lora:  # d(z*scale), then B (frees h = A x), then A; the two input grads are summed
            step(a * n_out * N)
            step(a * r * N + r * n_out * g, a * n_out * N + a * r * N)
            step(r * n_in * g + dx, a * r * N)
        step(dx + ((n_in + s.bias) * n_out * g if full else 0), dx if k in lora else 0)
        return dx

    drops = lambda keys: sum(t.get(f"{k} LoRA: dropout(x), mask", 0) for k in keys)
    h_req = x_req or full or bool(lora)  # the residual stream inside the layer requires grad
    # MLP, last op first: down, the product, up, SiLU, gate (GELU: down, GELU, up)
    m_grad = linear("down_proj", f, d, h_req)
    step(0, t["down_proj input"] + drops(["down_proj"]))
    ups = ["gate_proj", "up_proj"] if s.mlp == "swiglu" else ["up_proj"]
    if s.mlp == "swiglu":
        third = t["mlp: g, silu(g), u"] // 3
        step(2 * m_grad, m_grad + 2 * third)  # d silu(g), d u; frees d m, silu(g), u
        y_grad = linear("up_proj", d, f, h_req)
        step(0, m_grad)  # d u consumed
        step(m_grad, m_grad + third)  # SiLU: d g; frees d silu(g), g
        y_grad += linear("gate_proj", d, f, h_req)
        step(0, m_grad)  # d g consumed
    else:
        step(m_grad, m_grad + t["mlp: g"])  # GELU: d g; frees d m, g
        y_grad = linear("up_proj", d, f, h_req)
        step(0, m_grad)
    y_sum = min(y_grad, Nd)
    step(0, t["mlp input"] + drops(ups) + y_grad - y_sum)  # partial input grads summed into one
    norm2 = sum(v for k, v in t.items() if k.startswith("norm2"))
    grad_h = Nd if h_req else 0
    step(3 * grad_h + norm_g, 2 * grad_h + norm2 + y_sum)  # the norm: temporaries, the d h branch
    step(0, grad_h)  # summed into the stream
    # attention: o_proj, SDPA (d q, d k, d v), RoPE, then q/k/v
    o_grad = linear("o_proj", dq, d, bool(t["attention: output"]))
    sdpa = t["attention: q, k, v (rotated)"] + t["attention: output"] + t["attention: logsumexp"]
    qkv_grad = a * (dq + 2 * dkv) * N if sdpa else 0
    step(qkv_grad, o_grad + sdpa + t["o_proj input"] + drops(["o_proj"]))
    step(a * dq * N if sdpa else 0, a * dq * N if sdpa else 0)  # RoPE: rotate_half's grad, summed away
    y1_req = x_req or full
    x_grad = sum(linear(k, d, w, y1_req) for k, w in (("q_proj", dq), ("k_proj", dkv), ("v_proj", dkv)))
    x_sum = min(x_grad, Nd)
    step(0, qkv_grad + t["q/k/v input"] + drops(["q_proj", "k_proj", "v_proj"]) + x_grad - x_sum)
    norm1 = sum(v for k, v in t.items() if k.startswith("norm1"))
    grad_x = Nd if x_req else 0
    step(3 * grad_x + norm_g, 2 * grad_x + norm1 + x_sum)
    step(0, grad_x)
    return peak, live
