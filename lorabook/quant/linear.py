"""LinearNF4: a linear layer whose frozen weight is stored in 4-bit NF4 (QLoRA, Dettmers et al. 2023, eq. 5,
https://arxiv.org/abs/2305.14314).

QLoRA's layer computes

    Y = X · doubleDequant(c1, c2, W_NF4) + X L1 L2        X (..., in), W (out, in), Y (..., out)

This module is the first term: the weight lives as ``lorabook.quant.nf4.QuantizedTensor`` (0.5 bytes per weight plus
≈ 0.127 bits of double-quantized constants) and every forward dequantizes it to ``compute_dtype`` and runs one
``F.linear`` (``compute_linear``: on the CPU a 16-bit one accumulates in fp32, as 16-bit matrix units do). The
backward dequantizes again instead of keeping the full-precision weight from the forward, which
would cost the memory that 4-bit storage saves. The weight and the bias are frozen; the trainable low-rank term
``X L1 L2`` is a ``lorabook.lora.LoRALinear`` wrapped around this layer (it has no exact merge into 4-bit codes:
``lorabook.qlora.merge_qlora`` merges it into dequant(W4)).

``quantize_model`` swaps every ``nn.Linear`` of a model except the output head for a ``LinearNF4``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_flag, check_module
from .double_quant import DoubleQuantState
from ..lora.layer import BaseLayer
from ..lora.model import output_head_name
from .codebooks import check_codebook
from .nf4 import FLOAT_DTYPES, QuantizedTensor, check_blocksize, dequantize_4bit, quantize_4bit

_FP32_BUFFERS = ("weight_absmax", "weight_absmax2", "weight_absmax_offset")


LINEAR_BACKENDS = ("auto", "native", "fp32-accumulate")


def compute_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:  # x (..., in), weight (out, in) -> (..., out)
    """``F.linear(x, weight, bias)`` in x's dtype (weight and bias in the same one), computed by ``backend``:

        "native"           torch's own GEMM in that dtype
        "fp32-accumulate"  the same 16-bit values multiplied in fp32 and the result rounded once to x's dtype:
                           what 16-bit matrix units do (each bf16 or fp16 product is exact in fp32, the sums are
                           fp32), in the fp32 BLAS's summation order
        "auto"             "native" on a GPU, for bf16 on a CPU with bf16 matrix instructions
                           (``cpu_has_bf16_matmul``) and for fp32 / fp64; else (fp16, or bf16 on other CPUs)
                           "fp32-accumulate"

    The two agree to within a few units in the last place of the 16-bit result (only the order of the fp32 sums
    differs; tests/test_linear_nf4.py). Why "auto" does not always take torch's own CPU bf16 GEMM: on a CPU
    without AVX512-BF16 or AMX it is a slow generic loop, on one with them it is the fast path
    (``python -m lorabook.bench qlora-step`` times both on a layer of SmolLM2's shape)."""
    backend = check_choice("backend", backend, LINEAR_BACKENDS)
    if backend == "auto":
        sixteen_bit_on_cpu = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        hardware_bf16 = x.dtype == torch.bfloat16 and cpu_has_bf16_matmul()
        backend = "fp32-accumulate" if sixteen_bit_on_cpu and not hardware_bf16 else "native"
    if backend == "native" or x.dtype not in (torch.bfloat16, torch.float16):  # fp32 / fp64: torch's GEMM as is
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware -- AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags
    (Linux; False where that cannot be read) -- so that torch's own CPU bf16 GEMM is fast here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _DequantizeLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = dequantize() on the fly; the backward calls it again (nothing (out, in) is saved)."""

    @staticmethod
    def forward(ctx, x, dequantize, bias):  # x (..., in) -> (..., out)
        ctx.dequantize = dequantize
        return compute_linear(x, dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (..., out) -> grad_x (..., in); W and b are frozen
        grad_x = compute_linear(grad_out, ctx.dequantize().t()) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def apply_keeping_dtypes(module: nn.Module, names: tuple[str, ...], apply) -> nn.Module:
    """``apply()`` (a module's ``nn.Module._apply``: ``.to``, ``.cuda``, ``.half`` ...) with the tensors ``names``
    of ``module`` following only the device, in their own dtype. A quantized layer's constants are stored in the
    dtype its format fixes; ``model.to(torch.bfloat16)`` must not recast them. Each stays a buffer or a frozen
    parameter, as it was (FSDP's ``quantized_storage_as_parameters`` makes them parameters)."""
    # detach(): a new tensor on the same storage, which _apply's in-place `param.data = fn(param)` cannot recast
    kept = {name: getattr(module, name).detach() for name in names if getattr(module, name, None) is not None}
    apply()
    for name, value in kept.items():
        moved = value.to(getattr(module, name).device)
        setattr(module, name, nn.Parameter(moved, requires_grad=False) if name in module._parameters else moved)
    return module


def dequantize_linear(x: torch.Tensor, dequantize, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``compute_linear(x, dequantize(), bias)`` for a frozen quantized weight: ``dequantize()`` returns W (out, in)
    in x's dtype, and the backward calls it again instead of keeping W from the forward (that would cost the
    memory the quantized storage saves). x (..., in) -> (..., out)."""
    return _DequantizeLinear.apply(x, dequantize, bias)


class LinearNF4(nn.Module):
    """A frozen 4-bit linear layer: ``F.linear(x, dequantize(W), bias)`` computed in ``compute_dtype``."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"weight must be a lorabook.quant.nf4.QuantizedTensor, got {type(weight).__name__}")
        weight.validate()
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        self.compute_dtype = compute_dtype
        self.weight_dtype, self.blocksize, self.codebook = weight.dtype, weight.blocksize, weight.codebook
        self.register_buffer("weight_packed", weight.packed)  # (out · in / 2,) uint8
        double = weight.double
        self.register_buffer("weight_absmax", weight.absmax)  # (n_blocks,) fp32, or None with double quant
        self.register_buffer("weight_absmax_codes", None if double is None else double.codes)  # (n_blocks,) uint8
        self.register_buffer("weight_absmax2", None if double is None else double.absmax2)  # (n_blocks / 256,)
        self.register_buffer("weight_absmax_offset", None if double is None else double.offset)  # ()
        self.blocksize2 = None if double is None else double.blocksize2
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, codebook: str = "nf4") -> "LinearNF4":
        """Quantize an ``nn.Linear``'s weight (compute dtype: the weight's own unless given)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_4bit(linear.weight.detach(), blocksize=blocksize, codebook=codebook, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype=compute_dtype)

    @property
    def quantized(self) -> QuantizedTensor:
        """The stored weight as a ``QuantizedTensor`` (the buffers themselves, no copy)."""
        double = None
        if self.weight_absmax_codes is not None:
            double = DoubleQuantState(codes=self.weight_absmax_codes, absmax2=self.weight_absmax2,
                                      offset=self.weight_absmax_offset, blocksize2=self.blocksize2)
        return QuantizedTensor(packed=self.weight_packed, absmax=self.weight_absmax,
                               shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                               blocksize=self.blocksize, codebook=self.codebook, double=double)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes and block constants (not the bias)."""
        tensors = (self.weight_packed, self.weight_absmax, self.weight_absmax_codes, self.weight_absmax2,
                   self.weight_absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def lora_base_layer(self) -> BaseLayer:
        """What LoRA needs to know (``lorabook.lora.base_layer``): fp32 adapters (as peft trains QLoRA's), and no
        merge -- W0 + ΔW has no exact NF4 form."""
        return BaseLayer(self.in_features, self.out_features, mergeable=False, adapter_dtype=torch.float32,
                         device=self.weight_packed.device,
                         not_mergeable_because="W0 + ΔW has no exact NF4 form and re-quantizing it would lose most "
                         "of ΔW; keep the adapter unmerged (QLoRA serves it that way) or merge it into dequant(W4) "
                         "with lorabook.qlora.merge_qlora")

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in ``compute_dtype``."""
        return dequantize_4bit(self.quantized, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out), in x's dtype
        # W is rounded from fp32 to compute_dtype once (bitsandbytes goes through the weight's own dtype first;
        # the two agree whenever compute_dtype is that dtype or the weight was fp32)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        q, dtype = self.quantized, self.compute_dtype
        return dequantize_linear(x.to(dtype), lambda: dequantize_4bit(q, dtype), bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts every floating-point buffer; the fp32 block constants must only follow the device.
        return apply_keeping_dtypes(self, _FP32_BUFFERS, lambda: super(LinearNF4, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        double = "" if self.weight_absmax_codes is None else ", double_quant"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.codebook}, blocksize={self.blocksize}{double}, compute_dtype={self.compute_dtype}")


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, codebook: str = "nf4",
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` except the output head (and names in ``skip``) by a ``LinearNF4``, in place.

    The output head stays full precision (it is often tied to the input embedding, as in SmolLM2). Other
    parameters (embeddings, norms) are left as they are. Returns the model. Every layer is quantized before any is
    swapped in: a bad weight anywhere (NaN, Inf) raises with the model unchanged."""
    check_module("model", model)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a tuple of module names, got {skip!r}")
    if isinstance(model, nn.Linear):
        raise TypeError("model is a single nn.Linear; use LinearNF4.from_linear(model)")
    check_blocksize(blocksize), check_codebook(codebook), check_flag("double_quant", double_quant)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be one of {FLOAT_DTYPES} or None, got {compute_dtype}")
    head = output_head_name(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head and n not in skip]
    quantized = {}  # every layer first (4-bit: an eighth of the fp32 weights more, for the moment), then the swap
    for name in names:
        try:
            quantized[name] = LinearNF4.from_linear(model.get_submodule(name), blocksize=blocksize,
                                                    double_quant=double_quant, compute_dtype=compute_dtype,
                                                    codebook=codebook)
        except (ValueError, TypeError) as e:  # the settings are checked above: this is the layer's weight
            raise type(e)(f"{name}.weight: {e}") from None
    for name, layer in quantized.items():
        model.set_submodule(name, layer)
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every ``LinearNF4`` in ``model`` computes in ``dtype`` from now on (in place; the 4-bit codes and constants
    are untouched): bitsandbytes' ``bnb_4bit_compute_dtype``, changed after loading. Returns the model."""
    check_module("model", model)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not layers:
        raise ValueError("model has no LinearNF4 layer: nothing computes in a compute dtype")
    for layer in layers:
        layer.compute_dtype = dtype
    return model

