"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A frozen pretrained weight W0 (out, in) is adapted by a trainable low-rank update:

    h = W0 x + ΔW x = W0 x + (α / r) · B A x        A (r, in), B (out, r), r ≪ min(in, out)

A starts Kaiming-uniform and B at zero, so ΔW = B A = 0 and training starts exactly at the base model.
Only A and B train: r·(in + out) parameters per adapted layer instead of in·out, which for square d×d
targets gives the paper's |Θ| = 2 × L_LoRA × d_model × r. With rsLoRA (Kalajdzievski, 2023) the scale is
α / √r so that the update's size does not shrink as r grows.

Layout as nn.Linear: ``lora_A[name]`` (r, in), ``lora_B[name]`` (out, r), ``ΔW = B @ A``. Adapters are kept
by name (``"default"`` unless told otherwise) so later lessons can hold several on one base.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus named low-rank adapters; the active one is added to the output."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zeros) and make it the active one."""
        _check_lora_args(r, alpha, dropout, self.in_features, self.out_features)
        if name in self.lora_A:
            raise ValueError(f"adapter_name {name!r} already exists; existing adapters: {list(self.lora_A)}")
        w = self.base.weight
        A = torch.empty(r, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the same init nn.Linear (and peft) use for A
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.active_adapter = name

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW = (α/r) · B @ A, shaped like the base weight (out, in)."""
        name = self._name(name)
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def _name(self, name: str | None) -> str:
        name = self.active_adapter if name is None else name
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter_name {name!r}; this layer has {list(self.lora_A)}")
        return name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        result = self.base(x)
        if self.active_adapter is None:
            return result
        name = self.active_adapter
        A, B = self.lora_A[name], self.lora_B[name]
        h = F.linear(self.lora_dropout[name](x).to(A.dtype), A)  # (..., r): the low-rank bottleneck
        return result + F.linear(h, B).to(result.dtype) * self.scaling[name]  # (..., out)

    def extra_repr(self) -> str:
        ranks = {n: tuple(a.shape)[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapter!r}"


def _check_lora_args(r, alpha, dropout, in_features: int, out_features: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}: "
                         "a rank-r update cannot have rank above the smaller side")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the nn.Linear modules that ``target_modules`` selects.

    target_modules: a list of name suffixes (``["q_proj", "v_proj"]``, matched on the last dotted parts),
    a regex string (``full match`` on the whole name), or ``"all-linear"`` (every linear but the output head).
    """
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    # a LoRALinear counts as the linear it wraps (so a second adapter finds the same layers)
    linears = [n for n, m in model.named_modules()
               if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and n.rpartition(".")[0] not in wrapped)]
    return select(linears, target_modules, head=_output_head_name(model))


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


def add_lora(model: nn.Module, target_modules=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and put a LoRA adapter on each targeted linear layer (in place); returns the model.

    Calling it again with a new ``adapter_name`` adds a second adapter to layers already wrapped.
    """
    names = find_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        else:
            setattr(parent, child, LoRALinear(module, r=r, alpha=alpha, dropout=dropout,
                                              use_rslora=use_rslora, adapter_name=adapter_name))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
