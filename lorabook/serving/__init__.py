"""Serving many LoRA adapters on one base model: S-LoRA in miniature (Sheng et al. 2023,
https://arxiv.org/abs/2311.03285; punica's BGMV / SGMV, Chen et al. 2023, https://arxiv.org/abs/2310.18547).

    batched.py   the LoRA part of a batch whose rows use different adapters of different ranks: a per-row loop
                 (the formula), segments per adapter (SGMV), a gather without padding (BGMV), masked dense GEMMs,
                 vLLM's padded gather; and BGMV reading the adapters' rows from the pool's pages
    store.py     AdapterStore (PEFT folders in host memory, checked against the base) and DeviceCache (the
                 adapters in use, in pages of the pool, least recently used evicted first, slots)
    pool.py      the unified paged pool (adapter weights and KV cache in pages of H values) and the contiguous
                 first-fit allocator it is measured against
    trace.py     a seeded request trace served in the paged pool and in contiguous ranges: fragmentation measured
    server.py    Server(model).add_adapter(name, peft_folder) / .generate(input_ids, adapter_names, max_new_tokens):
                 continuous batching, the keys and values in the pool, greedy -- each request as peft alone
"""
from .batched import (DENSE_WORK, METHODS, SEGMENT_ROWS, LoRAStack, PagedStack, choose_method, lora_delta,
                      lora_delta_dense, lora_delta_gather, lora_delta_loop, lora_delta_padded, lora_delta_paged,
                      lora_delta_segments, pad_stack, Pairs, ragged_pairs, shrink_pages, stack_adapters, stack_pages)
from .pool import ContiguousAllocator, PagedPool, PoolExhausted
from .server import LINEARS, SERVER_METHODS, Server
from .store import AdapterStore, AdapterTooLarge, DeviceCache, HostAdapter
from .trace import TraceRequest, request_trace, simulate

__all__ = ["DENSE_WORK", "METHODS", "SEGMENT_ROWS", "LoRAStack", "PagedStack", "choose_method", "lora_delta",
           "lora_delta_dense", "lora_delta_gather", "lora_delta_loop", "lora_delta_padded", "lora_delta_paged",
           "lora_delta_segments", "pad_stack", "Pairs", "ragged_pairs", "shrink_pages", "stack_adapters", "stack_pages",
           "ContiguousAllocator", "PagedPool", "PoolExhausted", "AdapterStore", "AdapterTooLarge", "DeviceCache",
           "HostAdapter", "Server", "LINEARS", "SERVER_METHODS", "TraceRequest", "request_trace", "simulate"]
