"""A generation server for many adapters on one base: continuous batching, greedy decoding (S-LoRA in miniature).

Requests come with a prompt (token ids) and an adapter name (None: the base model). Each step runs the base model
once for all running requests together: their new tokens are the rows of one batch -- the whole prompt of a request
that has just been admitted (prefill), one token for the others (decode). Every linear layer is

    y = x W0ᵀ  (one GEMM, all rows)  +  each row's own adapter's s · B A x  (``batched``)

Keys and values and the adapters' weights share one paged pool (``pool``, S-LoRA's unified pool): for every token
and layer, [k | v] in ⌈2 · kv_dim / H⌉ pages of H values, wherever free pages are; an adapter's rows of A and Bᵀ
likewise (``store.DeviceCache``). The decoding rows' LoRA parts read the pages (``lora_delta_paged``, BGMV: A's rows
dotted and Bᵀ's summed where they lie; the rows' pairs computed once per step for every layer of the same layout); a
prompt's, two matmuls on its adapter's rows (SGMV, ``PagedStack.rows``: views of the pages when they are one run).
A prompt attends causally to itself; the decoding rows attend together, each to its own cached tokens (their pages
gathered into one padded batch, the padding masked). A request is admitted (first come, first served) when the
pool can hold the keys and values of its prompt and all of its new tokens next to those of the running requests,
and its adapter if that is not on the device (idle adapters' pages count as free: they are evicted when wanted);
otherwise it waits until running ones finish. Each request finishes on its own, after max_new_tokens or at the
end-of-sequence token, as transformers' greedy ``generate`` does for that request alone.

The model: a transformers Llama-family causal LM (SmolLM2, ``lorabook.models.tiny_llama``), plain linear layers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_int, check_module
from .batched import METHODS, lora_delta, lora_delta_paged, ragged_pairs, stack_pages
from .pool import PagedPool
from .store import AdapterStore, AdapterTooLarge, DeviceCache

__all__ = ["Server", "LINEARS", "SERVER_METHODS"]

SERVER_METHODS = ("auto", "paged") + METHODS[1:]   # "paged": BGMV on the pages for every row (prompts too); the
#                                                    others: ``lora_delta`` on the stack gathered out of the pages
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")   # the linear layers of a decoder layer an adapter may target


@dataclass
class _Request:
    index: int
    prompt: list[int]
    adapter: str | None
    max_new: int
    out: list[int] = field(default_factory=list)
    cached: int = 0                          # tokens whose keys and values are in the pool
    pages: torch.Tensor | None = None        # (cached, layers · pages_per_token) page ids, token by token
    admitted: float = 0.0                    # seconds after the call (every request arrives with it)
    first_token: float | None = None         # seconds after the call: time to first token

    @property
    def owner(self) -> str:
        return f"request {self.index}"

    def new_tokens(self) -> list[int]:
        return self.prompt if self.cached == 0 else self.out[-1:]


def _check_llama(model: nn.Module) -> None:
    inner = getattr(model, "model", None)
    parts = [getattr(inner, n, None) for n in ("embed_tokens", "layers", "norm", "rotary_emb")]
    ok = None not in parts and isinstance(getattr(model, "lm_head", None), nn.Linear) and len(inner.layers) > 0
    if ok:
        layer = inner.layers[0]
        ok = all(type(layer.get_submodule(p)) is nn.Linear for p in LINEARS) and hasattr(layer, "input_layernorm")
    if not ok:
        raise ValueError(f"model ({type(model).__name__}) must be a transformers Llama-family causal LM with plain "
                         f"nn.Linear layers ({', '.join(LINEARS)}): no LoRA or quantized layers on it -- the "
                         f"adapters come through add_adapter")


class Server:
    """Many adapters, one base model: ``add_adapter(name, peft_folder)``, then ``generate``.

    max_batch: requests running at once; pool_pages: pages of hidden_size values (model dtype) for the KV cache and
    the adapters on the device; max_loras: adapters on the device at once (None: as many as the pages hold);
    max_lora_rank: the highest rank ``add_adapter`` accepts; method: the LoRA batching (``SERVER_METHODS``; "auto":
    BGMV on the pages for the decoding rows, SGMV on each prompt's adapter rows); compile: BGMV's shrink
    as one compiled gather-dot that reads the pages in place (``torch.compile``: the first decode step compiles
    it, seconds). The model is put in eval mode; its weights never change: the adapters stay beside it.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8, pool_pages: int = 2 ** 16,
                 max_loras: int | None = None, max_lora_rank: int = 64, method: str = "auto",
                 compile: bool = False):
        check_module("model", model)
        _check_llama(model)
        self.model = model.eval()
        self.max_batch = check_int("max_batch", max_batch, low=1)
        self.method = check_choice("method", method, SERVER_METHODS)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        self.shrink = "compiled" if compile else "gemm"
        self.max_lora_rank = check_int("max_lora_rank", max_lora_rank, low=1)
        cfg = model.config
        self.layers = model.model.layers
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_dim = self.kv_heads * self.head_dim
        self.hidden = cfg.hidden_size
        self.pages_per_token = math.ceil(2 * self.kv_dim / self.hidden)   # [k | v] of one token in one layer
        self.context = cfg.max_position_embeddings
        weight = model.lm_head.weight
        self.pool = PagedPool(check_int("pool_pages", pool_pages, low=1), self.hidden, weight.dtype, weight.device)
        self.store = AdapterStore(model)
        self.cache = DeviceCache(self.store, self.pool, max_loras)
        self._stacks: dict[str, object] = {}
        self._stacks_version = -1
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos = set([eos] if isinstance(eos, int) else eos or [])
        self.stats: dict[str, float] = {}

    # -- adapters ------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, path) -> None:
        """A PEFT LoRA folder as adapter ``name`` (checked against the base, kept in host memory); refused, and
        not added, if it targets a layer the server does not adapt, has a rank above ``max_lora_rank`` or takes more
        pages than the pool has."""
        adapter = self.store.add(name, path)
        outside = [p for p in adapter.layers if not p.startswith("model.layers.") or p.split(".", 3)[3] not in LINEARS]
        too_high = {p: r for p, r in adapter.ranks.items() if r > self.max_lora_rank}
        error = None
        if outside:
            error = ValueError(f"adapter {name!r} targets layers the server does not adapt ({', '.join(outside)}); "
                               f"it serves LoRA on {', '.join(LINEARS)}")
        elif too_high:
            path, r = max(too_high.items(), key=lambda item: item[1])
            error = ValueError(f"adapter {name!r} has rank {r} (on {path}), above max_lora_rank={self.max_lora_rank}")
        elif adapter.pages(self.hidden) > self.pool.n_pages:
            error = AdapterTooLarge(f"adapter {name!r} takes {adapter.pages(self.hidden):,} pages, more than the "
                                    f"pool's {self.pool.n_pages:,}")
        if error is not None:
            self.store.remove(name)
            raise error

    def _refresh_stacks(self) -> None:
        if self._stacks_version == self.cache.version:
            return
        for i, layer in enumerate(self.layers):
            for p in LINEARS:
                path, lin = f"model.layers.{i}.{p}", layer.get_submodule(p)
                adapters = self.cache.layer_pages(path)
                self._stacks[path] = (stack_pages(adapters, lin.in_features, lin.out_features, self.hidden,
                                                  device=lin.weight.device)
                                      if any(a is not None for a in adapters) else None)
        self._stacks_version = self.cache.version

    def _linears(self, i: int, names: tuple[str, ...], x: torch.Tensor, lora: _StepLoRA | None) -> list:
        """Layer i's linears ``names`` on the same input x (N, in): one GEMM each for every row, plus each row's
        LoRA: the decoding rows' by BGMV on the pages (``lora_delta_paged``, the linears' shrinks in one call),
        each prompt's by two matmuls on its adapter's rows (SGMV, ``PagedStack.rows``: in place when they are
        one run of pages). Another ``method``: every row's on the stack gathered out of its pages."""
        ys = [self.layers[i].get_submodule(n)(x) for n in names]                 # (N, out) each: every row
        stacks = [self._stacks[f"model.layers.{i}.{n}"] for n in names]
        todo = [k for k, p in enumerate(stacks) if p is not None]
        if lora is None or not todo:
            return ys
        storage = self.pool.storage
        if self.method not in ("auto", "paged"):                                 # the rows, out of their pages
            for k in todo:
                ys[k] += lora_delta(x.to(storage.dtype), lora.idx, stacks[k].gather(storage), self.method
                                    ).to(ys[k].dtype)
            return ys
        if lora.paged_idx is not None:                                           # BGMV, reading the pages
            deltas = lora_delta_paged(x, lora.paged_idx, [stacks[k] for k in todo], storage, self.shrink,
                                      [lora.pairs(stacks[k], storage.dtype) for k in todo])
            for k, delta in zip(todo, deltas):
                ys[k] += delta.to(ys[k].dtype)
        x = x.to(storage.dtype)
        for k in todo:                                                           # SGMV, prompt by prompt
            for slot, segments in lora.prompts.items():
                A, Bt, scaling = stacks[k].rows(storage, slot)                   # (r, in), (r, out)
                for rows in segments if len(A) else ():
                    ys[k][rows].addmm_((x[rows] @ A.T).to(ys[k].dtype), Bt.to(ys[k].dtype), alpha=scaling)
        return ys

    # -- generation ----------------------------------------------------------------------------------------

    def _check_requests(self, input_ids, adapter_names, max_new_tokens) -> list[_Request]:
        check_int("max_new_tokens", max_new_tokens, low=1)
        if not isinstance(input_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in input_ids):
            raise ValueError("input_ids must be a list of prompts, each a list of token ids")
        if not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != len(input_ids):
            raise ValueError(f"adapter_names must be a list with one name (or None) per prompt: {len(input_ids)} "
                             f"prompts, got {adapter_names!r}")
        vocab = self.model.config.vocab_size
        requests = []
        for i, (prompt, name) in enumerate(zip(input_ids, adapter_names)):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                     for t in prompt):
                raise ValueError(f"input_ids[{i}] must be a non-empty list of token ids in [0, {vocab})")
            if len(prompt) + max_new_tokens > self.context:
                raise ValueError(f"input_ids[{i}]: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} "
                                 f"exceed the model's context of {self.context} tokens")
            if name is not None:
                if name not in self.store:
                    known = ", ".join(map(repr, sorted(self.store.adapters))) or "none"
                    raise ValueError(f"adapter_names[{i}]: unknown adapter {name!r} (added: {known}); never "
                                     f"the base model silently -- pass None for the base")
            need = self.kv_pages(len(prompt), max_new_tokens)
            need += 0 if name is None else self.cache.pages_of(name)
            if need > self.pool.n_pages:
                raise ValueError(f"input_ids[{i}] needs {need:,} pool pages for its keys and values (and adapter), "
                                 f"more than the pool's {self.pool.n_pages:,}: raise pool_pages or shorten it")
            requests.append(_Request(i, list(prompt), name, max_new_tokens))
        return requests

    def kv_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        """Pool pages the keys and values of one request take at most: every token of its prompt and output, in
        every layer, ⌈2 · kv_dim / H⌉ pages each."""
        return (prompt_len + max_new_tokens) * len(self.layers) * self.pages_per_token

    def generate(self, input_ids: list[list[int]], adapter_names: list[str | None], max_new_tokens: int
                 ) -> list[list[int]]:
        """Greedy: the new tokens of every request (in order), each as if it ran alone with its own adapter.

        Afterwards ``stats``: seconds, steps, tokens, tokens_per_s, and per request (in order) ``time_to_first_token``
        (seconds from the call, when every request arrives, to its first new token) and ``queued`` (seconds it
        waited for room in the batch and the pool)."""
        waiting = self._check_requests(input_ids, adapter_names, max_new_tokens)
        all_requests = list(waiting)
        running: list[_Request] = []
        start, steps, tokens = time.perf_counter(), 0, 0
        try:
            while waiting or running:
                while waiting and len(running) < self.max_batch and self._fits(running, waiting[0]):
                    waiting[0].admitted = time.perf_counter() - start
                    running.append(waiting.pop(0))
                for r, token in zip(running, self._step(running)):
                    r.out.append(token)
                    if r.first_token is None:
                        r.first_token = time.perf_counter() - start
                tokens, steps = tokens + len(running), steps + 1
                for r in [r for r in running if len(r.out) == r.max_new or r.out[-1] in self.eos]:
                    self.pool.release(r.owner)
                    running.remove(r)
        finally:                                   # a fault (or Ctrl-C) half-way: the pool keeps no request's pages
            for r in running:
                self.pool.release(r.owner)
        seconds = time.perf_counter() - start
        self.stats = dict(seconds=seconds, steps=steps, tokens=tokens, tokens_per_s=tokens / seconds,
                          time_to_first_token=[r.first_token for r in all_requests],
                          queued=[r.admitted for r in all_requests])
        return [r.out for r in all_requests]

    def _reserved(self, running: list[_Request]) -> int:
        """Pages the running requests' keys and values will still take (allocated as their tokens come)."""
        return sum(self.kv_pages(len(r.prompt), r.max_new) - r.cached * len(self.layers) * self.pages_per_token
                   for r in running)

    def _fits(self, running: list[_Request], request: _Request) -> bool:
        names = {r.adapter for r in running + [request] if r.adapter is not None}
        if self.cache.max_adapters is not None and len(names) > self.cache.max_adapters:
            return False
        need = (self._reserved(running + [request]) +
                sum(self.cache.pages_of(n) for n in names if n not in self.cache.resident))
        return need <= self.pool.free_pages + self.cache.evictable_pages(keep=names)

    @torch.no_grad()
    def _step(self, batch: list[_Request]) -> list[int]:
        """One forward over every running request's new tokens -> each request's next token (greedy)."""
        slots = self.cache.fetch([r.adapter for r in batch], keep_free=self._reserved(batch))
        self._refresh_stacks()
        new = [r.new_tokens() for r in batch]
        device = self.model.lm_head.weight.device
        ids = torch.tensor([t for n in new for t in n], device=device)                            # (N,)
        positions = torch.tensor([r.cached + j for r, n in zip(batch, new) for j in range(len(n))], device=device)
        idx = torch.tensor([slots[r.adapter] if r.adapter is not None else -1 for r, n in zip(batch, new) for _ in n],
                           dtype=torch.int64, device=device)
        lora = _StepLoRA(batch, new, idx, slots, prompts_paged=self.method == "paged") if slots else None
        ends = torch.tensor([len(n) for n in new]).cumsum(0) - 1
        per_token = len(self.layers) * self.pages_per_token
        grown = [self.pool.allocate(r.owner, len(n) * per_token).view(len(n), per_token) for r, n in zip(batch, new)]
        for r, g in zip(batch, grown):                    # the pages for the new tokens' keys and values
            r.pages = g if r.pages is None else torch.cat([r.pages, g])
        plan = _AttentionPlan(batch, new, torch.cat(grown), device)
        inner = self.model.model
        x = inner.embed_tokens(ids)                                                               # (N, H)
        cos, sin = inner.rotary_emb(x[None], positions[None])                                     # (1, N, d)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._linears(i, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), h, lora)
            q, k = _rope(q.view(-1, self.heads, self.head_dim), k.view(-1, self.kv_heads, self.head_dim), cos, sin)
            attn = self._attention(i, layer.self_attn.scaling, plan, q, k.reshape(-1, self.kv_dim), v)
            x = x + self._linears(i, ("self_attn.o_proj",), attn, lora)[0]
            h = layer.post_attention_layernorm(x)
            gate, up = self._linears(i, ("mlp.gate_proj", "mlp.up_proj"), h, lora)
            x = x + self._linears(i, ("mlp.down_proj",), layer.mlp.act_fn(gate) * up, lora)[0]
        last = inner.norm(x[ends.to(device)])                                                     # (requests, H)
        for r, n in zip(batch, new):
            r.cached += len(n)
        return self.model.lm_head(last).argmax(-1).tolist()

    def _pages_of_layer(self, pages: torch.Tensor, i: int) -> torch.Tensor:
        """(..., layers · pages_per_token) page ids -> layer i's, flattened in token order."""
        p = self.pages_per_token
        return pages[..., i * p:(i + 1) * p].reshape(-1)

    def _attention(self, i, scaling, plan, q, k, v) -> torch.Tensor:
        """Write the new keys and values (N, kv_dim each) into their pages; then the prompts attend causally to
        themselves, one request at a time, and the decoding rows all together, each to its own cached tokens
        (their pages gathered into one padded batch, the padding masked)."""
        width, kv = self.pages_per_token * self.hidden, self.kv_dim
        rows = F.pad(torch.cat([k, v], dim=1), (0, width - 2 * kv)).view(-1, self.hidden)     # (N · p, H)
        self.pool.storage.index_copy_(0, self._pages_of_layer(plan.new_pages, i), rows.to(self.pool.storage.dtype))
        out = q.new_empty(q.shape)                                                              # (N, heads, d)
        split = lambda t, heads: t.view(-1, heads, self.head_dim).transpose(0, 1)[None]        # (1, heads, n, d)
        for rows_of in plan.prefill:                       # a whole prompt: causal attention over itself
            out[rows_of] = F.scaled_dot_product_attention(
                split(q[rows_of], self.heads), split(k[rows_of], self.kv_heads), split(v[rows_of], self.kv_heads),
                scale=scaling, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        if plan.decode_rows is not None:                   # one new token each, over all its cached ones
            b, t = plan.decode_pages.shape[:2]
            cached = self.pool.storage.index_select(0, self._pages_of_layer(plan.decode_pages, i)).view(b, t, width)
            keys, values = (cached[..., s].view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                            for s in (slice(0, kv), slice(kv, 2 * kv)))                         # (b, kv_heads, t, d)
            qd = q[plan.decode_rows][:, :, None]                                                # (b, heads, 1, d)
            out[plan.decode_rows] = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=plan.decode_mask, scale=scaling, enable_gqa=True)[:, :, 0]
        return out.reshape(q.shape[0], -1)                                                      # (N, heads · d)


class _StepLoRA:
    """Which rows of a step take which adapter: idx (N,) (slot, -1: none); paged_idx, the rows BGMV serves (the
    decoding ones; with ``prompts_paged``, all), -1 elsewhere, None if none; prompts, {slot: [row slices]} of the
    prompts the rest serve; and the ``ragged_pairs`` of paged_idx, computed once per stack layout."""

    def __init__(self, batch, new, idx: torch.Tensor, slots: dict, prompts_paged: bool):
        self.idx, self.prompts, self._pairs, row = idx, {}, {}, 0
        paged = idx.clone()
        for r, n in zip(batch, new):
            if r.cached == 0 and r.adapter is not None and not prompts_paged:
                self.prompts.setdefault(slots[r.adapter], []).append(slice(row, row + len(n)))
                paged[row:row + len(n)] = -1
            row += len(n)
        self.paged_idx = paged if bool((paged >= 0).any()) else None

    def pairs(self, stack, dtype):
        if stack.layout not in self._pairs:
            self._pairs[stack.layout] = ragged_pairs(self.paged_idx, stack, dtype)
        return self._pairs[stack.layout]


class _AttentionPlan:
    """Which rows of a step are prompts and which decode, and the decoding requests' pages, padded."""

    def __init__(self, batch: list[_Request], new: list[list[int]], new_pages: torch.Tensor, device):
        self.new_pages = new_pages                                      # (N, layers · pages_per_token)
        self.prefill, decode, tables, row = [], [], [], 0
        for r, n in zip(batch, new):
            if r.cached == 0:
                self.prefill.append(slice(row, row + len(n)))
            else:
                decode.append(row)
                tables.append(r.pages)                                  # (cached + 1, layers · pages_per_token)
            row += len(n)
        self.decode_rows = torch.tensor(decode, device=device) if decode else None
        if decode:
            lengths = torch.tensor([len(t) for t in tables], device=device)
            self.decode_pages = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)   # pad: page 0, masked
            self.decode_mask = (torch.arange(self.decode_pages.shape[1], device=device)[None] < lengths[:, None]
                                )[:, None, None]                        # (b, 1, 1, t): True where a token is


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on (N, heads, d) rows at their own positions (cos, sin (1, N, d)), as transformers' Llama rotates."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q[0].transpose(0, 1), k[0].transpose(0, 1)
