"""Group-wise asymmetric INT-k quantization, the base of QA-LoRA (Xu et al. 2023, sec. 3.2,
https://arxiv.org/abs/2309.14717), the format of GPTQ / AWQ checkpoints.

Each row o of a weight W (out, in) is cut into groups of ``group_size`` consecutive input columns, and each group
g gets its own min-max grid of 2^k evenly spaced levels:

    scale[o, g] = (max − min) / (2^k − 1)       rounded up to fp16 (so the grid still reaches max)
    zero[o, g]  = −min / scale                  fp32, not rounded to an integer: the zero point is a real number
    q           = clamp(round(w / scale + zero), 0, 2^k − 1)          the integer code, k bits
    ŵ           = (q − zero) · scale                                    |w − ŵ| ≤ scale / 2

NF4 (``lorabook.quant.nf4``) is symmetric: ŵ = level[q] · absmax, with no offset. Here the zero point is an offset
per group, and that is what QA-LoRA needs: adding a constant c to every weight of a group only moves its zero point,
(q − zero) · scale + c = (q − (zero − c / scale)) · scale, so the codes and scales stay as they are
(``lorabook.qalora``). That is also why the zero point must stay a float: GPTQ stores it as a k-bit integer, which
cannot absorb c / scale.

Stored (``GroupQuantized``): the codes packed k bits each (``pack_codes``: 8 codes in k bytes, the first code in the
highest bits; for k = 4 the first code is a byte's high nibble, as in bitsandbytes), the scales in fp16, the zero
points in fp32. Shapes: qweight (out, in · k / 8) uint8, scales and zeros (out, in / group_size).
Bytes per weight: k / 8 + (2 + 4) / group_size; INT4 with groups of 64: 0.594, against fp16's 2.

``dequantize_groupwise_reference`` is the formula; ``dequantize_groupwise`` computes it bit for bit the same way with
``lorabook.quant.cpu_kernel`` for k = 4 on the CPU (a group's 16 outputs, then table reads) or with broadcasting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .._checks import check_choice, check_int, check_module
from ..lora.layer import BaseLayer
from ..lora.model import output_head_name
from . import cpu_kernel
from .linear import apply_keeping_dtypes, dequantize_linear

__all__ = ["BITS", "GroupQuantized", "quantize_groupwise", "dequantize_groupwise", "dequantize_groupwise_reference",
           "pack_codes", "unpack_codes", "check_bits", "check_group_size", "SCALE_DTYPE", "ZERO_DTYPE",
           "LinearGroupwise", "quantize_model_groupwise", "requantize_stats"]

BITS = (2, 3, 4, 8)
SCALE_DTYPE, ZERO_DTYPE = torch.float16, torch.float32
DEQUANTIZE_BACKENDS = ("auto", "reference", "torch", "c")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_bits(bits) -> int:
    """One of 2, 3, 4, 8."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}, got {bits!r}")
    return int(bits)


def check_group_size(group_size, in_features: int | None = None) -> int:
    """A power of two >= 8 (so a row's codes fill whole bytes at any k) that divides ``in_features``."""
    check_int("group_size", group_size, low=8)
    if group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 8, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}: every group must "
                         "be whole")
    return group_size


# ---- packing: 8 codes of k bits in k bytes ----------------------------------------------------------------------

def _shifts(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offsets of the 8 codes in a 8k-bit word (first code highest) and of its k bytes (first byte highest)."""
    codes = bits * torch.arange(7, -1, -1, device=device)  # (8,)
    bytes_ = 8 * torch.arange(bits - 1, -1, -1, device=device)  # (k,)
    return codes, bytes_


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes < 2^bits, n a multiple of 8 -> (..., n · bits / 8) uint8."""
    bits = check_bits(bits)
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"codes' last dimension must be a multiple of 8, got {n}")
    code_shift, byte_shift = _shifts(bits, codes.device)
    words = (codes.reshape(*lead, n // 8, 8).to(torch.int64) << code_shift).sum(-1)  # (..., n/8) 8k-bit words
    return ((words.unsqueeze(-1) >> byte_shift) & 255).to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., m) uint8 from ``pack_codes`` -> (..., 8m / bits) uint8 codes."""
    bits = check_bits(bits)
    *lead, m = packed.shape
    code_shift, byte_shift = _shifts(bits, packed.device)
    words = (packed.reshape(*lead, m // bits, bits).to(torch.int64) << byte_shift).sum(-1)  # (..., m/k)
    return ((words.unsqueeze(-1) >> code_shift) & (2 ** bits - 1)).to(torch.uint8).reshape(*lead, m * 8 // bits)


# ---- the stored weight --------------------------------------------------------------------------------------

@dataclass
class GroupQuantized:
    """A weight (out, in) in group-wise INT-k: packed codes, a scale and a zero point per group of input columns."""
    qweight: torch.Tensor  # (out, in · bits / 8) uint8, packed codes
    scales: torch.Tensor  # (out, in / group_size) fp16
    zeros: torch.Tensor  # (out, in / group_size) fp32
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits

    def codes(self) -> torch.Tensor:
        """The integer codes, (out, in) uint8."""
        return unpack_codes(self.qweight, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def validate(self) -> None:
        """Raise ValueError unless the fields fit together (they may be changed after construction)."""
        check_bits(self.bits)
        out, in_features = self.shape
        check_group_size(self.group_size, in_features)
        groups = (out, in_features // self.group_size)
        for name, tensor, dtype in (("qweight", self.qweight, torch.uint8), ("scales", self.scales, SCALE_DTYPE),
                                    ("zeros", self.zeros, ZERO_DTYPE)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != 2:
                raise ValueError(f"{name} must be a 2-D {dtype} tensor, got {getattr(tensor, 'dtype', tensor)!r}")
        for name, tensor in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(tensor.shape) != groups:
                raise ValueError(f"{name} must have shape {groups} (out, in / group_size) for group_size "
                                 f"{self.group_size}, got {tuple(tensor.shape)}")


def quantize_groupwise(weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> GroupQuantized:
    """Min-max asymmetric INT-``bits`` quantization of ``weight`` (out, in) in groups of ``group_size`` columns."""
    bits = check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor (out, in), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    out, in_features = weight.shape
    check_group_size(group_size, in_features)
    w = weight.detach().float().reshape(out, in_features // group_size, group_size)  # (out, G, L)
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or Inf values; they have no place on a grid")
    low, high = w.amin(-1), w.amax(-1)  # (out, G)
    levels = 2 ** bits - 1
    scale = ((high - low) / levels).to(SCALE_DTYPE)
    short = scale.float() * levels < high - low  # rounded down: step up to the next fp16 so the grid reaches max
    scale = torch.where(short, torch.nextafter(scale, torch.tensor(float("inf"), dtype=SCALE_DTYPE)), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: any scale is exact
    if not torch.isfinite(scale).all():
        raise ValueError(f"weight's groups span more than fp16 scales can hold ({levels} · 65504)")
    s = scale.float()
    zero = -low / s  # (out, G) fp32
    q = torch.round(w / s[..., None] + zero[..., None]).clamp(0, levels).to(torch.uint8)  # (out, G, L)
    return GroupQuantized(pack_codes(q.reshape(out, in_features), bits), scale, zero.to(ZERO_DTYPE), bits, group_size)


def dequantize_groupwise_reference(g: GroupQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = (q − zero) · scale, one value at a time as the formula reads: (out, in) in ``dtype``."""
    q = g.codes().float()  # (out, in)
    zero = g.zeros.float().repeat_interleave(g.group_size, dim=1)  # (out, in): each column's group's zero point
    scale = g.scales.float().repeat_interleave(g.group_size, dim=1)
    return ((q - zero) * scale).to(dtype)


def dequantize_groupwise(g: GroupQuantized, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """``dequantize_groupwise_reference``, bit for bit, computed by ``backend``:

        "reference"  the formula above
        "torch"      the codes viewed as (out, G, L) and the group's zero and scale broadcast (no (out, in) copies)
        "c"          ``cpu_kernel.dequantize_int4_into``: each group's 16 outputs, then two table reads per byte
                     (k = 4, CPU only)
        "auto"       "c" for k = 4 on the CPU where the kernel is available, else "torch"
    """
    check_choice("backend", backend, DEQUANTIZE_BACKENDS)
    if not isinstance(g, GroupQuantized):
        raise TypeError(f"g must be a GroupQuantized, got {type(g).__name__}")
    g.validate()
    check_choice("dtype", dtype, FLOAT_DTYPES)
    if backend == "reference":
        return dequantize_groupwise_reference(g, dtype)
    out, in_features = g.shape
    on_cpu = g.qweight.device.type == "cpu"
    if backend == "auto":
        backend = "c" if g.bits == 4 and on_cpu and cpu_kernel.available() else "torch"
    if backend == "c":
        if g.bits != 4:
            raise ValueError(f"backend 'c' decodes 4-bit codes only, got bits={g.bits}")
        result = cpu_kernel.empty_huge_pages(out * in_features, dtype)
        cpu_kernel.dequantize_int4_into(g.qweight.reshape(-1), g.scales.float().reshape(-1), g.zeros.reshape(-1),
                                        result, g.group_size)
        return result.view(out, in_features)
    if g.bits == 4:  # two codes a byte: the high nibble first
        q = torch.stack((g.qweight >> 4, g.qweight & 15), dim=-1)  # (out, in / 2, 2)
    else:
        q = g.codes()
    q = q.reshape(out, in_features // g.group_size, g.group_size).float()  # (out, G, L)
    return ((q - g.zeros.float()[..., None]) * g.scales.float()[..., None]).to(dtype).reshape(out, in_features)


# ---- the frozen layer ---------------------------------------------------------------------------------------

class LinearGroupwise(nn.Module):
    """A frozen linear layer whose weight is group-wise INT-k: ``F.linear(x, dequantize(W), bias)`` computed in
    ``compute_dtype``. This is what a merged QA-LoRA layer is (``lorabook.qalora``): the same codes and scales, the
    adapter folded into ``zeros``. Buffers ``qweight`` (out, in · k / 8) uint8, ``scales`` (out, G) fp16, ``zeros``
    (out, G) fp32; they keep their dtypes under ``model.to(dtype)``."""

    def __init__(self, weight: GroupQuantized, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(weight, GroupQuantized):
            raise TypeError(f"weight must be a GroupQuantized, got {type(weight).__name__}")
        weight.validate()
        check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
        self.out_features, self.in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        self.bits, self.group_size, self.compute_dtype = weight.bits, weight.group_size, compute_dtype
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64,
                    compute_dtype: torch.dtype = torch.float32) -> "LinearGroupwise":
        """Quantize an ``nn.Linear``'s weight group-wise (min-max, ``quantize_groupwise``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_groupwise(linear.weight, bits, group_size), linear.bias, compute_dtype)

    @property
    def quantized(self) -> GroupQuantized:
        """The stored weight (the buffers themselves, no copy)."""
        return GroupQuantized(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes, scales, zero points; not the bias)."""
        return self.quantized.nbytes

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in ``compute_dtype``."""
        return dequantize_groupwise(self.quantized, self.compute_dtype)

    def lora_base_layer(self) -> BaseLayer:
        """What plain LoRA needs to know: fp32 adapters, no merge (W + B A is not on any group's grid; QA-LoRA's
        pooled adapter is the one that merges, ``lorabook.qalora``)."""
        return BaseLayer(self.in_features, self.out_features, mergeable=False, adapter_dtype=torch.float32,
                         device=self.qweight.device, not_mergeable_because="W + B A has no exact group-wise INT-k "
                         "form; a QA-LoRA adapter (lorabook.qalora) is the one that merges into the zero points")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out), in x's dtype
        q, dtype = self.quantized, self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return dequantize_linear(x.to(dtype), lambda: dequantize_groupwise(q, dtype), bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts floating-point buffers; the fp16 scales and fp32 zeros only follow the device
        return apply_keeping_dtypes(self, ("scales", "zeros"), lambda: super(LinearGroupwise, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int{self.bits}, group_size={self.group_size}, compute_dtype={self.compute_dtype}")


def quantize_model_groupwise(model: nn.Module, bits: int = 4, group_size: int = 64,
                             compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Post-training quantization: replace every ``nn.Linear`` but the output head by a ``LinearGroupwise``
    (round to nearest on each group's min-max grid), in place; returns the model. Every layer is checked and
    quantized before any is swapped in, so an error leaves the model as it was."""
    check_module("model", model)
    check_bits(bits), check_group_size(group_size), check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
    head = output_head_name(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    if not names:
        raise ValueError("model has no nn.Linear layer (but the head) to quantize")
    layers = {}
    for name in names:
        try:
            layers[name] = LinearGroupwise.from_linear(model.get_submodule(name), bits, group_size, compute_dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return model


@torch.no_grad()
def requantize_stats(g: GroupQuantized, delta: torch.Tensor) -> dict:
    """What quantizing Ŵ + ΔW again -- a fresh min-max grid, the same bits and groups -- keeps of an update ΔW
    (out, in) to the stored weight Ŵ = dequantize(g); Q = dequantize(quantize(Ŵ + ΔW)):

        kept            <Q − Ŵ, ΔW> / ‖ΔW‖²: the share of ΔW the re-quantized weight carries (1 = all of it)
        error           ‖Q − (Ŵ + ΔW)‖ / ‖ΔW‖: what it misses, in units of ΔW
        codes_changed   share of the integer codes that differ from g's

    Min-max quantization is shift-equivariant: a ΔW that is constant over each group moves the group's min and
    max alike, so the grid follows it and it is kept (up to the fp16 scale's rounding). Any other ΔW smaller
    than half a step is mostly rounded away."""
    if not isinstance(g, GroupQuantized):
        raise TypeError(f"g must be a GroupQuantized, got {type(g).__name__}")
    g.validate()
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != g.shape:
        raise ValueError(f"delta must be a tensor of the weight's shape {g.shape}, got "
                         f"{getattr(delta, 'shape', type(delta).__name__)}")
    delta = delta.float()
    norm_sq = float(delta.pow(2).sum())
    if norm_sq == 0:
        raise ValueError("delta is zero: there is no update to keep")
    base = dequantize_groupwise_reference(g)
    q = quantize_groupwise(base + delta, g.bits, g.group_size)
    again = dequantize_groupwise_reference(q)
    return dict(kept=float(((again - base) * delta).sum()) / norm_sq,
                error=float((again - base - delta).norm()) / norm_sq ** 0.5,
                codes_changed=float((q.codes() != g.codes()).float().mean()))
