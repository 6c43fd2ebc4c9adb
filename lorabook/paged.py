"""Paged optimizers (QLoRA, Dettmers et al. 2023, sec. 3, https://arxiv.org/abs/2305.14314): AdamW whose state
lives in fixed-size pages that move between the accelerator and host memory under a budget.

The seed: paged optimizers "prevent memory spikes due to gradient checkpointing that cause out-of-memory errors when
processing long sequences". QLoRA allocates the optimizer state in NVIDIA unified memory: when the GPU runs short
(one long batch makes the activations spike), the driver evicts state pages to CPU RAM and pages them back when the
optimizer update touches them. ``PagedAdamW`` does the same paging explicitly, so it can be watched and measured:

    state of parameter i (numel n)  ->  pages (i, 0), (i, 1), ...   page (i, k) = (2, E): m and v of elements
                                                                    [k·E, (k+1)·E), E = page_bytes // (2 · itemsize)
    PagePool: at most budget_bytes of pages on the device; the rest on the host (pinned on CUDA). Fetching a page
              that is on the host first evicts the least recently used pages (device -> host), then copies it in.

The update, per element at step t -- AdamW (Loshchilov & Hutter) in ``torch.optim.AdamW``'s order of operations,
so the result is bit-for-bit torch's (``foreach=False``), page by page:

    p ← p · (1 − lr·λ)          m ← m + (1 − β1)·(g − m)          v ← β2·v + (1 − β2)·g²
    p ← p − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

``state_dict()`` holds whole ``exp_avg`` / ``exp_avg_sq`` tensors in torch's layout: a checkpoint moves between
``PagedAdamW`` and ``torch.optim.AdamW`` both ways. On a machine without an accelerator host and device are the same
memory: the paging still runs (and is counted), but saves nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ._checks import check_adam_hyperparameters, check_int
from .adamw8bit import BLOCKSIZE, MIN_8BIT_SIZE, AdamW8bit, block_chunks, params_with_grad, run_closure


@dataclass
class PageStats:
    """What the pool moved: pages and bytes each way, and the most device bytes it ever held."""

    page_ins: int = 0
    page_outs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    peak_device_bytes: int = 0


class PagePool:
    """Pages (tensors) by key, at most ``budget_bytes`` of them on ``device``, the others on the host, LRU order."""

    def __init__(self, device: torch.device | str, budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes  # None: no limit, nothing is ever evicted
        self.on_device: OrderedDict[object, torch.Tensor] = OrderedDict()  # least recently used first
        self.on_host: dict[object, torch.Tensor] = {}
        self.device_bytes = 0
        self.stats = PageStats()

    @property
    def host_bytes(self) -> int:
        return sum(_nbytes(page) for page in self.on_host.values())

    def add(self, key, page: torch.Tensor) -> None:
        """Take in a new page (its values are copied): onto the device if it fits, else onto the host."""
        if key in self.on_device or key in self.on_host:
            raise KeyError(f"page {key!r} is already in the pool")
        self._check_fits(page)
        if self._fits(_nbytes(page)):
            self._place(key, page.to(self.device, copy=True).contiguous())
        else:
            self.on_host[key] = _to_host(page, self.device)

    def get(self, key) -> torch.Tensor:
        """The page, on the device (paged in if it was on the host); it becomes the most recently used."""
        if key in self.on_device:
            self.on_device.move_to_end(key)
            return self.on_device[key]
        if key not in self.on_host:
            raise KeyError(f"no page {key!r} in the pool")
        host = self.on_host.pop(key)
        size = _nbytes(host)
        while not self._fits(size):
            self._evict()
        self.stats.page_ins += 1
        self.stats.bytes_in += size
        return self._place(key, host.to(self.device, non_blocking=True))

    def page_out(self, keep_bytes: int = 0) -> None:
        """Evict least recently used pages until at most ``keep_bytes`` stay on the device -- what the driver does
        to unified memory when something else needs the room."""
        while self.on_device and self.device_bytes > keep_bytes:
            self._evict()

    def where(self, key) -> str:
        return "device" if key in self.on_device else "host"

    def peek(self, key) -> torch.Tensor:
        """The page where it is (device or host), moving nothing and changing no LRU order: for reading state out
        (``state_dict``) without paging it in."""
        page = self.on_device.get(key, self.on_host.get(key))
        if page is None:
            raise KeyError(f"no page {key!r} in the pool")
        return page

    def _fits(self, size: int) -> bool:
        return self.budget_bytes is None or self.device_bytes + size <= self.budget_bytes

    def _check_fits(self, page: torch.Tensor) -> None:
        if self.budget_bytes is not None and _nbytes(page) > self.budget_bytes:
            raise ValueError(f"a page of {_nbytes(page)} bytes does not fit budget_bytes={self.budget_bytes}")

    def _place(self, key, page: torch.Tensor) -> torch.Tensor:
        self.on_device[key] = page
        self.device_bytes += _nbytes(page)
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.device_bytes)
        return page

    def _evict(self) -> None:
        key, page = self.on_device.popitem(last=False)  # the least recently used
        self.device_bytes -= _nbytes(page)
        self.on_host[key] = _to_host(page, self.device)
        self.stats.page_outs += 1
        self.stats.bytes_out += _nbytes(page)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _to_host(page: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy; pinned when the device is CUDA, so the copy back can run asynchronously."""
    host = torch.empty(page.shape, dtype=page.dtype, pin_memory=device.type == "cuda")
    return host.copy_(page)


def page_elems(element_size: int, page_bytes: int) -> int:
    """Elements per page: a page holds m and v of E elements, 2 · E · element_size <= page_bytes (at least 1)."""
    return max(1, page_bytes // (2 * element_size))


def page_count(numel: int, element_size: int, page_bytes: int) -> int:
    """Pages the AdamW state of a parameter with ``numel`` elements takes: ceil(numel / E)."""
    return -(-numel // page_elems(element_size, page_bytes))


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float) -> None:
    """One AdamW step on matching slices, in place: torch.optim.AdamW's single-tensor update, op for op."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)  # m ← β1·m + (1 − β1)·g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β2·v + (1 − β2)·g²
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


class _Paged:
    """What a paged optimizer adds: one PagePool per device its parameters live on, paging out, and state bytes
    by where they are. A subclass sets ``budget_bytes`` and ``pools = {}``."""

    def _pool(self, param: torch.Tensor) -> PagePool:
        if param.device not in self.pools:
            self.pools[param.device] = PagePool(param.device, self.budget_bytes)
        return self.pools[param.device]

    def page_out(self, keep_bytes: int = 0) -> None:
        """Move optimizer state to the host until at most ``keep_bytes`` stay on each device: call it before a step
        whose activations spike (a long batch); the next ``step()`` pages back in what it touches."""
        check_int("keep_bytes", keep_bytes, low=0)
        for pool in self.pools.values():
            pool.page_out(keep_bytes)

    def state_bytes(self) -> dict[str, int]:
        """Optimizer-state bytes on the device and on the host, over all pools."""
        return {"device": sum(p.device_bytes for p in self.pools.values()),
                "host": sum(p.host_bytes for p in self.pools.values())}


class PagedAdamW(_Paged, torch.optim.Optimizer):
    """AdamW with its state (exp_avg, exp_avg_sq) in pages of ``page_bytes`` under ``budget_bytes`` of device memory.

    budget_bytes=None keeps every page on the device (plain AdamW, state in pages). Bit-exact with
    ``torch.optim.AdamW(..., foreach=False)`` for any page size and budget."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_bytes: int = 2 ** 20, budget_bytes: int | None = None):
        check_adam_hyperparameters(lr, betas, eps, weight_decay)
        check_int("page_bytes", page_bytes, low=64)
        if budget_bytes is not None:
            check_int("budget_bytes", budget_bytes, low=page_bytes)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.page_bytes = page_bytes
        self.budget_bytes = budget_bytes
        self.pools: dict[torch.device, PagePool] = {}  # one per device the parameters live on

    def _pages(self, param: torch.Tensor) -> list[tuple[int, int, int]]:
        """(key index, start, stop) for each page of ``param``'s state."""
        n, elems = param.numel(), page_elems(param.element_size(), self.page_bytes)
        return [(k, start, min(start + elems, n)) for k, start in enumerate(range(0, n, elems))]

    def _init_state(self, param: torch.Tensor, exp_avg=None, exp_avg_sq=None) -> None:
        """Pages for ``param``: zeros, or the given (whole) moments cut into pages."""
        pool = self._pool(param)
        zeros = torch.zeros(2, min(page_elems(param.element_size(), self.page_bytes), param.numel()),
                            dtype=param.dtype)
        for k, start, stop in self._pages(param):
            if exp_avg is None:
                page = zeros[:, :stop - start]
            else:
                page = torch.stack([exp_avg.reshape(-1)[start:stop], exp_avg_sq.reshape(-1)[start:stop]])
            pool.add((id(param), k), page.to(param.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group, param in params_with_grad(self, "PagedAdamW"):
            beta1, beta2 = group["betas"]
            if not param.is_contiguous():
                raise ValueError(f"parameters must be contiguous, got one of shape {tuple(param.shape)}")
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                self._init_state(param)
            state["step"] += 1
            step = state["step"].item()
            flat, grad = param.view(-1), param.grad.reshape(-1)  # (n,)
            pool = self._pool(param)
            for k, start, stop in self._pages(param):
                page = pool.get((id(param), k))  # (2, stop - start) on the device: m, v
                adamw_update(flat[start:stop], grad[start:stop], page[0], page[1], lr=group["lr"],
                             beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                             step=step)
        return loss

    def moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ``param``, gathered from its pages (wherever they are) into its shape."""
        if not self.state.get(param):
            raise ValueError(f"this parameter (shape {tuple(param.shape)}) has no optimizer state yet: step() first")
        pool = self._pool(param)
        pages = [pool.peek((id(param), k)) for k, _, _ in self._pages(param)]
        both = torch.cat([page.to(param.device) for page in pages], dim=1)  # (2, n)
        return both[0].view_as(param).clone(), both[1].view_as(param).clone()

    def state_dict(self):
        """torch.optim.AdamW's layout: per parameter ``step``, ``exp_avg``, ``exp_avg_sq`` (whole tensors)."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved["state"].items():
            entry["exp_avg"], entry["exp_avg_sq"] = self.moments(params[index])
        return saved

    def load_state_dict(self, state_dict) -> None:
        """Load a ``state_dict`` of this class or of ``torch.optim.AdamW``: the moments are cut into pages again.
        Everything is checked first: on an error the optimizer is unchanged."""
        params = [p for group in self.param_groups for p in group["params"]]
        for group in state_dict["param_groups"]:  # torch.optim.AdamW's options this class does not implement
            unsupported = [name for name in ("amsgrad", "maximize") if group.get(name)]
            if unsupported:
                raise ValueError(f"state_dict uses AdamW options PagedAdamW does not implement: {unsupported}")
        for index, entry in state_dict["state"].items():
            if entry.get("exp_avg") is None or entry.get("exp_avg_sq") is None:
                raise ValueError("state_dict must hold exp_avg and exp_avg_sq for every parameter with state")
            shape = params[index].shape if index < len(params) else None
            if entry["exp_avg"].shape != shape or entry["exp_avg_sq"].shape != shape:
                raise ValueError(f"state {index}: moments of shape {tuple(entry['exp_avg'].shape)} for a parameter "
                                 f"of shape {None if shape is None else tuple(shape)}")
        steps = {index: {"step": torch.as_tensor(entry["step"], dtype=torch.float32).clone()}  # not shared
                 for index, entry in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": steps})
        self.pools = {}
        for index, entry in state_dict["state"].items():
            self._init_state(params[index], entry["exp_avg"], entry["exp_avg_sq"])


def page_blocks(page_bytes: int) -> int:
    """Blocks of 256 elements per page of 8-bit state: a block takes 2 · 256 code bytes + 2 · 4 absmax bytes."""
    return max(1, page_bytes // (2 * BLOCKSIZE + 8))


class PagedAdamW8bit(_Paged, AdamW8bit):
    """AdamW8bit with its state in pages of whole blocks under ``budget_bytes`` of device memory -- bit-exact with
    ``AdamW8bit`` and ``bitsandbytes.optim.PagedAdamW8bit`` for any page size and budget (blocks are independent).

    page (i, k) of an 8-bit state, one uint8 buffer: [absmax1 (b,) fp32 | absmax2 (b,) fp32 | state1 (e,) | state2 (e,)]
    for elements [k·E, k·E + e) in b = ceil(e / 256) blocks, E = page_blocks(page_bytes) · 256. A tensor under
    min_8bit_size keeps fp32 m and v: its pages are (2, e) fp32, as in PagedAdamW."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, page_bytes: int = 2 ** 20,
                 budget_bytes: int | None = None):
        check_int("page_bytes", page_bytes, low=2 * BLOCKSIZE + 8)  # at least one block
        if budget_bytes is not None:
            check_int("budget_bytes", budget_bytes, low=page_bytes)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size,
                         chunk=page_blocks(page_bytes) * BLOCKSIZE)
        self.page_bytes = page_bytes
        self.budget_bytes = budget_bytes
        self.pools: dict[torch.device, PagePool] = {}

    def _ranges(self, param: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """(start, stop, first block, end block) of each page; an fp32 state pages like PagedAdamW's."""
        if self.is_8bit(param):
            return list(block_chunks(param.numel(), self.chunk))
        elems = page_elems(4, self.page_bytes)
        return [(start, min(start + elems, param.numel()), 0, 0) for start in range(0, param.numel(), elems)]

    @staticmethod
    def _views(page: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """The state tensors of a page of ``n`` elements, as views into it."""
        if page.dtype == torch.float32:
            return {"state1": page[0], "state2": page[1]}
        b = -(-n // BLOCKSIZE)
        return {"absmax1": page[:4 * b].view(torch.float32), "absmax2": page[4 * b:8 * b].view(torch.float32),
                "state1": page[8 * b:8 * b + n], "state2": page[8 * b + n:]}

    def _add_pages(self, param: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Pages for ``param``: zeros (a fresh state), or whole state tensors (a loaded one) cut into pages."""
        flat = {k: v.reshape(-1) for k, v in (tensors or {}).items()}
        pool = self._pool(param)
        for k, (start, stop, first, end) in enumerate(self._ranges(param)):
            if tensors is None and not self.is_8bit(param):  # zeros, page by page (a whole state may not fit)
                page = torch.zeros(2, stop - start)
            elif tensors is None:
                page = torch.zeros(8 * (end - first) + 2 * (stop - start), dtype=torch.uint8)
            elif not self.is_8bit(param):
                page = torch.stack([flat["state1"][start:stop], flat["state2"][start:stop]])  # (2, e) fp32
            else:
                page = torch.cat([flat["absmax1"][first:end].view(torch.uint8),
                                  flat["absmax2"][first:end].view(torch.uint8),
                                  flat["state1"][start:stop], flat["state2"][start:stop]])  # (8b + 2e,) uint8
            pool.add((id(param), k), page)

    def _init_state(self, param: torch.Tensor) -> None:
        self._add_pages(param)
        self.state[param]["step"] = 0

    def _parts(self, param: torch.Tensor):
        """(start, stop, state views) of each page of ``param``, paged in if it was on the host."""
        pool = self._pool(param)
        for k, (start, stop, _, _) in enumerate(self._ranges(param)):
            yield start, stop, self._views(pool.get((id(param), k)), stop - start)

    def state_tensors(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole state tensors of ``param``, gathered from its pages (wherever they are)."""
        pool = self._pool(param)
        parts = []
        for k, (start, stop, _, _) in enumerate(self._ranges(param)):
            page = pool.peek((id(param), k))
            parts.append(self._views(page.to(param.device), stop - start))
        whole = {key: torch.cat([part[key].reshape(-1) for part in parts]) for key in parts[0]}
        return {k: v.view(self._state_shape(param, k)) for k, v in whole.items()}

    def _set_state_tensors(self, param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        self._add_pages(param, tensors)

    def _forget_state(self) -> None:
        self.pools = {}
