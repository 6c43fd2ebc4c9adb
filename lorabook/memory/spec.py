"""The shapes memory depends on: ``ModelSpec`` (layers, widths, heads, vocabulary, MLP and norm kind), the papers'
models by name (``KNOWN_MODELS``: SmolLM2-135M, LLaMA-7B/65B, GPT-2 medium, GPT-3 175B), ``as_spec`` (a spec from a
name, a transformers config or a model) and ``lora_modules`` (which linears a LoRA target list picks)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from .._checks import bad_choice, check_positive_int
from ..lora.model import select

__all__ = ["ModelSpec", "KNOWN_MODELS", "as_spec", "lora_modules"]


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that memory depends on. ``mlp``: "swiglu" (Llama) or "gelu" (GPT); ``norm``: "rmsnorm" or
    "layernorm"; ``n_params`` (optional) overrides the count computed from the shapes (a paper's nominal size)."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    tie_embeddings: bool = True
    n_params: int | None = None
    head_dim: int | None = None
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    bias: bool = False
    n_positions: int = 0  # learned position embeddings (GPT); 0 = RoPE
    name: str = "custom"

    def __post_init__(self):
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
            check_positive_int(f"ModelSpec.{k}", getattr(self, k))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.mlp not in ("swiglu", "gelu"):
            raise bad_choice("mlp", self.mlp, ("swiglu", "gelu"))
        if self.norm not in ("rmsnorm", "layernorm"):
            raise bad_choice("norm", self.norm, ("rmsnorm", "layernorm"))

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: linear name -> (in, out), with HF Llama names (GPT's Wq.. mapped onto them)."""
        dq, dkv, d, f = self.n_heads * self.hd, self.n_kv_heads * self.hd, self.d_model, self.d_ff
        lin = {"self_attn.q_proj": (d, dq), "self_attn.k_proj": (d, dkv), "self_attn.v_proj": (d, dkv),
               "self_attn.o_proj": (dq, d)}
        if self.mlp == "swiglu":
            lin["mlp.gate_proj"] = (d, f)
        lin.update({"mlp.up_proj": (d, f), "mlp.down_proj": (f, d)})
        return lin

    def count(self) -> int:
        """Parameters computed from the shapes (tied embeddings counted once)."""
        d, norm_p = self.d_model, (2 if self.norm == "layernorm" else 1) * self.d_model
        layer = sum(i * o + (o if self.bias else 0) for i, o in self.linears().values()) + 2 * norm_p
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * layer + self.vocab_size * d + self.n_positions * d + norm_p + head


KNOWN_MODELS = {  # the bare sizes from the papers / model cards
    "smollm2-135m": ModelSpec(30, 576, 9, 3, 1536, 49152, True, name="smollm2-135m"),
    "llama-7b": ModelSpec(32, 4096, 32, 32, 11008, 32000, False, name="llama-7b"),
    "llama-65b": ModelSpec(80, 8192, 64, 64, 22016, 32000, False, name="llama-65b"),
    "gpt2-medium": ModelSpec(24, 1024, 16, 16, 4096, 50257, True, mlp="gelu", norm="layernorm", bias=True,
                             n_positions=1024, name="gpt2-medium"),
    "gpt3-175b": ModelSpec(96, 12288, 96, 96, 49152, 50257, True, mlp="gelu", norm="layernorm", bias=True,
                           n_positions=2048, name="gpt3-175b"),
}


def as_spec(model) -> ModelSpec:
    """A ModelSpec from a known name, a ModelSpec, a transformers config or an nn.Module with ``.config``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        if model.lower() not in KNOWN_MODELS:
            raise bad_choice("model", model, KNOWN_MODELS)
        return KNOWN_MODELS[model.lower()]
    cfg = getattr(model, "config", model)
    get = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), default)
    d = get("hidden_size", "n_embd")
    if d is None:
        raise ValueError(f"model must be a name in {list(KNOWN_MODELS)}, a ModelSpec, a transformers config or "
                         f"a model with .config; got {type(model).__name__}")
    heads = get("num_attention_heads", "n_head")
    gpt = hasattr(cfg, "n_embd")
    spec = ModelSpec(
        n_layers=get("num_hidden_layers", "n_layer"), d_model=d, n_heads=heads,
        n_kv_heads=get("num_key_value_heads", default=heads), d_ff=get("intermediate_size", "n_inner",
                                                                        default=4 * d),
        vocab_size=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        head_dim=get("head_dim"), mlp="gelu" if gpt else "swiglu", norm="layernorm" if gpt else "rmsnorm",
        bias=gpt or bool(getattr(cfg, "attention_bias", False)), n_positions=get("n_positions", default=0) if gpt
        else 0, name=getattr(cfg, "model_type", "custom"))
    if isinstance(model, nn.Module):  # the real count (LoRA adapters already on it are not counted)
        real = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        spec = replace(spec, n_params=real if real != spec.count() else None)
    return spec


def lora_modules(spec: ModelSpec, targets) -> list[str]:
    """Names (HF Llama style) of the linears ``targets`` selects, as ``lorabook.lora.find_targets`` would."""
    names = [f"model.layers.{i}.{k}" for i in range(spec.n_layers) for k in spec.linears()] + ["lm_head"]
    return select(names, targets, head="lm_head", arg="lora_targets")
