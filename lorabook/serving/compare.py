"""Serving one batch of requests over several adapters three ways, for notebook 10 and ``lorabook.bench serving``.

    merge_per_adapter   peft: for each adapter in the batch, merge it into the base (W0 + s B A), generate its
                        requests as one batch, unmerge -- what serving "one adapter at a time" costs; its throughput
                        falls as the batch holds more distinct adapters
    peft_mixed          peft's mixed batch: ``generate(..., adapter_names=...)``, one batch, each LoRA layer looping
                        over the adapters present (peft's ``_mixed_batch_forward``)
    lorabook_batched    ``lorabook.serving.Server``: one batch, one GEMM per linear for every row, the LoRA parts
                        batched from the unified pool's pages

All greedy, prompts of one length (so no padding anywhere), the new tokens only. ``sweep`` serves the same requests
with 1, 2, 4, … distinct adapters and times the three.
"""
from __future__ import annotations

import time
import warnings

import torch

__all__ = ["merge_per_adapter", "peft_mixed", "lorabook_batched", "spread", "sweep"]


def _generate(model, ids: torch.Tensor, max_new_tokens: int, **kw) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


def _check_prompts(prompts: list[list[int]]) -> None:
    if not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must be a non-empty list of token-id lists of one length (no padding here)")


@torch.no_grad()
def merge_per_adapter(model, prompts: list[list[int]], names: list[str], max_new_tokens: int) -> list[list[int]]:
    """peft ``PeftModel`` holding every adapter: merge each adapter present, run its requests together, unmerge."""
    _check_prompts(prompts)
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {}
    previous = model.active_adapter
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)           # active: layers the adapter does not target add nothing either
        model.merge_adapter()
        try:
            ids = torch.tensor([prompts[i] for i in rows], device=device)
            out.update(zip(rows, _generate(model, ids, max_new_tokens)))
        finally:
            with warnings.catch_warnings():          # layers the adapter does not target: nothing to unmerge
                warnings.filterwarnings("ignore", message="Already unmerged")
                model.unmerge_adapter()
            model.set_adapter(previous)
    return [out[i] for i in range(len(prompts))]


@torch.no_grad()
def peft_mixed(model, prompts: list[list[int]], names: list[str], max_new_tokens: int) -> list[list[int]]:
    """peft's mixed batch: every request in one batch, ``adapter_names`` naming each row's adapter."""
    _check_prompts(prompts)
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    return _generate(model, ids, max_new_tokens, adapter_names=list(names))


def lorabook_batched(server, prompts: list[list[int]], names: list[str], max_new_tokens: int) -> list[list[int]]:
    """``server.generate``: continuous batching over the unified pool."""
    return server.generate(prompts, list(names), max_new_tokens)


def spread(adapters: list[str], n_requests: int, distinct: int) -> list[str]:
    """n_requests adapter names cycling through the first ``distinct`` of ``adapters``."""
    if not 1 <= distinct <= len(adapters):
        raise ValueError(f"distinct must be in [1, {len(adapters)}], got {distinct}")
    return [adapters[i % distinct] for i in range(n_requests)]


def sweep(peft_model, server, adapters: list[str], prompts: list[list[int]], distinct=(1, 2, 4, 8),
          max_new_tokens: int = 8, progress: bool = True) -> list[dict]:
    """For each count of distinct adapters: every strategy on the same requests -> rows of tokens/s, seconds and
    whether its tokens equal lorabook's."""
    from tqdm.auto import tqdm

    strategies = {"merge per adapter": (merge_per_adapter, peft_model), "peft mixed batch": (peft_mixed, peft_model),
                  "lorabook": (lorabook_batched, server)}
    rows = []
    for d in tqdm(list(distinct), desc="distinct adapters", disable=not progress):
        names = spread(adapters, len(prompts), d)
        tokens = {}
        for label, (run, model) in reversed(list(strategies.items())):          # lorabook first: the reference
            start = time.perf_counter()
            tokens[label] = run(model, prompts, names, max_new_tokens)
            seconds = time.perf_counter() - start
            rows.append({"distinct": d, "strategy": label, "seconds": seconds,
                         "tokens_per_s": sum(map(len, tokens[label])) / seconds,
                         "equal_to_lorabook": tokens[label] == tokens["lorabook"]})
    return rows
