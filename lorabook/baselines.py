"""The methods the LoRA paper compares against (Hu et al., 2021, Tables 1-2), on HF Llama and GPT-2 causal LMs.

Each ``add_*`` freezes the model, adds (or unfreezes) its trainable part in place and returns the model; ``prepare``
picks one by name. L layers, width d, bottleneck m, MLP width d_ff, n_kv key/value heads of head_dim each
(d_kv = n_kv · head_dim; d_kv = d for GPT-2). Shapes as nn.Linear: W_down (m, d), W_up (d, m).

Adapter^H (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751): a bottleneck with a skip connection,

    A(h) = h + W_up f(W_down h + b_down) + b_up          f = GELU (as in their code); |A| = 2dm + d + m

at the output of the attention block and of the MLP block of every layer -- after the attention output
projection (o_proj / c_proj, and GPT-2's residual dropout), before the residual add. Houlsby's BERT is post-LN
(sublayer → projection → adapter → add → LayerNorm); GPT-2 and Llama are pre-LN, so here
h ← h + A(Attn(LN₁ h)), then h ← h + A(MLP(LN₂ h)).   |Θ| = 2 · L · (2dm + d + m).

Adapter^L (Lin et al., 2020, https://arxiv.org/abs/2004.03829): one adapter per layer "on top of" it, i.e. on the
layer's output after the MLP's residual add, with its own LayerNorm and a ReLU:

    h ← h + W_up ReLU(W_down LN(h) + b_down) + b_up                 |Θ| = L · (2dm + m + 3d)   (LN: 2d)

Both initialise W_up, b_up at zero (like LoRA's B), so each adapter starts as the identity and the model starts
exactly unchanged; W_down is nn.Linear's default. Houlsby used a near-identity init instead (every weight
~ N(0, σ²) truncated at 2σ; σ = 1e-2 in the paper): pass ``init_std=σ``. Houlsby also trained the model's
LayerNorms (``train_norms=True``); Table 1's |Θ| counts the adapter layers only, as the default does.

BitFit (Ben Zaken et al., 2021, https://arxiv.org/abs/2106.10199): train only the bias terms.
    GPT-2 has them -- c_attn, c_proj, c_fc, c_proj and every LayerNorm bias: |Θ| = L · (7d + d_ff) + d.
    Llama has none. We give every linear layer of every decoder layer a zero-initialised trainable bias (so the
    model starts unchanged) and set config.attention_bias = config.mlp_bias = True so it saves and reloads.
    RMSNorm has no bias and gets none:       |Θ| = L · (d_q + 2 d_kv + 2d + 2 d_ff)   (d_q = n_heads · head_dim).

Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190): P trainable key and value vectors per layer
and key/value head that every query may attend to, before the real tokens:

    head_i = softmax(q K_iᵀ) V_i,  K_i = [P_K ; W_k h],  V_i = [P_V ; W_v h]     P_K, P_V (n_kv, P, head_dim)
    |Θ| = 2 · L · P · d_kv.   With the reparametrisation (``reparam_hidden=h``) the prefix is MLP(E), E (P, d):
    |Θ| = P·d + (d·h + h) + (h + 1) · 2 L d_kv while training; ``bake()`` keeps only the 2·L·P·d_kv result.

We prepend inside the attention call (a registered transformers attention function wrapping sdpa or eager) and
widen its mask by P always-visible columns. Positions are not shifted: real tokens keep positions 0..T-1 (the
past_key_values route of Li & Liang's code and of PEFT puts them at P..P+T-1 unless position_ids are
given), and the KV cache never holds the prefix, so ``generate`` works as is. Random prefixes change the
output from the start; that is expected (Li & Liang found initialising them from real words' activations helps).

Full fine-tuning trains everything; LoRA is ``lorabook.lora.add_lora``. Table 1 (latency) is ``lorabook.latency``.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn as nn

from . import lora
from ._checks import check_flag, check_module, check_number, check_positive_int

_FAMILIES = {"llama": ("model", "layers", "self_attn"), "gpt2": ("transformer", "h", "attn")}  # body, layers, attn
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _arch(model) -> tuple[str, nn.ModuleList, str]:
    """(family, decoder layers, attention attribute) of a supported causal LM; another model is a ValueError, a
    non-model (a str, None) a TypeError."""
    check_module("model", model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    body = _FAMILIES.get(model_type, (None,))[0]
    if body is None or not hasattr(model, body) or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model must be a causal LM with config.model_type in {sorted(_FAMILIES)} (e.g. SmolLM2, "
                         f"tiny_llama, GPT2LMHeadModel), got {type(model).__name__} (model_type={model_type!r})")
    _, layers, attn = _FAMILIES[model_type]
    return model_type, getattr(getattr(model, body), layers), attn


def _check_init_std(init_std) -> None:
    if init_std is not None:
        check_number("init_std", init_std, low=0, low_open=True)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ---- adapters ---------------------------------------------------------------------------------------------------

class Adapter(nn.Module):
    """h ↦ h + W_up f(W_down LN(h) + b_down) + b_up; LN is the identity unless ``layer_norm`` (Adapter^L)."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu", layer_norm: bool = False,
                 init_std: float | None = None, eps: float = 1e-5):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps) if layer_norm else nn.Identity()
        self.down = nn.Linear(d_model, bottleneck)  # W_down (m, d)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d_model)  # W_up (d, m)
        if init_std is None:  # exact identity at the start: the up projection is zero
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:  # Houlsby's near-identity init
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (batch, seq, d) -> (batch, seq, d)
        return h + self.up(self.act(self.down(self.ln(h))))  # the bottleneck is (batch, seq, m)

    def hook(self, module: nn.Module, args, output):
        """Forward hook: apply the adapter to ``module``'s output (the first item when it returns a tuple)."""
        if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
            return (self(output[0]),) + tuple(output[1:])
        return self(output)


def _add_adapters(model, blocks: list[nn.Module], make) -> None:
    """Freeze ``model``, then give each block an ``adapter`` child applied to its output by a forward hook."""
    if any(hasattr(b, "adapter") for b in blocks):
        raise ValueError("model already has adapters there: add adapters to a fresh model")
    _freeze(model)
    ref = next(model.parameters())
    for block in blocks:
        block.adapter = make().to(device=ref.device, dtype=ref.dtype)  # a child: saved, counted, trained
        block.register_forward_hook(block.adapter.hook)


def _check_adapter_args(bottleneck, activation, init_std) -> None:
    check_positive_int("bottleneck", bottleneck)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _check_init_std(init_std)


def add_adapter_houlsby(model, bottleneck: int = 64, activation: str = "gelu", init_std: float | None = None,
                        train_norms: bool = False):
    """Adapter^H: an adapter at the attention output and one at the MLP output of every layer; only they train.

    train_norms: also train the model's norms, as Houlsby et al. did (+2d per LayerNorm, +d per RMSNorm)."""
    _check_adapter_args(bottleneck, activation, init_std)
    check_flag("train_norms", train_norms)
    _, layers, attn = _arch(model)
    d = model.config.hidden_size
    _add_adapters(model, [b for layer in layers for b in (getattr(layer, attn), layer.mlp)],
                  lambda: Adapter(d, bottleneck, activation, init_std=init_std))
    for m in model.modules() if train_norms else ():
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            m.requires_grad_(True)
    return model


def add_adapter_lin(model, bottleneck: int = 64, activation: str = "relu", init_std: float | None = None):
    """Adapter^L: one LayerNorm'd adapter on each layer's output (after the MLP's residual add); only they train."""
    _check_adapter_args(bottleneck, activation, init_std)
    _, layers, _ = _arch(model)
    d, eps = model.config.hidden_size, getattr(model.config, "layer_norm_epsilon", 1e-5)
    _add_adapters(model, list(layers), lambda: Adapter(d, bottleneck, activation, True, init_std, eps))
    return model


# ---- BitFit -----------------------------------------------------------------------------------------------------

def add_bitfit(model):
    """Train only bias terms; linear layers of the decoder layers that have none get a zero (trainable) one."""
    family, layers, _ = _arch(model)
    for module in layers.modules():
        if isinstance(module, nn.Linear) and module.bias is None:  # Llama: F.linear(x, W, 0) = x Wᵀ
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(module.out_features, device=w.device, dtype=w.dtype))
    if family == "llama":  # the config now describes the model we hold
        model.config.attention_bias = model.config.mlp_bias = True
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    return model


# ---- prefix tuning ----------------------------------------------------------------------------------------------

PREFIX_KWARG = "lorabook_prefix"  # the keyword the pre-forward hook hands down to every attention call
_PREFIX_IMPLS = {"sdpa": "lorabook_prefix_sdpa", "eager": "lorabook_prefix_eager"}  # wrapped -> registered name


class PrefixTuning(nn.Module):
    """Every layer's key/value prefix, (L, 2, n_kv, P, head_dim): a parameter, or MLP(E) when reparametrised."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_prefix: int, d_model: int,
                 reparam_hidden: int | None = None, init_std: float = 1.0):
        super().__init__()
        self.shape = (n_layers, 2, n_kv_heads, n_prefix, head_dim)
        self.mlp = None
        if reparam_hidden is None:
            self.key_value = nn.Parameter(torch.randn(self.shape) * init_std)
        else:
            self.embedding = nn.Parameter(torch.randn(n_prefix, d_model) * init_std)  # E (P, d)
            self.mlp = nn.Sequential(nn.Linear(d_model, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, n_layers * 2 * n_kv_heads * head_dim))

    def forward(self) -> torch.Tensor:  # -> (L, 2, n_kv, P, head_dim)
        if self.mlp is None:
            return self.key_value
        L, _, n_kv, P, hd = self.shape
        return self.mlp(self.embedding).view(P, L, 2, n_kv, hd).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def bake(self) -> None:
        """Drop the reparametrisation after training and keep only the prefix it computes (as Li & Liang do)."""
        if self.mlp is not None:
            self.key_value = nn.Parameter(self().clone())
            del self.embedding
            self.mlp = None

    def hand_down(self, module, args, kwargs):
        """Pre-forward hook on the causal LM: compute the prefix once and pass it to every attention call."""
        return args, {**kwargs, PREFIX_KWARG: self()}


def _widen_mask(mask: torch.Tensor | None, n_prefix: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """(b, 1, q, kv) mask -> (b, 1, q, P + kv): the prefix columns are visible to every query."""
    if mask is None:  # sdpa skipped it (plain causal, no padding): rebuild it, aligned bottom-right for a cache
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True attends; float: 0 adds nothing
    cols = visible(*mask.shape[:-1], n_prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)


def _prefix_attention(module, query, key, value, attention_mask, *, wrapped: str, **kwargs):
    """sdpa/eager attention with this layer's prefix prepended to keys and values. query (b, n_heads, q, hd)."""
    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:
        raise RuntimeError("prefix tuning: no prefix reached the attention; call the causal LM itself "
                           "(model(...) or model.generate), not model.forward or an inner module")
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    pk, pv = (t.to(key.dtype).expand(batch, -1, -1, -1) for t in prefix[module.layer_idx])  # (b, n_kv, P, hd)
    key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)  # (b, n_kv, P + kv, hd)
    mask = _widen_mask(attention_mask, pk.shape[2], q_len, kv_len, query.device)
    if wrapped == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    if mask.dtype == torch.bool:  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    eager = sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager attention
    return eager(module, query, key, value, mask, **kwargs)


def register_prefix_attention() -> None:
    """Register the prefix-tuning attention functions in transformers' registries (``AttentionInterface``), under
    the names in ``_PREFIX_IMPLS``. Called by ``add_prefix_tuning``, never at import: importing lorabook changes
    no other library's state. Registering again is harmless (the same functions under the same names)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for wrapped, name in _PREFIX_IMPLS.items():
        AttentionInterface.register(name, functools.partial(_prefix_attention, wrapped=wrapped))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])  # the wrapped one's masks


def add_prefix_tuning(model, n_prefix: int = 16, reparam_hidden: int | None = None, init_std: float = 1.0,
                      init_ids: torch.Tensor | None = None):
    """Prefix tuning: ``model.prefix_tuning`` holds the prefixes; only they (or their MLP) train.

    init_ids: (n_prefix,) token ids whose keys and values (the model's own, at positions 0..P-1) start the prefix
    instead of N(0, init_std²) noise -- Li & Liang's initialisation from real words' activations."""
    check_positive_int("n_prefix", n_prefix)
    if reparam_hidden is not None:
        check_positive_int("reparam_hidden", reparam_hidden)
    check_number("init_std", init_std, low=0, low_open=True)
    _arch(model)
    if hasattr(model, "prefix_tuning"):
        raise ValueError("model already has prefix_tuning: add it to a fresh model")
    if init_ids is not None:
        if not (isinstance(init_ids, torch.Tensor) and init_ids.shape == (n_prefix,) and not init_ids.is_floating_point()):
            raise ValueError(f"init_ids must be an integer tensor of shape ({n_prefix},) (n_prefix token ids), "
                             f"got {init_ids!r}")
        if reparam_hidden is not None:
            raise ValueError("init_ids initialises the prefix itself: give it without reparam_hidden")
        start = _key_values_of(model, init_ids)  # (L, 2, n_kv, P, head_dim)
    impl = model.config._attn_implementation
    if impl not in _PREFIX_IMPLS:
        raise ValueError(f"prefix tuning wraps attn_implementation {sorted(_PREFIX_IMPLS)}, the model uses {impl!r}")
    c = model.config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    register_prefix_attention()
    _freeze(model)
    ref = next(model.parameters())
    model.prefix_tuning = PrefixTuning(c.num_hidden_layers, n_kv, head_dim, n_prefix, c.hidden_size,
                                       reparam_hidden, init_std).to(device=ref.device, dtype=ref.dtype)
    if init_ids is not None:
        model.prefix_tuning.key_value.data.copy_(start)
    model.register_forward_pre_hook(model.prefix_tuning.hand_down, with_kwargs=True)
    model.config._attn_implementation = _PREFIX_IMPLS[impl]
    return model


@torch.no_grad()
def _key_values_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Every layer's keys and values of the token ids ``ids`` (P,): (L, 2, n_kv, P, head_dim), from the KV cache."""
    out = model(input_ids=ids[None].to(next(model.parameters()).device), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


# ---- full fine-tuning and the registry ----------------------------------------------------------------------------

def full_finetune(model):
    """Every parameter trains (the baseline all the others save memory against)."""
    _arch(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


PREPARE_FUNCTIONS = {"lora": lora.add_lora, "adapter_h": add_adapter_houlsby, "adapter_l": add_adapter_lin,
           "bitfit": add_bitfit, "prefix": add_prefix_tuning, "full": full_finetune}


def prepare(model, method: str, **kwargs):
    """Set ``model`` up for fine-tuning with ``method`` (a key of PREPARE_FUNCTIONS) in place; returns it."""
    if method not in PREPARE_FUNCTIONS:
        raise ValueError(f"unknown method {method!r}; methods: {sorted(PREPARE_FUNCTIONS)}")
    fn = PREPARE_FUNCTIONS[method]
    allowed = list(inspect.signature(fn).parameters)[1:]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} takes no argument(s) {unknown}; it takes {allowed}")
    family, _, _ = _arch(model)
    if method == "lora" and family == "gpt2":
        kwargs.setdefault("target_modules", ["c_attn"])  # fused q,k,v: r·(d + 3d) per layer, as q and v at rank r
    return fn(model, **kwargs)
