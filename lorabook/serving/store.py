"""Where the adapters live: all of them in host memory, the ones in use on the device (S-LoRA §4, vLLM's
``max_cpu_loras`` / ``max_loras``).

    AdapterStore   adapters by name, read from PEFT-format folders and checked against the base model
                   (``lorabook.lora.read_adapter``: the model is not changed), kept in host memory
    DeviceCache    the adapters a batch needs, copied into pages of the unified pool (``pool``) they share with
                   the KV cache; the least recently used one not needed now is evicted first, when its pages are
                   wanted; loads, hits and evictions counted. Each adapter on the device has a slot: the index a
                   batch's rows name (``lorabook.serving.batched``)

A host adapter: {module path: (A (r, in), B (out, r), scaling)} for the layers it targets, fp32. On the device,
each row of A and of Bᵀ fills ⌈length / H⌉ pages of H values: a rank-r adapter on q, k, v, o of a layer whose
projections are at most H wide takes 4r pages for A and 4r for B.
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
from .pool import PagedPool, PoolExhausted

__all__ = ["HostAdapter", "AdapterStore", "DeviceCache", "AdapterTooLarge"]


class AdapterTooLarge(ValueError):
    """An adapter (or the set a batch needs) cannot be on the device: larger than the pool, or more adapters
    than ``max_adapters``."""


@dataclass(frozen=True)
class HostAdapter:
    name: str
    layers: dict            # module path -> (A (r, in), B (out, r), scaling)

    @cached_property
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B, _ in self.layers.values())

    def pages(self, page_size: int) -> int:
        """Pages of ``page_size`` values it takes in the pool: a row of A or Bᵀ of length L takes ⌈L / H⌉."""
        return sum(A.shape[0] * (-(-A.shape[1] // page_size) - (-B.shape[0] // page_size))
                   for A, B, _ in self.layers.values())

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
    """The adapters in use, their weights in pages of ``pool`` (shared with the KV cache: S-LoRA's unified pool);
    at most ``max_adapters`` at once (vLLM's ``max_loras``; None: as many as the pages allow). The least recently
    used one not needed now is evicted first, and only when its pages are wanted."""

    def __init__(self, store: AdapterStore, pool: PagedPool, max_adapters: int | None = None):
        if not isinstance(store, AdapterStore):
            raise TypeError(f"store must be an AdapterStore, got {type(store).__name__}")
        if not isinstance(pool, PagedPool):
            raise TypeError(f"pool must be a PagedPool, got {type(pool).__name__}")
        self.store, self.pool = store, pool
        self.max_adapters = None if max_adapters is None else check_int("max_adapters", max_adapters, low=1)
        self.resident: OrderedDict[str, dict] = OrderedDict()   # name -> {path: (a_pages, b_pages, scaling)}
        self.slots: dict[str, int] = {}
        self.loads = self.hits = self.evictions = 0
        self.version = 0                                        # bumped whenever the resident set changes

    def pages_of(self, name: str) -> int:
        """Pool pages adapter ``name`` takes on the device."""
        return self.store[name].pages(self.pool.page_size)

    @property
    def used_pages(self) -> int:
        return sum(self.pages_of(name) for name in self.resident)

    def evictable_pages(self, keep=()) -> int:
        """Pages the resident adapters not in ``keep`` hold: free for the taking."""
        return sum(self.pages_of(n) for n in self.resident if n not in keep)

    def fetch(self, names, keep_free: int = 0) -> dict[str, int]:
        """Make every adapter in ``names`` resident (None entries: no adapter) -> {name: slot}, leaving at least
        ``keep_free`` pages free (the KV cache the running requests will still write). Checks first: an unknown
        name, more adapters than ``max_adapters`` or than the pages can hold raises and changes nothing."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        missing = [self.store[n] for n in wanted if n not in self.resident]   # unknown names raise here
        check_int("keep_free", keep_free, low=0)
        if self.max_adapters is not None and len(wanted) > self.max_adapters:
            raise AdapterTooLarge(f"this batch uses {len(wanted)} adapters, more than max_adapters="
                                  f"{self.max_adapters}: batch fewer distinct adapters")
        need = sum(a.pages(self.pool.page_size) for a in missing) + keep_free
        if need > self.pool.free_pages + self.evictable_pages(keep=wanted):
            raise PoolExhausted(f"the adapters of this batch need {need - keep_free:,} more pages (and "
                                f"{keep_free:,} stay free for the KV cache): {self.pool.free_pages:,} are free and "
                                f"{self.evictable_pages(keep=wanted):,} held by idle adapters")
        for name in wanted:
            if name in self.resident:
                self.hits += 1
                self.resident.move_to_end(name)
        for a in missing:
            while (self.pool.free_pages - keep_free < a.pages(self.pool.page_size) or
                   self.max_adapters is not None and len(self.resident) >= self.max_adapters):
                self._evict(next(n for n in self.resident if n not in wanted))   # exists: checked above
            self._load(a)
        while self.pool.free_pages < keep_free:                 # idle adapters give their pages to the KV cache
            self._evict(next(n for n in self.resident if n not in wanted))
        return {n: self.slots[n] for n in wanted}

    def _load(self, adapter: HostAdapter) -> None:
        """Copy the adapter's rows into pages: row j of A (r, in) takes pages ⌈in / H⌉, of Bᵀ (r, out) ⌈out / H⌉."""
        H = self.pool.page_size
        pages = self.pool.allocate(f"adapter {adapter.name}", adapter.pages(H))
        layers, used = {}, 0
        for path, (A, B, scaling) in adapter.layers.items():
            tables = []
            for rows in (A, B.T):                                       # (r, in), (r, out)
                per_row = -(-rows.shape[1] // H)
                table = pages[used:used + rows.shape[0] * per_row]
                used += len(table)
                padded = torch.nn.functional.pad(rows, (0, per_row * H - rows.shape[1]))      # (r, per_row · H)
                self.pool.write(table, padded.reshape(-1, H))
                tables.append(table.view(rows.shape[0], per_row))
            layers[path] = (*tables, scaling)
        self.resident[adapter.name] = layers
        self.slots[adapter.name] = min(set(range(len(self.resident))) - set(self.slots.values()))
        self.loads += 1
        self.version += 1

    def _evict(self, name: str) -> None:
        self.pool.release(f"adapter {name}")
        del self.resident[name]
        del self.slots[name]
        self.evictions += 1
        self.version += 1

    def layer_pages(self, path: str) -> list:
        """Slot by slot, (a_pages, b_pages, scaling) of the resident adapter for layer ``path``, None where a slot
        is empty or its adapter does not target the layer: the input of ``lorabook.serving.stack_pages``."""
        by_slot = {slot: name for name, slot in self.slots.items()}
        size = max(by_slot, default=-1) + 1
        return [self.resident[by_slot[s]].get(path) if s in by_slot else None for s in range(size)]
