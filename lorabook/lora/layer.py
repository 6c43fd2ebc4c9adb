"""The LoRA layer: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685), one linear at a time.

A frozen pretrained weight W0 (out, in) is adapted by a trainable low-rank update:

    h = W0 x + ΔW x = W0 x + (α / r) · B A x        A (r, in), B (out, r), r ≪ min(in, out)

A starts Kaiming-uniform and B at zero, so ΔW = B A = 0 and training starts exactly at the base model.
Only A and B train: r·(in + out) parameters per adapted layer instead of in·out. With rsLoRA (Kalajdzievski,
2023) the scale is α / √r so that the update's size does not shrink as r grows. LoRA dropout (the paper's
``lora_dropout``, as in loralib and peft's LoraLayer: ``B(A(dropout(x))) * scale``) drops entries of the input
of the low-rank branch only, in train() mode (off in eval()): the base path always sees the whole x.

Layout as nn.Linear: ``lora_A[name]`` (r, in), ``lora_B[name]`` (out, r), ``ΔW = B @ A``. Adapters are kept
by name so one base can hold several; one of them is active.

What LoRA needs to know about the layer it wraps comes from ``base_layer(module)`` -> ``BaseLayer`` (in/out
features, whether ΔW can be merged into it, the dtype and device the adapters get, whether its weight is stored
(in, out) like GPT-2's Conv1D). nn.Linear and transformers' Conv1D are described here; any other layer -- a
4-bit ``lorabook.quant.LinearNF4``, later QA-LoRA's and the serving bases -- describes itself with a
``lora_base_layer()`` method. LoRA never looks for sibling classes.

Merging (sec. 4.1, "no additional inference latency") writes W = W0 + ΔW into the base weight, so the forward
is a plain linear again; unmerging subtracts the same ΔW. In fp32 that restores W0 to within one rounding
step of W0 + ΔW (≈ 1e-7 · max|W0 + ΔW|). A merged layer has no LoRA branch left to drop inputs of, so merged and
unmerged forwards agree in eval() mode only (with dropout > 0 they differ in train() mode).

The forward a student reads is ``lora_forward`` -- the formula above in one line. ``LoRALinear`` runs
``lora_forward_fused`` beside it (backend "auto"/"fast"): the same sum with ``h Bᵀ`` added into the base output
by one addmm (beta = 1), no (…, out) temporary. The two agree to float32 rounding, outputs and gradients, not bit
for bit (addmm sums in its own order; ``tests/test_lora_fused.py`` checks the bound); on a 16-bit base with fp32
adapters the fused function hands over to the readable one, so there they agree bit for bit.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_flag, check_number, check_positive_int

__all__ = ["BaseLayer", "base_layer", "is_linear", "LoRALinear", "lora_forward", "lora_forward_fused",
           "check_adapter_name", "check_lora_args", "BACKENDS"]

BACKENDS = ("auto", "reference", "fast")


# ---- what a base layer tells LoRA ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseLayer:
    """What LoRA needs to know about the linear layer it wraps."""
    in_features: int
    out_features: int
    mergeable: bool  # can W0 + ΔW be written into the layer's weight?
    adapter_dtype: torch.dtype  # A and B are created in this dtype …
    device: torch.device  # … on this device
    fan_in_fan_out: bool = False  # weight stored (in, out), like GPT-2's Conv1D: merging adds ΔWᵀ
    not_mergeable_because: str = ""  # said when a merge is refused


def _conv1d_class():
    """transformers' Conv1D if transformers is loaded (a GPT-2 cannot exist otherwise), else None.

    Looked up lazily so that ``import lorabook.lora`` does not pay for importing transformers."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def base_layer(module: nn.Module) -> BaseLayer | None:
    """The ``BaseLayer`` of a layer LoRA can wrap, or None for any other module."""
    describe = getattr(module, "lora_base_layer", None)
    if callable(describe):  # a layer that describes itself (LinearNF4, ...)
        return describe()
    conv1d = _conv1d_class()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        w = module.weight
        fan_in_fan_out = not isinstance(module, nn.Linear)  # Conv1D: weight (in, out)
        in_f, out_f = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        return BaseLayer(in_f, out_f, mergeable=True, adapter_dtype=w.dtype, device=w.device,
                         fan_in_fan_out=fan_in_fan_out)
    return None


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, GPT-2's Conv1D, or any layer with a ``lora_base_layer()`` method."""
    return base_layer(module) is not None


# ---- the forward: the readable formula, and the fused one beside it -----------------------------------------

def lora_forward(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """h = W0 x + (α/r) · B A x, with W0 x already computed (``base_out``). x (..., in) -> (..., out)."""
    x = F.dropout(x, dropout, training=training).to(A.dtype)  # dropout on the LoRA branch's input only
    return base_out + (scaling * (x @ A.T @ B.T)).to(base_out.dtype)  # (..., in) @ (in, r) @ (r, out)


def lora_forward_fused(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``lora_forward`` with s · h Bᵀ accumulated into the base output by one addmm (beta = 1): no (N, out)
    temporary for the LoRA term. Falls back to the readable sum where the dtypes differ (fp32 adapters on a
    16-bit base: there the term must be rounded to the base dtype once, which the readable path does)."""
    if base_out.dtype != B.dtype:
        return lora_forward(x, base_out, A, B, scaling, dropout, training)
    x = F.dropout(x, dropout, training=training).to(A.dtype)
    h = F.linear(x, A)  # (..., r): the low-rank bottleneck
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling)
    return out.view(base_out.shape)  # (N, out) + s · (N, r) @ (r, out)


_FORWARDS = {"reference": lora_forward, "fast": lora_forward_fused, "auto": lora_forward_fused}


# ---- argument checks ----------------------------------------------------------------------------------------

def check_adapter_name(name) -> str:
    """A name the ParameterDicts can hold: a non-empty str, no '.', not one of their attributes."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter_name must be a non-empty str without '.' that is not a ParameterDict "
                         f"attribute (like 'keys' or 'copy'), got {name!r}")
    return name


def check_lora_args(r, alpha, dropout, in_features: int, out_features: int) -> None:
    """r a positive int ≤ min(in, out); alpha a finite number > 0; dropout in [0, 1)."""
    check_positive_int("r", r)
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}: "
                         "a rank-r update cannot have rank above the smaller side")
    check_number("alpha", alpha, low=0, low_open=True)
    check_number("dropout", dropout, low=0, high=1, high_open=True)


# ---- the layer ----------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear layer (anything ``base_layer`` describes) plus named low-rank adapters.

    The active adapter's ``(α/r) · B A x`` is added to the base output, unless that adapter is merged into
    the base weight (``merged``), in which case the base alone already computes it. ``backend``: "reference"
    runs ``lora_forward``, "fast" / "auto" ``lora_forward_fused``."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default", backend: str = "auto"):
        super().__init__()
        info = base_layer(base)
        if info is None:
            raise ValueError(f"base must be an nn.Linear, a transformers Conv1D or a layer with a lora_base_layer() "
                             f"method (like lorabook.quant.LinearNF4), got {type(base).__name__}")
        check_choice("backend", backend, BACKENDS)
        self.base = base
        self.base.requires_grad_(False)
        self.fan_in_fan_out = info.fan_in_fan_out  # Conv1D: (in, out)
        self.backend = backend
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}  # name -> dropout probability on the LoRA input
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged: str | None = None  # the adapter whose ΔW is in the base weight now
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @property
    def info(self) -> BaseLayer:
        """What the base layer says of itself now (its device may have changed since it was wrapped)."""
        return base_layer(self.base)

    @property
    def in_features(self) -> int:
        return self.info.in_features

    @property
    def out_features(self) -> int:
        return self.info.out_features

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zeros) and make it the active one.

        While another adapter is merged, that one stays active (``switch_adapter`` moves to the new one)."""
        check_lora_args(r, alpha, dropout, self.in_features, self.out_features)
        check_flag("use_rslora", use_rslora)
        if name in self.lora_A:
            raise ValueError(f"adapter_name {name!r} already exists; existing adapters: {self.adapters}")
        check_adapter_name(name)
        device, dtype = self.info.device, self.info.adapter_dtype
        A = torch.empty(r, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the same init nn.Linear (and peft) use for A
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, alpha, float(dropout)
        self.use_rslora[name] = use_rslora
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if self.merged is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was the active one, the first remaining adapter becomes active (as in
        peft), or none when it was the last."""
        name = self._name(name)
        if self.merged == name:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge_lora first")
        del self.lora_A[name], self.lora_B[name]
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            del d[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW = (α/r) · B @ A, shaped (out, in) like an nn.Linear weight (transpose it for a Conv1D)."""
        name = self._name(name)
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]  # (out, r) @ (r, in)

    def _name(self, name: str | None) -> str:
        name = self.active_adapter if name is None else name
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter_name {name!r}; this layer has {self.adapters}")
        return name

    def check_mergeable(self) -> None:
        """Raise ValueError if ΔW cannot be written into this layer's base weight."""
        if not self.info.mergeable:
            raise ValueError(f"cannot merge a LoRA adapter into a {type(self.base).__name__} base: "
                             f"{self.info.not_mergeable_because}")

    def _add_delta(self, name: str, sign: float) -> None:
        """W ← W + sign · ΔW in place, as one GEMM that writes W once (no ΔW temporary, no strided add)."""
        W, A, B = self.base.weight, self.lora_A[name], self.lora_B[name]
        s = sign * self.scaling[name]
        with torch.no_grad():
            if A.dtype != W.dtype:  # e.g. fp32 adapters on a bf16 base: form ΔW, then round it once
                delta = self.delta_weight(name)  # (out, in)
                W.add_((delta.T if self.fan_in_fan_out else delta).to(W.dtype), alpha=sign)
            elif self.fan_in_fan_out:
                W.addmm_(A.T, B.T, alpha=s)  # Conv1D (in, out) += s · (r, in)ᵀ @ (out, r)ᵀ = s · (B A)ᵀ
            else:
                W.addmm_(B, A, alpha=s)  # (out, in) += s · (out, r) @ (r, in)

    def merge(self, name: str | None = None) -> None:
        """W ← W + ΔW (in place); from now on the forward is the base layer alone (no LoRA dropout: equal to the
        unmerged forward in eval() mode)."""
        name = self._name(name)
        self.check_mergeable()
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is already merged; unmerge first (merging twice "
                             "would add ΔW twice)")
        self._add_delta(name, +1.0)
        self.merged = self.active_adapter = name

    def unmerge(self) -> None:
        """W ← W − ΔW: the same product, computed the same way, so W0 comes back up to one fp rounding."""
        if self.merged is None:
            raise ValueError("this layer is not merged; nothing to unmerge")
        self._add_delta(self.merged, -1.0)
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        result = self.base(x)  # (..., out)
        name = self.active_adapter
        if name is None or self.merged is not None:
            return result  # no adapter, or ΔW already inside the base weight
        return _FORWARDS[self.backend](x, result, self.lora_A[name], self.lora_B[name], self.scaling[name],
                                       self.lora_dropout[name], self.training)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, ranks={self.r}, "
                f"active={self.active_adapter!r}, merged={self.merged!r}")
