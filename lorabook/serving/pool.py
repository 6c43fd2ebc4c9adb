"""S-LoRA's unified paged pool: adapter weights and the KV cache in pages of one size (Sheng et al. 2023, §4.1).

A server holds two kinds of memory that come and go: the KV cache of each running request (it grows by one token
per step and is freed when the request ends) and the weights of the adapters in use (loaded and evicted as requests
ask for them). Reserved as contiguous ranges, both fragment the memory: free bytes in holes too small for the next
request. S-LoRA cuts both into pages of H values (the hidden size): a rank-r adapter on one H × H linear is 2r
pages (r rows of A, r columns of B), one token's keys and values in one layer are one page (GQA: 2 · kv_dim ≤ H).
Any free page fits any need, so the only waste is the unused tail of a page.

    PagedPool            the pages: one (n_pages, page_size) tensor, a free list, pages owned by name
    ContiguousAllocator  the naive peer: first-fit ranges in one address space, to measure fragmentation against

Shapes: ``PagedPool.storage`` (n_pages, page_size); page ids are int64 tensors.
"""
from __future__ import annotations

import torch

from .._checks import check_int

__all__ = ["PagedPool", "PoolExhausted", "ContiguousAllocator"]


class PoolExhausted(RuntimeError):
    """Not enough free pages (or no hole large enough): nothing was allocated."""


class PagedPool:
    """``n_pages`` pages of ``page_size`` values; ``allocate(owner, n)`` takes n free pages (all or none)."""

    def __init__(self, n_pages: int, page_size: int, dtype=torch.float32, device=None):
        check_int("n_pages", n_pages, low=1)
        check_int("page_size", page_size, low=1)
        self.storage = torch.zeros(n_pages, page_size, dtype=dtype, device=device)   # (n_pages, page_size)
        self._free = list(range(n_pages - 1, -1, -1))                                # a stack: pop() -> lowest id
        self.owned: dict[str, list[int]] = {}
        self.peak_used = 0

    @property
    def n_pages(self) -> int:
        return self.storage.shape[0]

    @property
    def page_size(self) -> int:
        return self.storage.shape[1]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.n_pages - len(self._free)

    def allocate(self, owner: str, n: int) -> torch.Tensor:
        """n more pages for ``owner`` -> their ids (int64, (n,)); PoolExhausted, taking none, if fewer are free."""
        check_int("n", n, low=0)
        if n > len(self._free):
            raise PoolExhausted(f"pool exhausted: {owner!r} needs {n} pages, {len(self._free)} of {self.n_pages} "
                                f"are free")
        pages = [self._free.pop() for _ in range(n)]
        self.owned.setdefault(owner, []).extend(pages)
        self.peak_used = max(self.peak_used, self.used_pages)
        return torch.tensor(pages, dtype=torch.int64, device=self.storage.device)

    def release(self, owner: str) -> int:
        """Free every page of ``owner``; returns how many (0 for an owner with none)."""
        pages = self.owned.pop(owner, [])
        self._free.extend(sorted(pages, reverse=True))
        return len(pages)

    def pages(self, owner: str) -> torch.Tensor:
        """The page ids of ``owner``, in the order allocated."""
        return torch.tensor(self.owned.get(owner, []), dtype=torch.int64, device=self.storage.device)

    def write(self, pages: torch.Tensor, rows: torch.Tensor) -> None:
        """rows (len(pages), ≤ page_size) into those pages (a shorter row fills the start of its page)."""
        if rows.dim() != 2 or rows.shape[0] != len(pages) or rows.shape[1] > self.page_size:
            raise ValueError(f"rows must be ({len(pages)}, <= {self.page_size}), got {tuple(rows.shape)}")
        self.storage[pages, :rows.shape[1]] = rows.to(self.storage.dtype)


class ContiguousAllocator:
    """First-fit ranges in [0, capacity): each allocation one contiguous range, freed as a whole."""

    def __init__(self, capacity: int):
        self.capacity = check_int("capacity", capacity, low=1)
        self.ranges: dict[str, tuple[int, int]] = {}    # owner -> (start, size)
        self.peak_used = 0

    @property
    def used(self) -> int:
        return sum(size for _, size in self.ranges.values())

    def holes(self) -> list[int]:
        """The sizes of the free ranges, in address order."""
        edges, at, out = sorted(self.ranges.values()), 0, []
        for start, size in edges:
            if start > at:
                out.append(start - at)
            at = start + size
        return out + ([self.capacity - at] if at < self.capacity else [])

    def allocate(self, owner: str, size: int) -> int:
        """A range of ``size`` for ``owner`` (one per owner) -> its start; raises PoolExhausted if no hole fits."""
        check_int("size", size, low=1)
        if owner in self.ranges:
            raise ValueError(f"owner {owner!r} already holds a range; free it first")
        at = 0
        for start, length in sorted(self.ranges.values()):
            if start - at >= size:
                break
            at = start + length
        if at + size > self.capacity:
            raise PoolExhausted(f"no contiguous range of {size} for {owner!r}: {self.capacity - self.used} free "
                                f"in holes of at most {max(self.holes(), default=0)}")
        self.ranges[owner] = (at, size)
        self.peak_used = max(self.peak_used, self.used)
        return at

    def release(self, owner: str) -> int:
        """Free ``owner``'s range; returns its size (0 for an owner with none)."""
        return self.ranges.pop(owner, (0, 0))[1]
