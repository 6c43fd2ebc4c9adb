"""LoRA on a whole model: choose the layers, add adapters by name, merge, unmerge, switch and delete them.

``add_lora(model, target_modules, r, alpha)`` wraps each targeted linear layer in a ``LoRALinear`` (in place) and
freezes everything else, like ``peft.get_peft_model``; adapters are named (``"default"`` unless told otherwise) so
one base holds several, of which one is active. Every function here checks everything it will touch before it
changes anything: on an error the model is as it was.

Merging writes W0 + ΔW into each base weight (the paper's "no additional inference latency", sec. 4.1). A base
weight shared with another layer -- an ``lm_head`` tied to the token embeddings -- is never merged into: that
would change the embeddings too. Saving and loading in PEFT's format live in ``lorabook.lora.peft_format``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from .._checks import check_flag, check_module
from .layer import LoRALinear, base_layer, check_adapter_name, check_lora_args, is_linear

__all__ = ["find_targets", "linear_names", "select", "output_head_name", "check_lora_targets", "add_lora",
           "lora_layers", "count_trainable", "adapter_names", "merged_adapter", "active_adapter", "set_adapter",
           "disable_adapters", "delete_adapter", "merge_lora", "unmerge_lora", "switch_adapter", "merge_and_unload"]


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Names of the linear modules (nn.Linear, Conv1D or a self-describing base) that ``target_modules`` selects.

    target_modules: a list of name suffixes (``["q_proj", "v_proj"]``, matched on the last dotted parts),
    a regex string (``full match`` on the whole name), or ``"all-linear"`` (every linear but the output head).
    """
    return select(linear_names(model), target_modules, head=output_head_name(model))


def linear_names(model: nn.Module) -> list[str]:
    """Every linear layer's name; a LoRALinear counts as the linear it wraps (not twice)."""
    check_module("model", model)
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


def output_head_name(model: nn.Module) -> str | None:
    """The name of the model's output head (``get_output_embeddings()``), or None."""
    check_module("model", model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def check_lora_targets(model: nn.Module, target_modules, r, alpha, dropout, adapter_name: str = "default"
                       ) -> list[str]:
    """Check everything ``add_lora`` would do (targets, adapter name, r / alpha / dropout for every layer) without
    changing the model; return the targeted layer names."""
    check_module("model", model)
    names = find_targets(model, target_modules)
    check_adapter_name(adapter_name)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on {name}; "
                             f"adapters on this model: {adapter_names(model)}")
        info = module.info if isinstance(module, LoRALinear) else base_layer(module)
        check_lora_args(r, alpha, dropout, info.in_features, info.out_features)
    return names


def add_lora(model: nn.Module, target_modules=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and put a LoRA adapter on each targeted linear layer (in place); returns the model.

    Calling it again with a new ``adapter_name`` adds a second adapter to layers already wrapped.
    Everything is checked before the model changes (a name used twice, a bad rank for any layer).
    """
    names = check_lora_targets(model, target_modules, r, alpha, dropout, adapter_name)
    check_flag("use_rslora", use_rslora)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        else:
            model.set_submodule(name, LoRALinear(module, r=r, alpha=alpha, dropout=dropout,
                                               use_rslora=use_rslora, adapter_name=adapter_name))
    if merged_adapter(model) is None:
        set_adapter(model, adapter_name)  # one adapter active everywhere: untargeted layers run their base
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """path -> LoRALinear; every function here that takes a model starts from this (or ``linear_names``), so a
    non-model (a str, None) is a TypeError naming ``model`` everywhere."""
    check_module("model", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once."""
    check_module("model", model)
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

    Deleting the active adapter makes the first remaining adapter active, as peft does (never silently the base
    alone); deleting the last one leaves the plain model."""
    layers = _layers(model)
    _check_name(model, name)
    if merged_adapter(model) == name:
        raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge_lora(model) first")
    was_active = active_adapter(model) == name
    for path, m in layers.items():
        if name in m.lora_A:
            m.delete_adapter(name)
            if not m.lora_A:
                model.set_submodule(path, m.base)
    remaining = adapter_names(model)
    if was_active and remaining:
        set_adapter(model, remaining[0])
    return model


def _check_mergeable(model: nn.Module, layers: dict[str, LoRALinear], name: str) -> None:
    """Every layer carrying ``name`` can take ΔW, and no base weight it would change is shared (tied)."""
    for m in layers.values():
        if name in m.lora_A:
            m.check_mergeable()
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for path, m in layers.items():
        shared = owners.get(id(m.base.weight), [])
        if name in m.lora_A and len(shared) > 1:
            raise ValueError(f"cannot merge adapter {name!r} into {path}: its weight is tied to "
                             f"{[n for n in shared if n != path + '.base.weight']} (one tensor), so W0 + ΔW would "
                             "change those layers too; keep this adapter unmerged, or untie the weights first "
                             "(e.g. give the head its own copy: model.lm_head.weight = nn.Parameter(W.clone()))")


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
    _check_name(model, name)
    _check_mergeable(model, layers, name)  # every layer checked before any changes
    set_adapter(model, name)
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
    layers = _layers(model)
    _check_name(model, name)
    _check_mergeable(model, layers, name)  # before the unmerge: a refused merge leaves the current one merged
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
        model.set_submodule(path, m.base)
    return model
