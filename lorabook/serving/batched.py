"""Many LoRA adapters in one batch: S-LoRA's batched LoRA (Sheng et al. 2023, https://arxiv.org/abs/2311.03285).

One base weight W0 serves every request; request i brings its own adapter a = idx[i] (rank r_a, scaling s_a):

    y[i] = W0 x[i] + s_a · B_a A_a x[i]             A_a (r_a, in), B_a (out, r_a); idx[i] = -1: W0 x[i] alone

The base part is one GEMM for the whole batch. The LoRA part differs per row, and this module computes it five ways,
proven equal in the tests:

    lora_delta_loop      row by row: the formula, for reading and for the tests
    lora_delta_segments  SGMV (punica): rows sorted by adapter, two matmuls per adapter present -- a Python loop
                         over the adapters in the batch, like peft's ``adapter_names`` mixed batch
    lora_delta_gather    BGMV (punica) without padding: each row's own rank rows of A and B gathered from one
                         stacked table, dotted with the row and summed back -- no loop, no padding to the largest rank
    lora_delta_dense     every row against every stacked rank, the other adapters' columns masked to zero: two GEMMs,
                         no loop, no padding, N × Σr work -- the fastest on a CPU for a few dozen rows (decode)
    lora_delta_padded    vLLM's layout: every adapter zero-padded to the largest rank, gathered per row, two bmm;
                         here only to measure what the padding costs

``lora_delta`` dispatches (``choose_method``): dense while rows × Σr is small (decode), segments when the batch has
many rows per adapter (prefill), gather otherwise (many distinct adapters, a row or two each).

The adapters of one linear layer live in a ``LoRAStack``: A's rows and Bᵀ's rows of every adapter, one after another
(``A`` (R, in), ``Bt`` (R, out), R = Σ r_a), with each adapter's ``offsets`` and ``ranks`` and its ``scalings``.
An adapter that does not target this layer has rank 0 here. Shapes: x (N, in) rows (tokens), idx (N,) int64.

In a server the rows live in pages of the unified pool (``pool``): a ``PagedStack`` holds their page ids instead,
``PagedStack.gather`` copies them out into a ``LoRAStack``, and ``lora_delta_paged`` computes BGMV on the pages
themselves (the rows of A a batch uses gathered, Bᵀ's summed where they lie by ``embedding_bag``): a sixth way,
equal to the others in the tests, what the server runs for its decoding rows. A batch's ``Pairs`` (row, stack row)
depend only on the stack's layout: one set serves every layer with that layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import bad_choice, check_int

__all__ = ["LoRAStack", "stack_adapters", "PagedStack", "stack_pages", "Pairs", "ragged_pairs", "lora_delta_paged",
           "lora_delta", "choose_method", "lora_delta_loop", "lora_delta_segments", "lora_delta_gather",
           "lora_delta_dense", "lora_delta_padded", "pad_stack", "METHODS", "SEGMENT_ROWS", "SHRINK_BLOCK",
           "DENSE_WORK", "SHRINKS", "shrink_pages"]

METHODS = ("auto", "dense", "gather", "segments", "padded", "loop")
DENSE_WORK = 64 * 1024   # "auto": dense while rows × Σr is at most this (32 rows over ranks 4-64 of 32 adapters: 25k)
DENSE_BLOCK = 16         # dense: rows per block (each block multiplies only the ranks of its own adapters)
SHRINK_BLOCK = 8         # lora_delta_paged: rows per shrink GEMM (each block against its own rank rows only)
SEGMENT_ROWS = 8         # "auto": else segments with at least this many rows per adapter present, else gather


@dataclass(frozen=True)
class LoRAStack:
    """The adapters of one linear layer, stacked without padding: adapter a's rows are offsets[a] … + ranks[a]."""
    A: torch.Tensor          # (R, in)   the A matrices' rows, adapter after adapter
    Bt: torch.Tensor         # (R, out)  the B matrices' columns (Bᵀ's rows), in the same order
    offsets: torch.Tensor    # (n,) int64
    ranks: torch.Tensor      # (n,) int64, 0 where an adapter does not target this layer
    scalings: torch.Tensor   # (n,) the adapters' α / r (or α / √r), in A's dtype
    column_scales: torch.Tensor  # (n + 1, R): row a holds s_a on adapter a's rows of the stack, 0 elsewhere;
    #                              the last row is all zero, so index -1 (no adapter) picks it

    @property
    def n_adapters(self) -> int:
        return len(self.ranks)


def stack_adapters(adapters: list, in_features: int, out_features: int, dtype=torch.float32,
                   device=None) -> LoRAStack:
    """[(A (r, in), B (out, r), scaling) or None per adapter slot] -> ``LoRAStack`` (None: rank 0 in this layer)."""
    check_int("in_features", in_features, low=1)
    check_int("out_features", out_features, low=1)
    As, Bts, ranks, scalings = [], [], [], []
    for slot, adapter in enumerate(adapters):
        if adapter is None:
            ranks.append(0)
            scalings.append(0.0)
            continue
        A, B, scaling = adapter
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape != (out_features, r):
            raise ValueError(f"adapters[{slot}]: A must be (r, {in_features}) and B ({out_features}, r), got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        As.append(A.detach().to(dtype))
        Bts.append(B.detach().T.to(dtype))
        ranks.append(r)
        scalings.append(float(scaling))
    A = torch.cat(As) if As else torch.zeros(0, in_features, dtype=dtype)
    Bt = torch.cat(Bts) if Bts else torch.zeros(0, out_features, dtype=dtype)
    return LoRAStack(A.to(device), Bt.to(device), *_layout(ranks, scalings, dtype, device))


def _layout(ranks: list[int], scalings: list[float], dtype, device) -> tuple:
    """offsets, ranks, scalings and column_scales of a stack with these adapters' ranks, one after another."""
    ranks_t = torch.tensor(ranks, dtype=torch.int64)
    offsets = torch.cumsum(ranks_t, 0) - ranks_t
    scales = torch.zeros(len(ranks) + 1, sum(ranks), dtype=dtype)
    for a, (lo, r, s) in enumerate(zip(offsets.tolist(), ranks, scalings)):
        scales[a, lo:lo + r] = s
    return (offsets.to(device), ranks_t.to(device), torch.tensor(scalings, dtype=dtype, device=device),
            scales.to(device))


@dataclass(frozen=True)
class PagedStack:
    """A ``LoRAStack`` whose rows live in pages of a pool (S-LoRA's unified pool): row j of A is the pages
    ``a_pages[j]`` one after another, cut to ``in_features``; Bᵀ's likewise. ``gather(storage)`` copies the rows
    out for the matmuls; ``rows(storage, slot)`` gives one adapter's, read in place when its pages are one run."""
    a_pages: torch.Tensor    # (R, ⌈in / H⌉) int64 page ids
    b_pages: torch.Tensor    # (R, ⌈out / H⌉)
    in_features: int
    out_features: int
    offsets: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    column_scales: torch.Tensor
    layout: tuple = ()       # ((offset, rank, scaling) per slot): stacks with equal layouts have equal pairs
    runs: tuple = ()         # per slot: (first page of A's rows, of Bᵀ's rows) if each is one run of pages, else None

    def gather(self, storage: torch.Tensor) -> LoRAStack:
        """storage (n_pages, H) -> the ``LoRAStack`` these pages hold (A (R, in), Bt (R, out))."""
        return LoRAStack(_read(storage, self.a_pages, self.in_features), _read(storage, self.b_pages,
                         self.out_features), self.offsets, self.ranks, self.scalings.to(storage.dtype),
                         self.column_scales.to(storage.dtype))

    def rows(self, storage: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Adapter ``slot``'s A (r, in), Bᵀ (r, out) and scaling: views of the pages when they are one run each
        (no copy: how a fresh adapter is laid out, ``DeviceCache``), else gathered."""
        lo, r, scaling = self.layout[slot]
        pages = self.a_pages[lo:lo + r], self.b_pages[lo:lo + r]                  # (r, ⌈in / H⌉), (r, ⌈out / H⌉)
        if self.runs[slot] is None:
            return _read(storage, pages[0], self.in_features), _read(storage, pages[1], self.out_features), scaling
        A, Bt = (storage[first:first + p.numel()].view(r, -1) for first, p in zip(self.runs[slot], pages))
        return A[:, :self.in_features], Bt[:, :self.out_features], scaling   # (r, ⌈in / H⌉ · H) cut to in


def _read(storage: torch.Tensor, pages: torch.Tensor, width: int) -> torch.Tensor:
    """The rows these pages hold, (rows, ⌈width / H⌉) page ids -> (rows, width), copied out."""
    rows, per_row = pages.shape
    return storage.index_select(0, pages.reshape(-1)).view(rows, per_row * storage.shape[1])[:, :width]


def stack_pages(adapters: list, in_features: int, out_features: int, page_size: int, device=None) -> PagedStack:
    """[(a_pages (r, ⌈in/H⌉), b_pages (r, ⌈out/H⌉), scaling) or None per adapter slot] -> ``PagedStack``."""
    check_int("page_size", page_size, low=1)
    shapes = (-(-in_features // page_size), -(-out_features // page_size))
    a_pages, b_pages, ranks, scalings, runs = [], [], [], [], []
    for slot, adapter in enumerate(adapters):
        a, b, scaling = adapter if adapter is not None else (None, None, 0.0)
        if a is not None and (a.dim() != 2 or a.shape[1] != shapes[0] or b.shape != (a.shape[0], shapes[1])):
            raise ValueError(f"adapters[{slot}]: a_pages must be (r, {shapes[0]}) and b_pages (r, {shapes[1]}) "
                             f"for {in_features} -> {out_features} in pages of {page_size}, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        a_pages += [] if a is None else [a]
        b_pages += [] if b is None else [b]
        ranks.append(0 if a is None else a.shape[0])
        scalings.append(float(scaling))
        firsts = [] if a is None else [_run(p) for p in (a, b)]
        runs.append(tuple(firsts) if firsts and None not in firsts else None)
    empty = torch.zeros(0, shapes[0], dtype=torch.int64), torch.zeros(0, shapes[1], dtype=torch.int64)
    a = torch.cat(a_pages) if a_pages else empty[0]
    b = torch.cat(b_pages) if b_pages else empty[1]
    offsets = (torch.cumsum(torch.tensor(ranks, dtype=torch.int64), 0) - torch.tensor(ranks)).tolist()
    return PagedStack(a.to(device), b.to(device), in_features, out_features,
                      *_layout(ranks, scalings, torch.float64, device),   # cast to the pool's dtype at use
                      layout=tuple(zip(offsets, ranks, scalings)), runs=tuple(runs))


def _run(pages: torch.Tensor) -> int | None:
    """The first page id if these pages, row after row, are consecutive ids, else None."""
    flat = pages.reshape(-1)
    if len(flat) == 0 or not torch.equal(flat, flat[0] + torch.arange(len(flat), device=flat.device)):
        return None
    return int(flat[0])


def _check(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack) -> None:
    if x.dim() != 2 or x.shape[1] != stack.A.shape[1]:
        raise ValueError(f"x must be (rows, in_features={stack.A.shape[1]}), got {tuple(x.shape)}")
    if idx.shape != (x.shape[0],) or idx.dtype != torch.int64:
        raise ValueError(f"idx must be an int64 tensor of shape ({x.shape[0]},) (one adapter slot per row), got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < -1 or int(idx.max()) >= stack.n_adapters):
        raise ValueError(f"idx must hold adapter slots 0 … {stack.n_adapters - 1} or -1 (no adapter), got "
                         f"{int(idx.min())} … {int(idx.max())}")


def lora_delta_loop(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack) -> torch.Tensor:
    """s_a · B_a A_a x[i] for every row i, one row at a time: (N, in) -> (N, out)."""
    _check(x, idx, stack)
    out = x.new_zeros(x.shape[0], stack.Bt.shape[1], dtype=stack.A.dtype)
    for i, a in enumerate(idx.tolist()):
        if a < 0:
            continue
        rows = slice(int(stack.offsets[a]), int(stack.offsets[a] + stack.ranks[a]))
        out[i] = stack.scalings[a] * ((stack.A[rows] @ x[i].to(stack.A.dtype)) @ stack.Bt[rows])  # (r,) @ (r, out)
    return out


def lora_delta_segments(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack) -> torch.Tensor:
    """SGMV: the rows of each adapter present together, two matmuls per adapter: (N, in) -> (N, out)."""
    _check(x, idx, stack)
    out = x.new_zeros(x.shape[0], stack.Bt.shape[1], dtype=stack.A.dtype)
    order = torch.argsort(idx, stable=True)                        # rows sorted by adapter slot
    slots, counts = torch.unique_consecutive(idx[order], return_counts=True)
    start = 0
    for a, count in zip(slots.tolist(), counts.tolist()):
        rows = order[start:start + count]
        start += count
        if a < 0 or stack.ranks[a] == 0:
            continue
        lo, r = int(stack.offsets[a]), int(stack.ranks[a])
        h = x[rows].to(stack.A.dtype) @ stack.A[lo:lo + r].T      # (rows, r)
        out.index_add_(0, rows, h @ stack.Bt[lo:lo + r], alpha=float(stack.scalings[a]))
    return out


@dataclass(frozen=True)
class Pairs:
    """The M = Σ_i r_idx[i] (row, stack row) pairs of a batch, no padding: what BGMV's shrink and expand run over.
    They depend only on idx and the stack's layout (offsets, ranks, scalings): one set serves every layer whose
    stack has the same layout (a server computes them once per step, ``Server``)."""
    rows: torch.Tensor        # (M,) the batch row of each pair (a row's pairs are consecutive)
    table_rows: torch.Tensor  # (M,) the stack row (of A and Bᵀ) of each pair
    starts: torch.Tensor      # (N,) each batch row's first pair
    weights: torch.Tensor     # (M,) the scaling s of each pair's adapter


def ragged_pairs(idx: torch.Tensor, stack, dtype=None) -> Pairs:
    """``Pairs`` of rows idx (N,) on a ``LoRAStack`` or ``PagedStack``: row i's r_idx[i] rank rows, in order
    (weights in ``dtype``, else the stack's scalings' dtype)."""
    r = torch.where(idx >= 0, stack.ranks[idx.clamp(min=0)], 0)                           # (N,) each row's rank
    starts = torch.cumsum(r, 0) - r
    rows = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), r)           # (M,)
    first = torch.repeat_interleave(stack.offsets[idx.clamp(min=0)] - starts, r)
    return Pairs(rows, first + torch.arange(len(rows), device=idx.device), starts,
                 stack.scalings[idx[rows]].to(dtype or stack.scalings.dtype))


def lora_delta_gather(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack) -> torch.Tensor:
    """BGMV without padding: u_j = s · A[row j] · x[i_j] for each of the M rank rows, then y[i] += Σ_j u_j Bt[row j]."""
    _check(x, idx, stack)
    pairs = ragged_pairs(idx, stack)
    rows, table_rows = pairs.rows, pairs.table_rows
    u = (x.to(stack.A.dtype)[rows] * stack.A[table_rows]).sum(-1) * pairs.weights   # (M,) = (M, in) · (M, in)
    out = x.new_zeros(x.shape[0], stack.Bt.shape[1], dtype=stack.A.dtype)
    return out.index_add_(0, rows, u[:, None] * stack.Bt[table_rows])   # (N, out) += (M, 1) · (M, out)


def lora_delta_dense(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack, block_rows: int | None = DENSE_BLOCK
                     ) -> torch.Tensor:
    """((x Aᵀ) ⊙ S) Bt: rows against stacked ranks, S = each row's scaling on its own adapter's ranks and zero
    elsewhere (``column_scales[idx]``): two GEMMs. With ``block_rows``, the rows sorted by adapter go in blocks, each
    against only the ranks of the adapters in it (they are consecutive in the stack): less work wasted on zeros."""
    _check(x, idx, stack)
    x = x.to(stack.A.dtype)
    if block_rows is None or len(idx) <= block_rows:
        return ((x @ stack.A.T) * stack.column_scales[idx]) @ stack.Bt                   # (N, R) @ (R, out)
    out = x.new_zeros(x.shape[0], stack.Bt.shape[1])
    order = torch.argsort(idx, stable=True)                                             # rows by adapter slot
    slots = idx[order]
    bounds = torch.stack([stack.offsets[slots.clamp(min=0)], stack.offsets[slots.clamp(min=0)] +
                          stack.ranks[slots.clamp(min=0)]]).tolist()
    for b in range(0, len(idx), block_rows):
        a = slots[b:b + block_rows]
        first = int((a < 0).sum())                                                      # -1 rows sort first
        if first == len(a):
            continue
        lo, hi = bounds[0][b + first], bounds[1][b + len(a) - 1]                         # the block's stack rows
        h = (x[order[b:b + block_rows]] @ stack.A[lo:hi].T) * stack.column_scales[a, lo:hi]
        out[order[b:b + block_rows]] = h @ stack.Bt[lo:hi]
    return out


def pad_stack(stack: LoRAStack) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's layout: (n, r_max, in) and (n, r_max, out), every adapter zero-padded to the largest rank."""
    n, r_max = stack.n_adapters, int(stack.ranks.max()) if stack.n_adapters else 0
    A = stack.A.new_zeros(n, r_max, stack.A.shape[1])
    Bt = stack.Bt.new_zeros(n, r_max, stack.Bt.shape[1])
    for a in range(n):
        lo, r = int(stack.offsets[a]), int(stack.ranks[a])
        A[a, :r], Bt[a, :r] = stack.A[lo:lo + r], stack.Bt[lo:lo + r]
    return A, Bt


def lora_delta_padded(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack, padded=None) -> torch.Tensor:
    """Gather each row's padded A and Bt (``pad_stack``, or ``padded`` built once), two bmm: r_max work per row."""
    _check(x, idx, stack)
    A, Bt = padded if padded is not None else pad_stack(stack)
    out = x.new_zeros(x.shape[0], stack.Bt.shape[1], dtype=stack.A.dtype)
    rows = torch.nonzero(idx >= 0).flatten()
    if len(rows) == 0 or A.shape[1] == 0:
        return out
    a = idx[rows]
    h = torch.bmm(A[a], x[rows].to(A.dtype)[:, :, None])                 # (m, r_max, 1)
    y = torch.bmm(Bt[a].transpose(1, 2), h)[:, :, 0]                      # (m, out)
    return out.index_add_(0, rows, y * stack.scalings[a][:, None])


SHRINKS = ("gemm", "compiled")   # lora_delta_paged's shrink: gathered rows + GEMMs, or one compiled gather-dot


def shrink_pages(storage: torch.Tensor, a_pages: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                 in_features: int, weights: torch.Tensor) -> torch.Tensor:
    """u_j = s_j · A[row j] · x[rows[j]] for each of M pairs, A's row read from its pages (a_pages (M, ⌈in / H⌉)),
    s_j = weights[j]: (M,). The formula; ``torch.compile`` makes it one loop reading the pages in place."""
    A = storage[a_pages].flatten(1)[:, :in_features]                                      # (M, in)
    return (A * x[rows]).sum(-1) * weights


_COMPILED = {}


def _compiled_shrink():
    if "shrink" not in _COMPILED:                     # compiled once per process, on first use (seconds)
        _COMPILED["shrink"] = torch.compile(shrink_pages, dynamic=True)
    return _COMPILED["shrink"]


def lora_delta_paged(x: torch.Tensor, idx: torch.Tensor, stacks, storage: torch.Tensor, shrink: str = "gemm",
                     pairs: list | None = None):
    """BGMV straight from the pool's pages (punica's shrink and expand), nothing padded: (N, in) -> (N, out).

    Shrink, u_j = s · A[row j] · x[i_j] for the M = Σ_i r_idx[i] rank rows of the batch (``ragged_pairs``):
    "gemm" gathers those rows of A, (M, in), and multiplies ``SHRINK_BLOCK`` rows of x at a time against their own
    pairs; "compiled" runs ``shrink_pages`` compiled, which reads A's pages where they lie (equal, proven in the
    tests; the first call compiles). Expand: ``embedding_bag`` sums each row's pages of Bᵀ where they lie,
    weighted by u: y[i] = Σ_j u_j Bᵀ[row j]. ``stacks`` may be a list of layers that read the same x (W_q, W_k,
    W_v): one shrink call for all of them, and a list of outputs. ``pairs``: each stack's ``ragged_pairs``
    (weights in the pool's dtype), when the caller has them already."""
    if shrink not in SHRINKS:
        raise bad_choice("shrink", shrink, SHRINKS)
    single = isinstance(stacks, PagedStack)
    stacks = [stacks] if single else list(stacks)
    if x.dim() != 2 or any(x.shape[1] != p.in_features for p in stacks):
        raise ValueError(f"x must be (rows, in_features={stacks[0].in_features}), got {tuple(x.shape)}")
    pairs = pairs or [ragged_pairs(idx, p, storage.dtype) for p in stacks]
    pages = torch.cat([p.a_pages[q.table_rows] for p, q in zip(stacks, pairs)])   # (ΣM, ⌈in / H⌉)
    x = x.to(storage.dtype)
    if shrink == "compiled":
        rows_all, weights_all = (torch.cat([getattr(q, f) for q in pairs]) for f in ("rows", "weights"))
        u_all = _compiled_shrink()(storage, pages, x, rows_all, x.shape[1], weights_all) if len(pages) else None
    else:
        per_row = pages.shape[1] * storage.shape[1]                            # ⌈in / H⌉ pages of H
        A = storage.index_select(0, pages.reshape(-1)).view(len(pages), per_row)[:, :x.shape[1]]   # (ΣM, in)
    outs, col = [], 0
    for p, q in zip(stacks, pairs):
        M = len(q.rows)
        if M == 0:                                                             # no row's adapter targets it
            outs.append(storage.new_zeros(x.shape[0], p.out_features))
            continue
        if shrink == "compiled":
            u = u_all[col:col + M]                                             # (M,) s · A x
        else:
            bounds = q.starts.tolist() + [M]
            u = x.new_empty(M)
            for lo in range(0, x.shape[0], SHRINK_BLOCK):  # a block of rows against its own pairs only
                hi = min(lo + SHRINK_BLOCK, x.shape[0])
                p0, p1 = bounds[lo], bounds[hi]
                if p1 > p0:
                    h = x[lo:hi] @ A[col + p0:col + p1].T                      # (rows, pairs)
                    u[p0:p1] = h[q.rows[p0:p1] - lo, torch.arange(p1 - p0, device=idx.device)]
            u = u * q.weights                                                  # (M,) s · A x
        col += M
        expand = [F.embedding_bag(p.b_pages[q.table_rows, c], storage, q.starts, mode="sum", per_sample_weights=u)
                  for c in range(p.b_pages.shape[1])]                          # (N, H) per page column
        outs.append((expand[0] if len(expand) == 1 else torch.cat(expand, dim=1))[:, :p.out_features])
    return outs[0] if single else outs


def choose_method(idx: torch.Tensor, stack: LoRAStack) -> str:
    """What ``lora_delta(method="auto")`` runs for these rows: "dense" while rows × Σr ≤ ``DENSE_WORK`` (a few
    dozen decoding rows: two GEMMs beat any loop), else "segments" with at least ``SEGMENT_ROWS`` rows per adapter
    present (prompts: GEMMs per adapter pay), else "gather" (many adapters, a row or two each)."""
    if len(idx) * stack.A.shape[0] <= DENSE_WORK:
        return "dense"
    present = int(torch.unique(idx[idx >= 0]).numel()) if len(idx) else 0
    return "segments" if present and len(idx) >= SEGMENT_ROWS * present else "gather"


def lora_delta(x: torch.Tensor, idx: torch.Tensor, stack: LoRAStack, method: str = "auto") -> torch.Tensor:
    """The LoRA part of a mixed batch, (N, in) -> (N, out); method in ``METHODS`` ("auto": ``choose_method``)."""
    if method not in METHODS:
        raise bad_choice("method", method, METHODS)
    if method == "auto":
        method = choose_method(idx, stack)
    return {"dense": lora_delta_dense, "gather": lora_delta_gather, "segments": lora_delta_segments,
            "padded": lora_delta_padded, "loop": lora_delta_loop}[method](x, idx, stack)
