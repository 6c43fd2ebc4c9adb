"""Where the adapters live: all of them in host memory, the ones in use on the device (S-LoRA §4, vLLM's
``max_cpu_loras`` / ``max_loras``).

    AdapterStore   adapters by name, read from PEFT-format folders and checked against the base model
                   (``lorabook.lora.read_adapter``: the model is not changed), kept in host memory
    DeviceCache    the adapters a batch needs, copied to the device under a byte budget; the least recently used
                   one not needed now is evicted first; loads, hits and evictions counted. Each adapter on the
                   device has a slot: the index a batch's rows name (``lorabook.serving.batched``)

A host adapter: {module path: (A (r, in), B (out, r), scaling)} for the layers it targets, fp32.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from .._checks import check_int, check_module
from ..lora import read_adapter
from ..lora.layer import check_adapter_name

__all__ = ["HostAdapter", "AdapterStore", "DeviceCache", "AdapterTooLarge"]


class AdapterTooLarge(ValueError):
    """An adapter (or the set a batch needs) does not fit the device budget."""


@dataclass(frozen=True)
class HostAdapter:
    name: str
    layers: dict            # module path -> (A (r, in), B (out, r), scaling)

    @cached_property
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B, _ in self.layers.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {path: A.shape[0] for path, (A, _, _) in self.layers.items()}


class AdapterStore:
    """Adapters for one base model, by name, in host memory."""

    def __init__(self, model: nn.Module):
        self.model = check_module("model", model)
        self.adapters: dict[str, HostAdapter] = {}

    def add(self, name: str, directory) -> HostAdapter:
        """Read a PEFT LoRA folder as adapter ``name``; checked against the model first (another architecture, a
        missing or misshapen tensor: a clear error, nothing added)."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is taken; pick another or remove it first")
        plan = read_adapter(self.model, directory, adapter_name=name)
        layers = {path: (s["A"].detach().float().contiguous(), s["B"].detach().float().contiguous(),
                         s["alpha"] / (math.sqrt(s["r"]) if s["use_rslora"] else s["r"]))
                  for path, s in plan.items()}
        self.adapters[name] = adapter = HostAdapter(name, layers)
        return adapter

    def remove(self, name: str) -> None:
        self[name]
        del self.adapters[name]

    def __getitem__(self, name) -> HostAdapter:
        if name not in self.adapters:
            known = ", ".join(map(repr, sorted(self.adapters))) or "none"
            raise KeyError(f"unknown adapter {name!r} (added: {known}); add it with add_adapter(name, path)")
        return self.adapters[name]

    def __contains__(self, name) -> bool:
        return name in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)


class DeviceCache:
    """Adapters on ``device`` under ``budget_bytes``, least recently used evicted first."""

    def __init__(self, store: AdapterStore, budget_bytes: int, device=None):
        if not isinstance(store, AdapterStore):
            raise TypeError(f"store must be an AdapterStore, got {type(store).__name__}")
        self.store, self.budget = store, check_int("budget_bytes", budget_bytes, low=1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.resident: OrderedDict[str, dict] = OrderedDict()   # name -> device layers, oldest use first
        self.slots: dict[str, int] = {}
        self.loads = self.hits = self.evictions = 0
        self.version = 0                                        # bumped whenever the resident set changes

    @property
    def used_bytes(self) -> int:
        return sum(self.store[name].nbytes for name in self.resident)

    def fetch(self, names) -> dict[str, int]:
        """Make every adapter in ``names`` resident (None entries: no adapter) -> {name: slot}. Checks first: an
        unknown name or a set larger than the budget raises and changes nothing."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        adapters = [self.store[n] for n in wanted]               # unknown names raise here, before any change
        for a in adapters:
            if a.nbytes > self.budget:
                raise AdapterTooLarge(f"adapter {a.name!r} takes {a.nbytes:,} bytes, more than the device budget "
                                      f"of {self.budget:,}")
        need = sum(a.nbytes for a in adapters)
        if need > self.budget:
            raise AdapterTooLarge(f"the adapters of this batch take {need:,} bytes together, more than the device "
                                  f"budget of {self.budget:,}: batch fewer distinct adapters")
        for a in adapters:
            if a.name in self.resident:
                self.hits += 1
                self.resident.move_to_end(a.name)
                continue
            while self.used_bytes + a.nbytes > self.budget:
                victim = next(n for n in self.resident if n not in wanted)   # exists: the wanted set fits
                self._evict(victim)
            self.resident[a.name] = {p: (A.to(self.device), B.to(self.device), s) for p, (A, B, s) in a.layers.items()}
            self.slots[a.name] = min(set(range(len(self.resident))) - set(self.slots.values()))
            self.loads += 1
            self.version += 1
        return {n: self.slots[n] for n in wanted}

    def _evict(self, name: str) -> None:
        del self.resident[name]
        del self.slots[name]
        self.evictions += 1
        self.version += 1

    def layer_adapters(self, path: str) -> list:
        """Slot by slot, (A, B, scaling) of the resident adapter for layer ``path``, None where a slot is empty or
        its adapter does not target the layer: the input of ``lorabook.serving.stack_adapters``."""
        by_slot = {slot: name for name, slot in self.slots.items()}
        size = max(by_slot, default=-1) + 1
        return [self.resident[by_slot[s]].get(path) if s in by_slot else None for s in range(size)]
