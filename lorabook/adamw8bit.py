"""8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", https://arxiv.org/abs/2110.02861;
QLoRA's paged optimizers page this state): both moments kept in one byte each, block-wise, and updated in fp32 --
bit-exact with ``bitsandbytes.optim.AdamW8bit`` on CPU (the op order of its CPU backend).

    state of a parameter with n >= min_8bit_size (4096) elements:
        state1 (n,) uint8   codes of m in the signed dynamic map      absmax1 (ceil(n / 256),) fp32
        state2 (n,) uint8   codes of v in the unsigned dynamic map    absmax2 (ceil(n / 256),) fp32
        -> 2 bytes per parameter + 8 bytes per block of 256 (fp32 AdamW: 8 bytes per parameter)
    n < min_8bit_size: state1 = m, state2 = v in fp32 (a small tensor gains nothing from 8 bits)

The 8-bit update at step t: de-quantize m and v (``code[codes] · absmax`` of their block), then in fp32

    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p·(1 − lr·λ)               p ← p − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

and quantize m and v again (new absmax per block, nearest code). The 32-bit path (bitsandbytes' formula for small
tensors differs from torch's in where ε sits):

    update = m / (√v + ε·√(1 − β2^t))          p ← p·(1 − lr·λ) − lr·√(1 − β2^t) / (1 − β1^t) · update

The step counter is a Python int, as in bitsandbytes; ``state_dict()`` is bitsandbytes' layout (step, and state1,
state2, absmax1, absmax2, qmap1, qmap2 nested under "__bnb_optimizer_quant_state__", which FSDP's gathering skips),
so a checkpoint of either loads into the other.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_adam_hyperparameters, check_int
from .quant.double_quant import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit

__all__ = ["BLOCKSIZE", "MIN_8BIT_SIZE", "QUANT_STATE_KEY", "AdamW8bit", "adamw8bit_update", "adam32_update",
           "state8_bytes", "run_closure", "params_with_grad", "block_chunks"]

BLOCKSIZE = 256  # elements per absmax block of the 8-bit state (bitsandbytes' optimizers use 256)
MIN_8BIT_SIZE = 4096  # smaller parameters keep fp32 state (bitsandbytes' min_8bit_size)
STATE_KEYS_8BIT = ("state1", "state2", "absmax1", "absmax2")
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # bitsandbytes nests these tensors here (FSDP skips nested dicts)
CHUNK = 2 ** 16  # elements updated at a time: blocks are independent, so any multiple of 256 gives the same bits,
#                  and the fp32 scratch of one step stays SCRATCH_BYTES_PER_ELEMENT * CHUNK whatever the tensor size
SCRATCH_BYTES_PER_ELEMENT = 17  # measured (MemTracker): m, v, x / absmax, its int32 grid index (4 bytes each), + 1


def adamw8bit_update(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, step: int, maps: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One 8-bit AdamW step in place: de-quantize m and v, update in fp32, quantize them again.
    ``state`` holds state1/absmax1 (m, signed map ``maps[0]``) and state2/absmax2 (v, unsigned ``maps[1]``); the
    new codes and absmax are written into those tensors (they may be views into a larger state)."""
    m = dequantize_blockwise_8bit(state["state1"], state["absmax1"], maps[0], BLOCKSIZE)  # (n,) fp32
    v = dequantize_blockwise_8bit(state["state2"], state["absmax2"], maps[1], BLOCKSIZE)  # (n,) fp32
    g, p = grad.reshape(-1).float(), param.view(-1).float()  # (n,) fp32 (p is param itself when it is fp32)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(m, v.sqrt().div_(correction2).add_(eps), value=-lr / correction1)  # m / (√v / √(1 − β2^t) + ε)
    if p.data_ptr() != param.data_ptr():
        param.view(-1).copy_(p)  # back to the 16-bit parameter
    for i, x in ((1, m), (2, v)):
        codes, absmax = quantize_blockwise_8bit(x, maps[i - 1], BLOCKSIZE)
        state[f"state{i}"].copy_(codes)
        state[f"absmax{i}"].copy_(absmax)


def block_chunks(numel: int, chunk: int = CHUNK):
    """(start, stop, first block, end block) of consecutive slices of ``chunk`` elements (a multiple of 256):
    elements [start, stop) have their absmax in blocks [first block, end block)."""
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        yield start, stop, start // BLOCKSIZE, -(-stop // BLOCKSIZE)


def adam32_update(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: int) -> None:
    """bitsandbytes' 32-bit AdamW step (for tensors under min_8bit_size), in place on fp32 state1 = m, state2 = v."""
    m, v = state["state1"].view(-1), state["state2"].view(-1)  # (n,) fp32
    g, p = grad.reshape(-1).float(), param.reshape(-1).float()
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    step_size = -lr * correction2 / correction1
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(m / (v.sqrt() + eps * correction2), alpha=step_size)
    param.view(-1).copy_(p)


def state8_bytes(numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of AdamW8bit state for a parameter of ``numel`` elements: 2·n + 8·ceil(n / 256), or 8·n in fp32."""
    check_int("numel", numel, low=1)
    return 2 * (numel + 4 * math.ceil(numel / BLOCKSIZE)) if numel >= min_8bit_size else 8 * numel


def run_closure(closure):
    """An optimizer step's ``closure`` (re-evaluates the loss) run with gradients on; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(optimizer: torch.optim.Optimizer, name: str):
    """(group, param) for each parameter that has a gradient, in order; a sparse gradient is an error (these
    updates are dense)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            yield group, param


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with m and v in 8 bits (blocks of 256, bitsandbytes' dynamic maps); bit-exact with
    ``bitsandbytes.optim.AdamW8bit`` on CPU, including its 32-bit path for tensors under ``min_8bit_size``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, chunk: int = CHUNK):
        check_adam_hyperparameters(lr, betas, eps, weight_decay)
        check_int("min_8bit_size", min_8bit_size, low=1)
        check_int("chunk", chunk, low=BLOCKSIZE)
        if chunk % BLOCKSIZE:
            raise ValueError(f"chunk must be a multiple of {BLOCKSIZE} (whole blocks), got {chunk}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.chunk = chunk  # elements updated at a time (whole blocks): the same bits for any value
        self.maps = (dynamic_map(signed=True), dynamic_map(signed=False))  # m can be negative, v cannot
        self._device_maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def is_8bit(self, param: torch.Tensor) -> bool:
        return param.numel() >= self.min_8bit_size

    def _new_state(self, param: torch.Tensor) -> dict:
        n, dev = param.numel(), param.device
        if not self.is_8bit(param):
            return {"step": 0, "state1": torch.zeros(param.shape, dtype=torch.float32, device=dev),
                    "state2": torch.zeros(param.shape, dtype=torch.float32, device=dev)}
        blocks = math.ceil(n / BLOCKSIZE)
        return {"step": 0, "state1": torch.zeros(n, dtype=torch.uint8, device=dev),
                "state2": torch.zeros(n, dtype=torch.uint8, device=dev),
                "absmax1": torch.zeros(blocks, dtype=torch.float32, device=dev),
                "absmax2": torch.zeros(blocks, dtype=torch.float32, device=dev)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group, param in params_with_grad(self, type(self).__name__):
            if not param.is_contiguous():
                raise ValueError(f"parameters must be contiguous, got one of shape {tuple(param.shape)}")
            state = self.state[param]
            if not state:
                self._init_state(param)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                         step=state["step"])
            flat, grad = param.view(-1), param.grad.reshape(-1)  # (n,)
            for start, stop, part in self._parts(param):
                if self.is_8bit(param):
                    adamw8bit_update(flat[start:stop], grad[start:stop], part, maps=self._maps_on(param.device),
                                     **hyper)
                else:
                    adam32_update(flat[start:stop], grad[start:stop], part, **hyper)
        return loss

    def _state_shape(self, param: torch.Tensor, key: str) -> tuple[int, ...]:
        """The shape of state tensor ``key`` (state1, state2, absmax1, absmax2) of ``param``, as bitsandbytes'."""
        if not self.is_8bit(param):
            return tuple(param.shape)
        return (param.numel(),) if key.startswith("state") else (math.ceil(param.numel() / BLOCKSIZE),)

    def _init_state(self, param: torch.Tensor) -> None:
        """A zero state (step 0) for ``param``."""
        self.state[param].update(self._new_state(param))

    def _parts(self, param: torch.Tensor):
        """(start, stop, state views) covering ``param``: CHUNK elements at a time on the 8-bit path."""
        state = self.state[param]
        if not self.is_8bit(param):
            yield 0, param.numel(), state
            return
        for start, stop, first, end in block_chunks(param.numel(), self.chunk):
            yield start, stop, {"state1": state["state1"][start:stop], "absmax1": state["absmax1"][first:end],
                                "state2": state["state2"][start:stop], "absmax2": state["absmax2"][first:end]}

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two maps on ``device`` (copied there once)."""
        if device not in self._device_maps:
            self._device_maps[device] = tuple(c.to(device) for c in self.maps)
        return self._device_maps[device]

    def moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) of ``param`` in fp32 and its shape, de-quantized when they are stored in 8 bits."""
        if not self.state.get(param):
            raise ValueError(f"this parameter (shape {tuple(param.shape)}) has no optimizer state yet: step() first")
        state = self.state_tensors(param)
        if not self.is_8bit(param):
            return state["state1"].view_as(param).clone(), state["state2"].view_as(param).clone()
        maps = self._maps_on(param.device)
        m = dequantize_blockwise_8bit(state["state1"], state["absmax1"], maps[0], BLOCKSIZE)
        v = dequantize_blockwise_8bit(state["state2"], state["absmax2"], maps[1], BLOCKSIZE)
        return m.view_as(param), v.view_as(param)

    def state_tensors(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """state1, state2 (and absmax1, absmax2 of an 8-bit state) of ``param``, whole, in bitsandbytes' shapes."""
        return {k: v for k, v in self.state[param].items() if k in STATE_KEYS_8BIT}

    def _set_state_tensors(self, param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Take checked state tensors (copies, on the parameter's device) as ``param``'s state."""
        self.state[param].update(tensors)

    def state_bytes(self) -> int:
        """Bytes of every state tensor held (the step counters are Python ints)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def state_dict(self):
        """bitsandbytes' layout: per parameter ``step`` and, nested under QUANT_STATE_KEY, the state tensors (and
        the two maps of an 8-bit state)."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in list(saved["state"].items()):
            nested = dict(self.state_tensors(params[index]))
            if self.is_8bit(params[index]):
                nested.update(qmap1=self.maps[0].clone(), qmap2=self.maps[1].clone())
            saved["state"][index] = {"step": entry["step"], QUANT_STATE_KEY: nested}
        return saved

    def check_state_dict(self, state_dict) -> dict:
        """``state_dict`` (this class's or ``bitsandbytes.optim.AdamW8bit``'s) checked against this optimizer's
        parameters, with its state flat (per parameter ``step`` and the state tensors); raises ValueError naming what
        does not fit. Changes nothing."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state", {}), dict):
            raise ValueError(f"state_dict must be an optimizer state_dict (a dict with 'state' and 'param_groups'), "
                             f"got {type(state_dict).__name__}")
        params = [p for group in self.param_groups for p in group["params"]]
        flat = {index: {**{k: v for k, v in entry.items() if k != QUANT_STATE_KEY}, **entry.get(QUANT_STATE_KEY, {})}
                for index, entry in state_dict.get("state", {}).items()}  # nested (bitsandbytes') or flat
        for index, entry in flat.items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"state_dict has state for parameter {index!r}; this optimizer has {len(params)}")
            self._check_entry(index, entry, params[index])
        return {**state_dict, "state": flat}

    def load_state_dict(self, state_dict) -> None:
        """Load a ``state_dict`` of this class or of ``bitsandbytes.optim.AdamW8bit`` (its qmap1 / qmap2 must be
        the dynamic maps used here). Everything is checked first (``check_state_dict``): on an error the optimizer
        is unchanged."""
        params = [p for group in self.param_groups for p in group["params"]]
        state_dict = self.check_state_dict(state_dict)
        # torch's Optimizer.load_state_dict would cast every state tensor to the parameter's dtype (the uint8 codes
        # too): it loads the groups only, and the state is set here, copied onto each parameter's device
        super().load_state_dict({**state_dict, "state": {}})
        self._forget_state()
        for index, entry in state_dict.get("state", {}).items():
            param = params[index]
            self.state[param] = {"step": int(float(entry["step"]))}
            self._set_state_tensors(param, {k: entry[k].detach().to(param.device).clone().view(
                self._state_shape(param, k)) for k in STATE_KEYS_8BIT if k in entry})

    def _forget_state(self) -> None:
        """Drop what holds the state outside ``self.state`` (nothing here; the pages of a paged subclass)."""

    def _check_entry(self, index: int, entry: dict, param: torch.Tensor) -> None:
        where = f"state_dict state {index} (a parameter of shape {tuple(param.shape)})"
        want = self._new_state(param)
        keys = [k for k in want if k != "step"]
        missing = [k for k in ("step", *keys) if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}: this is not {'an 8-bit' if self.is_8bit(param) else 'a 32-bit'}"
                             f" AdamW8bit state (parameters of >= {self.min_8bit_size} elements keep 8-bit state)")
        step = entry["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float, torch.Tensor)) or float(step) < 0 \
                or float(step) != int(float(step)):
            raise ValueError(f"{where}: step must be a non-negative whole number, got {step!r}")
        for k in keys:
            t = entry[k]
            if not isinstance(t, torch.Tensor) or t.dtype != want[k].dtype or t.numel() != want[k].numel():
                got = f"{t.dtype}, {t.numel()} elements" if isinstance(t, torch.Tensor) else type(t).__name__
                per = "ceil(n / 256) blocks" if k.startswith("absmax") else "one per parameter element"
                raise ValueError(f"{where}: {k} must be {want[k].dtype} with {want[k].numel()} elements ({per}), "
                                 f"got {got}")
        for k, code in (("qmap1", self.maps[0]), ("qmap2", self.maps[1])):
            if k in entry and not torch.equal(entry[k].cpu().float(), code):
                raise ValueError(f"{where}: {k} is not the {'signed' if k == 'qmap1' else 'unsigned'} dynamic map "
                                 "AdamW8bit quantizes with")
