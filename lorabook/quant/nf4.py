"""4-bit NormalFloat (NF4) and blockwise absmax quantization (QLoRA, Dettmers et al. 2023, sec. 3,
https://arxiv.org/abs/2305.14314), bit-exact with bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit``.

The seed's int8 absmax quantization scales a tensor so its largest magnitude lands on 127:

    X_int8 = round(127 / absmax(X) · X)                        dequantize: X ≈ X_int8 · absmax / 127

Blockwise 4-bit quantization does this per block of ``blocksize`` consecutive weights (read flat, row-major), with
16 levels ``code[0..15]`` in [-1, 1] instead of integers, and rounds every scaled weight to its nearest level:

    w (out, in) -> blocks (n_blocks, blocksize) -> absmax (n_blocks,) fp32
    codes = nearest(w / absmax) (numel,) in 0..15   ->   packed (ceil(numel / 2),) uint8, first code in the high nibble
    dequantize: w ≈ code[codes] · absmax

NF4 chooses the 16 levels for weights that are normally distributed: the levels sit at quantiles of N(0, 1), so that
on N(0, 1) data before absmax scaling each level would be hit about equally often (``code_occupancy`` and
``entropy_bits`` measure how often it really is); they are normalised to [-1, 1] and zero is a level of its own.
With an exact zero and 16 codes the type is asymmetric: 8 positive levels, 7 negative ones. ``nf4_codebook``
derives them as bitsandbytes' ``create_normal_map`` does and equals its table to the last bit; ``qlora_eq4_levels``
is the paper's eq. 4 read literally, to compare; ``nf_codebook`` the same construction for k bits.
FP4 (bitsandbytes' 4-bit float) and plain symmetric INT4 are here to compare. ``round_to_levels`` applies the
blockwise recipe to any level set (e.g. NF4 with another offset).

Bit-exactness with bitsandbytes (CPU, fp32/fp16/bf16 input): the scaling is ``w · (1 / absmax)`` in fp32 (with
absmax clamped to 1e-38), except in a last, partial block, which is divided by its absmax -- and whose stored absmax
is the clamped one; a tie between two levels goes to the lower one; an odd count is padded with the code of 0.0.
Dequantization computes ``code · absmax`` in fp32 and rounds to the output dtype once.
Double quantization of the absmax lives in ``lorabook.quant.double_quant``; ``LinearNF4`` in ``lorabook.quant.linear``.

The readable path first, the fast path beside it: ``nearest_code_reference`` and ``dequantize_4bit_reference`` are
the formulas above in a few lines each; ``lorabook.quant.fast`` (lookup tables, PyTorch) and
``lorabook.quant.cpu_kernel`` (a compiled loop) compute the same, bit for bit, faster. ``nearest_code``,
``quantize_4bit`` and ``dequantize_4bit`` take ``backend=`` and default to the fastest one available.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_choice, check_int
from . import cpu_kernel, fast
from .codebooks import (check_codebook, codebook, codebook_table)
from .double_quant import DoubleQuantState, double_dequantize, double_quantize, dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NEAREST_BACKENDS = ("auto", "reference", "fast")  # nearest_code / quantize_4bit
DEQUANTIZE_BACKENDS = ("auto", "reference", "torch", "c")  # dequantize_4bit


def check_blocksize(blocksize) -> int:
    try:  # an int (not a bool, not 64.0), then one of the sizes
        return check_choice("blocksize", check_int("blocksize", blocksize), BLOCKSIZES)
    except ValueError:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, one of {BLOCKSIZES}; "
                         f"got {blocksize!r}") from None


# ---- the seed's int8 absmax formula -------------------------------------------------------------------------

def quantize_int8_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X_int8 = round(127 / absmax · X) for a whole tensor; returns (int8 codes shaped like x, fp32 absmax ())."""
    x = _check_weight(x, "x")
    absmax = x.abs().amax().float()  # ()
    _check_finite(absmax, x, "x")
    if absmax == 0:
        return torch.zeros(x.shape, dtype=torch.int8, device=x.device), absmax
    # x / absmax first: 127 / absmax overflows to inf for a subnormal absmax; x / absmax is always in [-1, 1]
    return torch.round(x.float() / absmax * 127.0).to(torch.int8), absmax


def dequantize_int8_absmax(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """X ≈ X_int8 · absmax / 127."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    return (q.float() * (absmax / 127.0)).to(dtype)


# ---- nearest level and packing ------------------------------------------------------------------------------

def nearest_code_reference(scaled: torch.Tensor, name: str = "nf4") -> torch.Tensor:
    """The code of the nearest level for every value of a flat fp32 tensor (already divided by its absmax).

    (n,) fp32 -> (n,) uint8. Sort the levels, find each value's place among the 15 midpoints between neighbours
    (a value on a midpoint goes to the lower level, as in bitsandbytes), and map the place back to its code."""
    _check_scaled(scaled)
    levels = codebook_table(check_codebook(name))  # (16,) in code order
    order = torch.argsort(levels)  # sorted position -> code (FP4's code order is not sorted)
    ordered = levels[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # (15,)
    place = torch.bucketize(scaled, midpoints.to(scaled.device))  # (n,) 0..15: midpoints[place - 1] < x <= ...
    return order.to(scaled.device, torch.uint8)[place]


def nearest_code(scaled: torch.Tensor, name: str = "nf4", backend: str = "auto") -> torch.Tensor:
    """``nearest_code_reference``, computed by ``backend``: "reference" (the binary search above), "fast" (two
    lookups in tables over the top 16 bits of each float, ``lorabook.quant.fast``), "auto" (= "fast").
    Both give the same code for every input but NaN (which ``quantize_4bit`` refuses)."""
    if check_choice("backend", backend, NEAREST_BACKENDS) == "reference":
        return nearest_code_reference(scaled, name)
    _check_scaled(scaled)
    return fast.nearest_code(scaled, codebook_table(check_codebook(name)))


def _check_scaled(scaled) -> None:
    if not isinstance(scaled, torch.Tensor) or scaled.dtype != torch.float32:
        raise TypeError(f"scaled must be a float32 tensor, got {getattr(scaled, 'dtype', type(scaled).__name__)}")


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15 -> (ceil(n / 2),) uint8: code 2i in the high nibble of byte i, code 2i+1 in the low one.

    An odd n is padded with code 0 (``quantize_4bit`` pads the values with 0.0 before coding instead)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return torch.add(codes[1::2], codes[0::2], alpha=16)  # high · 16 + low


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_4bit``: (ceil(n / 2),) uint8 -> (n,) uint8 codes."""
    return torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=-1).view(-1)[:n]


def round_to_levels(w: torch.Tensor, levels: torch.Tensor, blocksize: int = 64):
    """Blockwise absmax rounding to any sorted level set, to try level sets other than the named codebooks.

    w (numel a multiple of blocksize; fp32, fp16 or bf16), levels (L,) strictly increasing ->
    (codes (numel,) int64 indices into levels, w_hat shaped like w in w's dtype). The same arithmetic as
    ``quantize_4bit`` + ``dequantize_4bit``, so for NF4's or INT4's levels it gives the same values."""
    w, blocksize = _check_weight(w), check_blocksize(blocksize)
    if (not isinstance(levels, torch.Tensor) or levels.dim() != 1 or levels.numel() < 2
            or not torch.isfinite(levels).all() or not (levels.diff() > 0).all()):
        raise ValueError(f"levels must be a 1-D tensor of >= 2 finite, strictly increasing values, got {levels!r}")
    if w.numel() % blocksize:
        raise ValueError(f"w has {w.numel()} values, not a multiple of blocksize={blocksize}")
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    _check_finite(absmax, w)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))  # (n_blocks, blocksize) in [-1, 1]
    levels = levels.float().to(w.device)
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2)  # nearest level; a tie goes to the lower
    return codes.reshape(-1), (levels[codes] * absmax).to(w.dtype).reshape(w.shape)


def code_occupancy(codes, n_codes: int = 16) -> torch.Tensor:
    """How often each code is used: (n_codes,) float64 fractions summing to 1.

    codes: a ``QuantizedTensor`` (16 codes; its numel values, an odd count's padding code not counted) or an
    integer tensor of codes in 0 … n_codes - 1 (e.g. from ``round_to_levels``). A QuantizedTensor's bytes are
    counted without unpacking: 256 byte counts = 16 × 16 (high, low) nibble pairs; code c occurs row c + column c."""
    n_codes = check_int("n_codes", n_codes, 1)
    if isinstance(codes, QuantizedTensor):
        codes.validate()
        if n_codes != 16:
            raise ValueError(f"n_codes must be 16 for a QuantizedTensor (4-bit codes), got {n_codes}")
        pairs = torch.bincount(codes.packed, minlength=256).view(16, 16)  # [high, low]: count of each byte
        per_code = pairs.sum(dim=1) + pairs.sum(dim=0)  # (16,) as a high nibble + as a low nibble
        if codes.numel % 2:
            per_code[int(codes.packed[-1]) & 15] -= 1  # the padding code (a uint8 index would be a mask)
        return per_code.double() / codes.numel
    if (not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool
            or codes.numel() == 0):
        raise TypeError(f"codes must be a QuantizedTensor or a non-empty integer tensor, got {codes!r:.80}")
    codes = codes.reshape(-1).long()
    if codes.min() < 0 or codes.max() >= n_codes:
        raise ValueError(f"codes must lie in 0 … {n_codes - 1}, got {codes.min().item()} … {codes.max().item()}")
    return torch.bincount(codes, minlength=n_codes).double() / codes.numel()


def entropy_bits(p: torch.Tensor) -> float:
    """Shannon entropy H = -Σ p log2 p of an occupancy, in bits: log2(16) = 4.0 when all 16 codes are used
    equally often (the most a 4-bit code can carry), less when some are used more than others."""
    if not isinstance(p, torch.Tensor) or p.dim() != 1 or not p.is_floating_point() or p.numel() == 0:
        raise TypeError(f"p must be a non-empty 1-D float tensor, got {p!r:.80}")
    p = p.double()
    if not torch.isfinite(p).all() or (p < 0).any() or abs(p.sum().item() - 1) > 1e-6:
        raise ValueError(f"p must hold fractions >= 0 that sum to 1, got sum {p.sum().item()}")
    used = p[p > 0]
    return float(-(used * used.log2()).sum())


# ---- the quantized tensor -----------------------------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """A blockwise 4-bit tensor: packed codes, one absmax per block (or their double quantization), and what it
    takes to rebuild the original: ``shape``, ``dtype``, ``blocksize``, the ``codebook`` name."""

    packed: torch.Tensor  # (ceil(numel / 2),) uint8
    absmax: torch.Tensor | None  # (n_blocks,) fp32; None when double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    codebook: str = "nf4"
    double: DoubleQuantState | None = None  # the absmax quantized again (lorabook.quant.double_quant)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        self.validate()

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes plus the block constants."""
        constants = self.double.nbytes if self.double is not None else self.absmax.numel() * 4
        return self.packed.numel() + constants

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) fp32: the stored absmax, or its double-quantized form dequantized."""
        return self.absmax if self.double is None else double_dequantize(self.double)

    def validate(self) -> None:
        """Raise ValueError if the parts do not describe one tensor (e.g. a state from another weight)."""
        check_blocksize(self.blocksize)
        check_codebook(self.codebook)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        if self.numel == 0:
            raise ValueError(f"shape {tuple(self.shape)} is empty")
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            raise ValueError(f"packed must be a uint8 tensor, got {getattr(self.packed, 'dtype', self.packed)}")
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"packed holds {self.packed.numel()} bytes, but shape {tuple(self.shape)} needs "
                             f"{(self.numel + 1) // 2} (two codes per byte)")
        if (self.absmax is None) == (self.double is None):
            raise ValueError("give exactly one of absmax (fp32 per block) and double (its double quantization)")
        if self.double is not None:
            self.double.validate(self.n_blocks)
        elif self.absmax.dtype != torch.float32 or self.absmax.shape != (self.n_blocks,):
            raise ValueError(f"absmax must be float32 of shape ({self.n_blocks},) for {self.numel} values in "
                             f"blocks of {self.blocksize}, got {self.absmax.dtype} {tuple(self.absmax.shape)}")


def _check_weight(w, arg: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{arg} is empty (shape {tuple(w.shape)}): there is nothing to quantize")
    return w


def _check_finite(absmax: torch.Tensor, w: torch.Tensor, arg: str = "w") -> None:
    if not torch.isfinite(absmax).all():  # NaN and Inf both reach the absmax of their block
        bad = (~torch.isfinite(w.reshape(-1))).nonzero()[0].item()
        raise ValueError(f"{arg} contains NaN or Inf (first at flat index {bad}); 4-bit codes cannot represent it")


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, codebook: str = "nf4",
                  double_quant: bool = False, backend: str = "auto") -> QuantizedTensor:
    """Blockwise absmax 4-bit quantization of ``w`` (any shape; fp32, fp16 or bf16), read flat in blocks.

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type=codebook,
    compress_statistics=double_quant)`` for "nf4" and "fp4". backend: ``nearest_code``'s ("auto" = "fast")."""
    w = _check_weight(w)
    check_blocksize(blocksize)
    check_codebook(codebook)
    check_choice("backend", backend, NEAREST_BACKENDS)
    flat = w.reshape(-1)  # (n,)
    n = flat.numel()
    n_full = n // blocksize  # complete blocks
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)  # (n_blocks,)
    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=w.device)  # (n rounded up to even,) w / absmax
    if n_full:
        blocks = flat[:n_full * blocksize].view(n_full, blocksize)
        absmax[:n_full] = blocks.abs().amax(dim=1)
        _check_finite(absmax[:n_full], w)
        scale = 1.0 / absmax[:n_full].clamp(min=1e-38)  # (n_full,) an all-zero block gets codes of 0.0
        torch.mul(blocks, scale[:, None], out=scaled[:n_full * blocksize].view(n_full, blocksize))
    if n % blocksize:  # the last, partial block: divided, and stored with its clamped absmax
        tail = flat[n_full * blocksize:].float()
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        _check_finite(absmax[-1:], w)
        torch.div(tail, absmax[-1], out=scaled[n_full * blocksize:n])
    if n % 2:
        scaled[-1] = 0.0  # pad to whole bytes with the code of 0.0
    packed = pack_4bit(nearest_code(scaled, codebook, backend))  # (ceil(n / 2),)
    double = double_quantize(absmax) if double_quant else None
    return QuantizedTensor(packed=packed, absmax=None if double_quant else absmax, shape=w.shape, dtype=w.dtype,
                           blocksize=blocksize, codebook=codebook, double=double)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 backend: str = "auto") -> QuantizedTensor:
    """``quantize_4bit`` with the NF4 codebook."""
    return quantize_4bit(w, blocksize=blocksize, codebook="nf4", double_quant=double_quant, backend=backend)


def dequantize_4bit_reference(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w ≈ level[code] · absmax of its block, in fp32, rounded once to ``dtype`` (default: ``q``'s own dtype).

    packed (ceil(n / 2),) uint8 -> codes (n,) -> levels (n,) fp32 -> times absmax[i // blocksize] -> q.shape."""
    dtype = _check_dequantize(q, dtype)
    levels = codebook_table(q.codebook).to(q.packed.device)  # (16,)
    values = levels[unpack_4bit(q.packed, q.numel).long()]  # (n,) fp32: each code's level
    scale = q.block_absmax().repeat_interleave(q.blocksize)[:q.numel]  # (n,) each value's block absmax
    return (values * scale).to(dtype).view(q.shape)


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``dequantize_4bit_reference``, computed by ``backend``, bit for bit the same (and bitsandbytes'
    ``dequantize_4bit``):

        "reference"  the formula above, step by step (any device)
        "torch"      ``lorabook.quant.fast``: a table of level pairs, one multiply per block, in chunks (any device)
        "c"          ``lorabook.quant.cpu_kernel``: one compiled loop (CPU only)
        "auto"       "c" on the CPU where the kernel is available, else "torch"

    On the CPU "torch" and "c" write into ``cpu_kernel.empty_huge_pages``: a fresh tensor on 2 MB pages."""
    if check_choice("backend", backend, DEQUANTIZE_BACKENDS) == "reference":
        return dequantize_4bit_reference(q, dtype)
    dtype = _check_dequantize(q, dtype)
    on_cpu = q.packed.device.type == "cpu"
    if backend == "auto":
        backend = "c" if on_cpu and cpu_kernel.available() else "torch"
    out = cpu_kernel.empty_huge_pages(q.numel, dtype) if on_cpu else torch.empty(q.numel, dtype=dtype,
                                                                                 device=q.packed.device)
    kernel = cpu_kernel if backend == "c" else fast
    kernel.dequantize_into(q.packed, q.block_absmax().contiguous(), codebook_table(q.codebook), out, q.blocksize)
    return out.view(q.shape)


def _check_dequantize(q, dtype) -> torch.dtype:
    """The dtype to dequantize ``q`` to, once ``q`` is known to be a whole QuantizedTensor."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    q.validate()  # its fields may have been changed since it was made
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    return dtype


dequantize_nf4 = dequantize_4bit


# ---- bitsandbytes' packed data + QuantState, both ways ------------------------------------------------------

def to_bnb(q: QuantizedTensor):
    """``(packed (ceil(n/2), 1) uint8, bitsandbytes QuantState)`` for ``dequantize_4bit`` or ``Params4bit``."""
    from bitsandbytes.functional import QuantState

    q.validate()
    if q.codebook not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes has no 4-bit {q.codebook!r} type; only 'nf4' and 'fp4' convert")
    common = dict(shape=q.shape, code=codebook(q.codebook), blocksize=q.blocksize, quant_type=q.codebook,
                  dtype=q.dtype)
    if q.double is None:
        return q.packed.view(-1, 1), QuantState(absmax=q.absmax, **common)
    state2 = QuantState(absmax=q.double.absmax2, code=dynamic_map(), blocksize=q.double.blocksize2,
                        dtype=torch.float32)
    return q.packed.view(-1, 1), QuantState(absmax=q.double.codes, offset=q.double.offset, state2=state2, **common)


def from_bnb(packed: torch.Tensor, state) -> QuantizedTensor:
    """A ``QuantizedTensor`` holding the same bytes as bitsandbytes' ``(packed, QuantState)``."""
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"state.quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if state.code is not None and not torch.equal(state.code.cpu(), codebook_table(state.quant_type)):
        raise ValueError(f"state.code is not bitsandbytes' {state.quant_type} table")
    double = None
    if state.nested:
        if not torch.equal(state.state2.code.cpu(), dynamic_map()):
            raise ValueError("state.state2.code is not the dynamic map; only that one decodes here")
        double = DoubleQuantState(codes=state.absmax, absmax2=state.state2.absmax, offset=state.offset,
                                  blocksize2=state.state2.blocksize)
    return QuantizedTensor(packed=packed.reshape(-1).view(torch.uint8), absmax=None if state.nested else state.absmax,
                           shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                           codebook=state.quant_type, double=double)
