"""LongLoRA: a longer context for little compute (Chen et al. 2023, https://arxiv.org/abs/2309.12307).

Self-attention over n tokens costs O(n²). LongLoRA fine-tunes for a longer context with three pieces:

1. S²-Attn (shifted sparse attention), training only. Split the n tokens into groups of g and attend inside each
   group: n/g groups of g² scores, n·g in all instead of n². Heads h < H // 2 use the groups [0, g), [g, 2g), …;
   heads h ≥ H // 2 the groups shifted by half a group, [0, g/2), [g/2, 3g/2), …, [n − g/2, n), so information
   crosses group borders. Causal inside each group. At inference the model uses full attention again.
2. LoRA+ : LoRA plus trainable embeddings and norms (few parameters, but they close most of the gap to full
   fine-tuning at long context: Llama2-7B at 32k, perplexity full FT 8.08, LoRA 11.44, LoRA+ 8.12).
3. Position interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595): RoPE at position p / s, with the
   linear factor s = ceil(target / original), so a longer text reuses the angles the model was trained on.

The reference code shifts by rolling the shifted heads around the sequence (``torch.roll(-g/2)``): the first
half-group then lands in the last group, after the last tokens, and attends to them -- a look at the future
(LongLoRA issues #15, #90). Here the first and the last half-group are groups of their own: no position ever
depends on a later one. ``s2_mask(..., wrap=True)`` draws the rolled version, for comparison.

Three ways to compute it, proven equal in the tests: ``s2_attention_masked`` (the rule as an n × n mask, for
reading), the grouped path here (groups reshaped into the batch of ``scaled_dot_product_attention``) and the kernel
path (``lorabook.longlora_kernel``: the CPU flash kernel per group, on views, with its own backward; the default on
a CPU, the least memory).

Shapes: q (batch, heads, seq, head_dim); k, v (batch, kv_heads, seq, head_dim) with heads % kv_heads == 0 (GQA:
query head h reads key/value head h // (heads / kv_heads), as transformers' ``repeat_kv``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import bad_choice, check_flag, check_int, check_module, check_number, check_positive_int
from .longlora_kernel import DTYPES as KERNEL_DTYPES, kernel_available, s2_attention_kernel

__all__ = ["s2_attention", "s2_attention_masked", "s2_mask", "group_ids", "attention_flops", "grouped_attention",
           "shifted_attention", "check_s2_args", "S2ATTN", "enable_s2attn",
           "disable_s2attn", "interpolation_factor", "interpolate_positions", "longlora_trainable"]

S2ATTN = "lorabook_s2attn"  # the name S²-Attn is registered under in transformers' AttentionInterface


def check_s2_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size, causal=True) -> None:
    """Everything ``s2_attention`` needs of its arguments, each error naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, heads, n, d), (bk, kv_heads, nk, dk) = q.shape, k.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"k must be (batch={b}, kv_heads, seq={n}, head_dim={d}) like q, got {tuple(k.shape)}")
    if heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's kv_heads ({kv_heads}) (GQA groups)")
    check_int("group_size", group_size, low=2)
    if group_size % 2:
        raise ValueError(f"group_size must be even (the shift is half a group), got {group_size}")
    if group_size > n:
        raise ValueError(f"group_size ({group_size}) must be <= the sequence length ({n})")
    check_flag("causal", causal)
    if not causal and n % group_size:
        raise ValueError(f"without causal, the sequence length ({n}) must be a multiple of group_size "
                         f"({group_size}): padding would be attended to")


def group_ids(seq_len: int, group_size: int, shifted: bool, wrap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, order) of each position 0 … seq_len − 1 under the group rule; causal attention follows ``order``.

    Unshifted heads: group p // g. Shifted heads: (p + g/2) // g (a first half-group, full groups, the last one
    partial), in position order. ``wrap=True`` is the reference code's roll instead: order p' = (p − g/2) mod n,
    group p' // g, so the first half-group joins the last group, placed after it."""
    p = torch.arange(seq_len)
    if not shifted:
        return p // group_size, p
    if wrap:
        rolled = (p - group_size // 2) % seq_len
        return rolled // group_size, rolled
    return (p + group_size // 2) // group_size, p


def s2_mask(seq_len: int, group_size: int, heads: int, causal: bool = True, shift: bool = True,
            wrap: bool = False) -> torch.Tensor:
    """The group rule as a boolean mask (heads, seq, seq): True where query i may attend to key j -- same group
    and (causal) key not after the query; heads h >= heads // 2 shifted (``group_ids``)."""
    check_int("seq_len", seq_len, low=1)
    check_int("heads", heads, low=1)
    check_int("group_size", group_size, low=2)
    for name, flag in (("causal", causal), ("shift", shift), ("wrap", wrap)):
        check_flag(name, flag)
    masks = []
    for h in range(heads):
        group, order = group_ids(seq_len, group_size, shift and h >= heads // 2, wrap)
        m = group[:, None] == group[None, :]             # (seq, seq) same group
        if causal:
            m &= order[None, :] <= order[:, None]        # key not after the query (in the heads' order)
        masks.append(m)
    return torch.stack(masks)                            # (heads, seq, seq)


def attention_flops(seq_len: int, head_dim: int, heads: int, group_size: int | None = None, causal: bool = True,
                    backward: bool = True) -> int:
    """Multiply-adds × 2 of attention's two matrix products (Q Kᵀ and P V: 4 · head_dim per scored pair), forward
    and (backward=True) the backward's twice as much again. group_size None: full attention; else S²-Attn's
    groups (half the heads shifted). Causal counts only the pairs at or below the diagonal of each group."""
    check_int("seq_len", seq_len, low=1)
    check_positive_int("head_dim", head_dim)
    check_positive_int("heads", heads)
    check_flag("causal", causal)
    check_flag("backward", backward)
    if group_size is None:
        sizes = {False: torch.tensor([seq_len])}
    else:
        check_int("group_size", group_size, low=2)
        sizes = {s: torch.bincount(group_ids(seq_len, group_size, s)[0]) for s in (False, True)}
    pairs = {s: int((m * (m + 1) // 2 if causal else m * m).sum()) for s, m in sizes.items()}
    per_head = [pairs[group_size is not None and h >= heads // 2] for h in range(heads)]
    return sum(per_head) * 4 * head_dim * (3 if backward else 1)


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, kv_heads, n, d) -> (b, heads, n, d): key/value head j serves query heads j·r … j·r + r − 1."""
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def s2_attention_masked(q, k, v, group_size: int, causal: bool = True, shift: bool = True, scale=None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """The readable S²-Attn: full attention with the group rule's mask (``s2_mask``). O(n²), for teaching and tests."""
    check_s2_args(q, k, v, group_size, causal)
    mask = s2_mask(q.shape[2], group_size, q.shape[1], causal, shift).to(q.device)   # (heads, n, n)
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def grouped_attention(q, k, v, g: int, causal: bool, scale, dropout_p: float) -> torch.Tensor:
    """Attention inside consecutive groups of g on (b, h, n, d) with n % g == 0: reshaped (b, h·n/g, g, d) -- a
    view of a contiguous tensor, no copy -- every group one entry of one SDPA call."""
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b, h * (n // g), g, d) for t in (q, k, v))          # (b, h·groups, g, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)
    return out.view(b, h, n, d)


def shifted_attention(q, k, v, g: int, causal: bool, scale, dropout_p: float) -> torch.Tensor:
    """Groups [0, g/2), [g/2, 3g/2), …, [n − g/2, n) on (b, h, n, d): the two half-groups in one SDPA, the rest in
    another. No roll, so the first half-group never sees the last tokens."""
    b, h, n, d = q.shape
    half = g // 2
    ends = [torch.cat([t[:, :, :half], t[:, :, n - half:]], dim=1) for t in (q, k, v)]  # (b, 2h, g/2, d)
    ends_out = F.scaled_dot_product_attention(*ends, is_causal=causal, dropout_p=dropout_p, scale=scale)
    pieces = [ends_out[:, :h]]                                                         # [0, g/2)
    if n > g:
        middle = [t[:, :, half:n - half] for t in (q, k, v)]                           # (b, h, n − g, d)
        pieces.append(grouped_attention(*middle, g, causal, scale, dropout_p))
    pieces.append(ends_out[:, h:])                                                     # [n − g/2, n)
    return torch.cat(pieces, dim=2)                                                    # (b, h, n, d)


def s2_attention(q, k, v, group_size: int, causal: bool = True, shift: bool = True, scale=None,
                 dropout_p: float = 0.0, path: str = "auto") -> torch.Tensor:
    """Shifted sparse attention: (b, H, n, d) queries, (b, H_kv, n, d) keys/values -> (b, H, n, d).

    path="grouped" reshapes the groups into the batch of ``scaled_dot_product_attention`` (n·g work, any device);
    path="kernel" runs the same groups as views on the CPU flash kernel with its own backward
    (``lorabook.longlora_kernel``: no copies, the peak memory of full flash attention or less); path="auto"
    (default) takes "kernel" where it runs (CPU, no dropout) and "grouped" elsewhere; path="masked" is
    ``s2_attention_masked`` (n² work, the mask drawn from the rule). Causal: a length that is not a multiple of
    group_size is padded at the end and cut off again (later tokens are never attended to, so the pad is invisible
    and the last group is simply partial)."""
    if path == "masked":
        return s2_attention_masked(q, k, v, group_size, causal, shift, scale, dropout_p)
    if path not in ("auto", "kernel", "grouped"):
        raise bad_choice("path", path, ["auto", "kernel", "grouped", "masked"])
    check_s2_args(q, k, v, group_size, causal)
    check_flag("shift", shift)
    check_number("dropout_p", dropout_p, low=0, high=1, high_open=True)
    runs_on_kernel = kernel_available(q, k, v, dropout_p)
    if path == "kernel" and not runs_on_kernel:
        raise ValueError(f"path='kernel' needs CPU tensors of one of {[str(t) for t in KERNEL_DTYPES]}, a last "
                         f"dim of stride 1 and dropout_p=0 (got {q.device.type}, {q.dtype}, dropout_p={dropout_p})")
    n, pad = q.shape[2], -q.shape[2] % group_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))                # (b, H, n + pad, d)
    if path == "kernel" or (path == "auto" and runs_on_kernel):
        return s2_attention_kernel(q, k, v, group_size, causal, shift, scale)[:, :, :n]
    heads = q.shape[1]
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    split = heads // 2 if shift else heads
    out = [grouped_attention(q[:, :split], k[:, :split], v[:, :split], group_size, causal, scale, dropout_p)]
    if split < heads:
        out.append(shifted_attention(q[:, split:], k[:, split:], v[:, split:], group_size, causal, scale, dropout_p))
    return torch.cat(out, dim=1)[:, :, :n]                                     # (b, H, n, d)


# -- transformers integration: AttentionInterface, switched on and off explicitly --------------------------------

def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "is_causal")]


def _hf_s2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature -> (output (b, n, H, d), None)."""
    group_size, fraction = module.s2attn
    n = query.shape[2]
    if key.shape[2] != n:
        raise RuntimeError(f"S²-Attn needs the whole sequence at once (queries {n}, keys {key.shape[2]}): it is "
                           f"for training; call lorabook.longlora.disable_s2attn(model) before generating")
    if attention_mask is not None:
        raise RuntimeError("S²-Attn takes unpadded batches (no attention_mask with padding); pack or trim the "
                           "sequences to one length")
    g = group_size or max(2, 2 * round(n * fraction / 2))   # even; a length that does not divide is padded
    out = s2_attention(query, key, value, g, causal=True, scale=scaling, dropout_p=dropout if module.training else 0.)
    return out.transpose(1, 2).contiguous(), None


def enable_s2attn(model: nn.Module, group_size: int | None = None, fraction: float = 0.25) -> nn.Module:
    """Switch a transformers model's attention to S²-Attn (in place; for training). Groups of ``group_size`` tokens,
    or of ``fraction`` of each batch's length (LongLoRA's 1/4) when group_size is None. Returns the model."""
    check_module("model", model)
    if group_size is not None:
        check_int("group_size", group_size, low=2)
        if group_size % 2:
            raise ValueError(f"group_size must be even (the shift is half a group), got {group_size}")
    check_number("fraction", fraction, low=0, high=1, low_open=True)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    modules = _attention_modules(model)
    if not callable(getattr(model, "set_attn_implementation", None)) or not callable(can_set) or not can_set() \
            or not modules:
        raise ValueError(f"model ({type(model).__name__}) has no attention-function registry hook: S²-Attn plugs "
                         f"into transformers models whose attention goes through AttentionInterface")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(S2ATTN, _hf_s2_attention)
    AttentionMaskInterface.register(S2ATTN, sdpa_mask)   # None for unpadded causal batches, a mask with padding
    previous = getattr(model, "_s2attn_previous", None) or model.config._attn_implementation
    model.set_attn_implementation(S2ATTN)
    model._s2attn_previous = previous
    for m in modules:
        m.s2attn = (group_size, fraction)
    return model


def disable_s2attn(model: nn.Module) -> nn.Module:
    """Back to the attention the model had before ``enable_s2attn`` (full attention, for inference)."""
    check_module("model", model)
    previous = getattr(model, "_s2attn_previous", None)
    if previous is None:
        raise ValueError("model does not use S²-Attn (enable_s2attn was not called on it)")
    model.set_attn_implementation(previous)
    del model._s2attn_previous
    for m in _attention_modules(model):
        m.__dict__.pop("s2attn", None)
    return model


# -- position interpolation ---------------------------------------------------------------------------------------

def interpolation_factor(target_len: int, original_len: int) -> int:
    """LongLoRA's linear position-interpolation factor: ceil(target / original), at least 1."""
    check_int("target_len", target_len, low=1)
    check_int("original_len", original_len, low=1)
    return max(1, math.ceil(target_len / original_len))


def interpolate_positions(model: nn.Module, factor: float | None = None, target_len: int | None = None) -> float:
    """Linear RoPE position interpolation in place (transformers v5 ``rope_parameters``: rope_type "linear"):
    position p is rotated as p / factor. Give ``factor`` (>= 1) or ``target_len`` (factor = ceil(target / original));
    factor 1 restores plain RoPE. Sets max_position_embeddings = original · factor. Returns the factor."""
    check_module("model", model)
    config = getattr(model, "config", None)
    params = getattr(config, "rope_parameters", None)
    rotaries = [(name, m) for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if not isinstance(params, dict) or "rope_type" not in params or not rotaries:
        raise ValueError(f"model ({type(model).__name__}) has no RoPE to interpolate (config.rope_parameters and "
                         f"a rotary_emb module, as transformers v5 Llama models have)")
    if params["rope_type"] not in ("default", "linear"):
        raise ValueError(f"interpolate_positions scales plain RoPE; this model's rope_type is {params['rope_type']!r}")
    original = params.get("original_max_position_embeddings", config.max_position_embeddings)
    if (factor is None) == (target_len is None):
        raise ValueError("give exactly one of factor and target_len")
    if factor is None:
        factor = interpolation_factor(target_len, original)
    factor = check_number("factor", factor, low=1)
    new_params = {k: v for k, v in params.items() if k not in ("factor", "original_max_position_embeddings")}
    if factor != 1:
        new_params.update(rope_type="linear", factor=factor, original_max_position_embeddings=original)
    else:
        new_params["rope_type"] = "default"
    old = (config.rope_parameters, config.max_position_embeddings)
    config.rope_parameters, config.max_position_embeddings = new_params, int(original * factor)
    try:   # build every new rotary module first, then swap them in: a failure leaves the model as it was
        new = [(name, type(m)(config).to(m.inv_freq.device)) for name, m in rotaries]
    except Exception:
        config.rope_parameters, config.max_position_embeddings = old
        raise
    for name, m in new:
        model.set_submodule(name, m)
    return factor


# -- LoRA+: which parameters train ---------------------------------------------------------------------------------

def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def longlora_trainable(model: nn.Module, embeddings: bool = True, norms: bool = True) -> dict[str, int]:
    """LoRA+ (LongLoRA's "embed,norm"): the LoRA matrices plus, optionally, the embeddings and the norms train; every
    other parameter is frozen. Returns parameter counts {"lora", "embeddings", "norms", "trainable", "total"}.
    A tied output head shares the input embedding's tensor, so it trains with it (counted once)."""
    check_module("model", model)
    check_flag("embeddings", embeddings)
    check_flag("norms", norms)
    groups: dict[str, dict[int, nn.Parameter]] = {"lora": {}, "embeddings": {}, "norms": {}}
    for name, p in model.named_parameters():
        if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
            groups["lora"][id(p)] = p
    if not groups["lora"]:
        raise ValueError("model has no LoRA layers; call lorabook.lora.add_lora first")
    for m in model.modules():
        if embeddings and isinstance(m, nn.Embedding):
            groups["embeddings"].update({id(p): p for p in m.parameters(recurse=False)})
        if norms and _is_norm(m):
            groups["norms"].update({id(p): p for p in m.parameters(recurse=False)})
    chosen = {i for g in groups.values() for i in g}
    params = {id(p): p for p in model.parameters()}
    for i, p in params.items():
        p.requires_grad_(i in chosen)
    counts = {k: sum(p.numel() for p in g.values()) for k, g in groups.items()}
    counts.update(trainable=sum(p.numel() for i, p in params.items() if i in chosen),
                  total=sum(p.numel() for p in params.values()))
    return counts
