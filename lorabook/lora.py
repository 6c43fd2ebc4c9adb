"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A frozen pretrained weight W0 (out, in) is adapted by a trainable low-rank update:

    h = W0 x + ΔW x = W0 x + (α / r) · B A x        A (r, in), B (out, r), r ≪ min(in, out)

A starts Kaiming-uniform and B at zero, so ΔW = B A = 0 and training starts exactly at the base model.
Only A and B train: r·(in + out) parameters per adapted layer instead of in·out, which for square d×d
targets gives the paper's |Θ| = 2 × L_LoRA × d_model × r. With rsLoRA (Kalajdzievski, 2023) the scale is
α / √r so that the update's size does not shrink as r grows.

Layout as nn.Linear: ``lora_A[name]`` (r, in), ``lora_B[name]`` (out, r), ``ΔW = B @ A``. Adapters are kept
by name (``"default"`` unless told otherwise) so one base can hold several; one of them is active. GPT-2's
``Conv1D`` stores its weight transposed, (in, out) (peft calls this ``fan_in_fan_out``): A and B keep the
layout above and only merging adds ΔWᵀ.

Merging (sec. 4.1, "no additional inference latency") writes W = W0 + ΔW into the base weight, so the forward
is a plain linear again; unmerging subtracts the same ΔW. In fp32 that restores W0 to within one rounding
step of W0 + ΔW (≈ 1e-7 · max|W0 + ΔW|). Saving and loading in PEFT's format live in ``lorabook.lora_io``.
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv1d_class():
    """transformers' Conv1D if transformers is loaded (a GPT-2 cannot exist otherwise), else None.

    Looked up lazily so that ``import lorabook.lora`` does not pay for importing transformers."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_quantized_linear(module: nn.Module) -> bool:
    """A ``lorabook.linear_nf4.LinearNF4``: a frozen 4-bit base that LoRA can wrap but not merge into.

    Looked up lazily, like Conv1D: a model can only hold one once ``lorabook.linear_nf4`` is imported."""
    cls = getattr(sys.modules.get("lorabook.linear_nf4"), "LinearNF4", None)
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, GPT-2's Conv1D (a linear layer whose weight is stored (in, out)), or a 4-bit LinearNF4."""
    conv1d = _conv1d_class()
    return (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
            or is_quantized_linear(module))


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, GPT-2's ``Conv1D`` or a 4-bit ``LinearNF4``) plus named low-rank
    adapters.

    The active adapter's ``(α/r) · B A x`` is added to the base output, unless that adapter is merged into
    the base weight (``merged``), in which case the base alone already computes it. On a 4-bit base (QLoRA)
    A and B are fp32 and merging is refused: W0 + ΔW has no exact 4-bit form."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default"):
        super().__init__()
        if not is_linear(base):
            raise ValueError(f"base must be an nn.Linear, a transformers Conv1D or a lorabook LinearNF4, "
                             f"got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and not is_quantized_linear(base)  # Conv1D: (in, out)
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
    def in_features(self) -> int:
        return _in_out(self.base)[0]

    @property
    def out_features(self) -> int:
        return _in_out(self.base)[1]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zeros) and make it the active one.

        While another adapter is merged, that one stays active (``switch_adapter`` moves to the new one)."""
        _check_lora_args(r, alpha, dropout, self.in_features, self.out_features)
        if name in self.lora_A:
            raise ValueError(f"adapter_name {name!r} already exists; existing adapters: {self.adapters}")
        check_adapter_name(name)
        if is_quantized_linear(self.base):  # a 4-bit base: train fp32 adapters (as peft does for QLoRA)
            device, dtype = self.base.weight_packed.device, torch.float32
        else:
            device, dtype = self.base.weight.device, self.base.weight.dtype
        A = torch.empty(r, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the same init nn.Linear (and peft) use for A
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, alpha, float(dropout)
        self.use_rslora[name] = bool(use_rslora)
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if self.merged is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        name = self._name(name)
        if self.merged == name:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge_lora first")
        del self.lora_A[name], self.lora_B[name]
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            del d[name]
        if self.active_adapter == name:
            self.active_adapter = None  # nothing active until set_adapter: the layer computes the base alone

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW = (α/r) · B @ A, shaped (out, in) like an nn.Linear weight (transpose it for a Conv1D)."""
        name = self._name(name)
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]  # (out, r) @ (r, in)

    def _name(self, name: str | None) -> str:
        name = self.active_adapter if name is None else name
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter_name {name!r}; this layer has {self.adapters}")
        return name

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
        """W ← W + ΔW (in place); from now on the forward is the base layer alone."""
        name = self._name(name)
        _check_mergeable(self.base)
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
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.lora_dropout[name]
        if p > 0 and self.training:
            x = F.dropout(x, p, training=True)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        h = F.linear(x, A)  # (..., r): the low-rank bottleneck
        if result.dtype == B.dtype:
            # result + s · h Bᵀ in one GEMM with beta = 1: (N, out) + s · (N, r) @ (r, out)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.T,
                              alpha=self.scaling[name])
            return out.view(result.shape)
        return result + (F.linear(h, B) * self.scaling[name]).to(result.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, ranks={self.r}, "
                f"active={self.active_adapter!r}, merged={self.merged!r}")


def _check_mergeable(base: nn.Module) -> None:
    if is_quantized_linear(base):
        raise ValueError("cannot merge a LoRA adapter into a 4-bit LinearNF4 base: W0 + ΔW has no exact NF4 form "
                         "and re-quantizing it would lose most of ΔW; keep the adapter unmerged (QLoRA serves it "
                         "that way) or replace the base by a dequantized nn.Linear first")


def check_adapter_name(name) -> str:
    """A name the ParameterDicts can hold: a non-empty str, no '.', not one of their attributes."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter_name must be a non-empty str without '.' that is not a ParameterDict "
                         f"attribute (like 'keys' or 'copy'), got {name!r}")
    return name


def _check_lora_args(r, alpha, dropout, in_features: int, out_features: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}: "
                         "a rank-r update cannot have rank above the smaller side")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the linear modules (nn.Linear or Conv1D) that ``target_modules`` selects.

    target_modules: a list of name suffixes (``["q_proj", "v_proj"]``, matched on the last dotted parts),
    a regex string (``full match`` on the whole name), or ``"all-linear"`` (every linear but the output head).
    """
    return select(linear_names(model), target_modules, head=_output_head_name(model))


def linear_names(model: nn.Module) -> list[str]:
    """Every linear layer's name; a LoRALinear counts as the linear it wraps (not twice)."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [n for n, m in model.named_modules()
            if isinstance(m, LoRALinear) or (is_linear(m) and n.rpartition(".")[0] not in wrapped)]


def select(names: list[str], target_modules, head: str | None = None, arg: str = "target_modules") -> list[str]:
    """The ``names`` (of linear layers) that ``target_modules`` picks; ``head`` is never picked by "all-linear".

    Shared by ``find_targets`` (a real model) and ``lorabook.memory`` (a model described by its shapes)."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        chosen = [n for n in names if n != head]
    elif isinstance(target_modules, str):
        chosen = [n for n in names if re.fullmatch(target_modules, n)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        chosen = [n for n in names if any(n == s or n.endswith("." + s) for s in target_modules)]
    else:
        raise ValueError(f"{arg} must be a non-empty list of names, a regex or 'all-linear', "
                         f"got {target_modules!r}")
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"{arg}={target_modules!r} matches no nn.Linear; linear layers here: {kinds}")
    return chosen


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_lora_targets(model: nn.Module, target_modules, r, alpha, dropout, adapter_name: str = "default"
                       ) -> list[str]:
    """Check everything ``add_lora`` would do (targets, adapter name, r / alpha / dropout for every layer) without
    changing the model; return the targeted layer names."""
    names = find_targets(model, target_modules)
    check_adapter_name(adapter_name)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on {name}; "
                             f"adapters on this model: {adapter_names(model)}")
        in_out = (module.in_features, module.out_features) if isinstance(module, LoRALinear) else _in_out(module)
        _check_lora_args(r, alpha, dropout, *in_out)
    return names


def add_lora(model: nn.Module, target_modules=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and put a LoRA adapter on each targeted linear layer (in place); returns the model.

    Calling it again with a new ``adapter_name`` adds a second adapter to layers already wrapped.
    Everything is checked before the model changes (a name used twice, a bad rank for any layer).
    """
    names = check_lora_targets(model, target_modules, r, alpha, dropout, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        else:
            _set_child(model, name, LoRALinear(module, r=r, alpha=alpha, dropout=dropout,
                                               use_rslora=use_rslora, adapter_name=adapter_name))
    if merged_adapter(model) is None:
        set_adapter(model, adapter_name)  # one adapter active everywhere: untargeted layers run their base
    return model


def _in_out(linear: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D (weight (in, out)) or a LinearNF4."""
    if is_quantized_linear(linear):
        return linear.in_features, linear.out_features
    w = linear.weight
    return (w.shape[1], w.shape[0]) if isinstance(linear, nn.Linear) else (w.shape[0], w.shape[1])


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- adapters by name, on the whole model -------------------------------------------------------------------

def _layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call add_lora (or load_adapter) first")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order they were added."""
    return list(dict.fromkeys(n for m in lora_layers(model).values() for n in m.lora_A))


def _check_name(model: nn.Module, name, arg: str = "adapter_name") -> str:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"unknown {arg} {name!r}; adapters on this model: {names}")
    return name


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter merged into the base weights, or None."""
    return next((m.merged for m in lora_layers(model).values() if m.merged is not None), None)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the forward uses (None: the base alone, e.g. inside ``disable_adapters``)."""
    return next((m.active_adapter for m in lora_layers(model).values() if m.active_adapter is not None), None)


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one; layers that do not carry it compute their base alone."""
    layers = _layers(model)
    _check_name(model, name)
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        raise ValueError(f"adapter {merged!r} is merged into the base weights; unmerge_lora(model) first, "
                         f"or switch_adapter(model, {name!r})")
    for m in layers.values():
        m.active_adapter = name if name in m.lora_A else None
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model): ...`` runs the base model alone; the active adapter comes back after."""
    layers = _layers(model)
    merged = merged_adapter(model)
    if merged is not None:
        raise ValueError(f"adapter {merged!r} is merged into the base weights; unmerge_lora(model) first")
    saved = {n: m.active_adapter for n, m in layers.items()}
    try:
        for m in layers.values():
            m.active_adapter = None
        yield model
    finally:
        for n, m in layers.items():
            m.active_adapter = saved[n]


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` everywhere; a layer left with no adapter becomes its plain base layer again.

    Deleting the active adapter leaves none active (the base alone) until ``set_adapter``."""
    layers = _layers(model)
    _check_name(model, name)
    if merged_adapter(model) == name:
        raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge_lora(model) first")
    for path, m in layers.items():
        if name in m.lora_A:
            m.delete_adapter(name)
            if not m.lora_A:
                _set_child(model, path, m.base)
    return model


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """W ← W + ΔW for ``adapter_name`` (default: the active one) in every layer carrying it; it becomes active.

    The merged forward costs what the base costs (the paper's "no additional inference latency")."""
    layers = _layers(model)
    merged = merged_adapter(model)
    if merged is not None:
        raise ValueError(f"adapter {merged!r} is already merged; merging twice would add ΔW twice "
                         "(unmerge_lora(model) first, or switch_adapter)")
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name is None:
        raise ValueError(f"no adapter is active; pass adapter_name (one of {adapter_names(model)})")
    set_adapter(model, _check_name(model, name))
    for m in layers.values():  # check every layer before changing any
        if name in m.lora_A:
            _check_mergeable(m.base)
    for m in layers.values():
        if name in m.lora_A:
            m.merge(name)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """W ← W − ΔW in every merged layer; the adapter stays active and is added in the forward again."""
    layers = _layers(model)
    if merged_adapter(model) is None:
        raise ValueError("model is not merged; nothing to unmerge (merge_lora first)")
    for m in layers.values():
        if m.merged is not None:
            m.unmerge()
    return model


def switch_adapter(model: nn.Module, name: str) -> nn.Module:
    """Serve another adapter from merged weights: unmerge the current one (if any), merge ``name``."""
    _layers(model)
    _check_name(model, name)
    if merged_adapter(model) is not None:
        unmerge_lora(model)
    return merge_lora(model, name)


def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge (unless merged) and replace every LoRALinear by its base layer: a plain model, like peft's."""
    merged = merged_adapter(model)
    if merged is None:
        merge_lora(model, adapter_name)
    elif adapter_name is not None and adapter_name != merged:
        raise ValueError(f"adapter {merged!r} is merged, not adapter_name={adapter_name!r}; "
                         "switch_adapter first")
    for path, m in _layers(model).items():
        _set_child(model, path, m.base)
    return model
