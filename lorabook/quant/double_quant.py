"""Double quantization: the absmax of every 4-bit block quantized again (QLoRA, Dettmers et al. 2023, sec. 3,
https://arxiv.org/abs/2305.14314).

Blockwise 4-bit quantization (``lorabook.quant.nf4``) stores one fp32 absmax per block of 64 weights: 32 / 64 = 0.5 extra
bits per parameter. QLoRA quantizes those constants a second time:

    c2  = mean(absmax)                                    one fp32 offset          ()
    q   = quantize_8bit(absmax - c2, blocks of 256)       8-bit codes              (n_blocks,)       uint8
    c1  = absmax of each block of 256 (absmax - c2)       fp32 second-level scales (ceil(n_blocks / 256),)

Subtracting the mean centres the (all positive) absmax values so the signed 8-bit code is used on both sides.
Cost: 8 / 64 + 32 / (64 · 256) ≈ 0.127 bits per parameter instead of 0.5 -- the seed's "0.373 bits per parameter,
about 3 GB for a 65B model".

The paper calls the second quantization's type "8-bit Floats"; in bitsandbytes -- whose
``quantize_4bit(..., compress_statistics=True)`` calls ``quantize_blockwise(absmax - offset, blocksize=256)`` with its
default code, ``bitsandbytes.functional.create_dynamic_map()`` -- and so here, it is the *dynamic* data type
(Dettmers, 2015, https://arxiv.org/abs/1511.04561), not an IEEE-style FP8 (E4M3 / E5M2): a sign,
a decade 10^-6 … 10^0 and a linear fraction inside the decade, so small values keep relative precision. We derive
it and quantize the way bitsandbytes' CPU kernel does, bit for bit: each value, scaled by 1 / absmax of its block
and clamped to [-1, 1], is rounded to one of 65536 evenly spaced points of [-1, 1], and a table gives the code
nearest to that point. (Near a midpoint between two codes that can pick the farther one, by at most 1/65535 of
the range; we reproduce it so our bytes equal theirs.) A block that is all zeros gets code 0 and absmax 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .._checks import check_flag, check_positive_int

BLOCKSIZE2 = 256  # values per second-level block (bitsandbytes' compress_statistics uses 256)
GRID_POINTS = 65536  # bitsandbytes' CPU quantizer rounds through this many points of [-1, 1]


@lru_cache(maxsize=None)
def _dynamic_map(signed: bool = True) -> torch.Tensor:
    values = [0.0, 1.0]
    for e in range(7):  # decades 1e-6 … 1: the shorter the exponent, the more bits are left for the fraction
        k = 2 ** e if signed else 2 ** (e + 1)  # fraction values in this decade (unsigned: the sign bit's too)
        edges = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        magnitudes = 10.0 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2.0)  # (k,) fp32: midpoints of k bins
        values += magnitudes.tolist() + ((-magnitudes).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)  # 2 + 2·(1 + … + 64) = 2 + (2 + … + 128) = 256


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic data type (a copy; the same as
    ``bitsandbytes.functional.create_dynamic_map(signed)``): in [-1, 1] when ``signed``, else in [0, 1] with
    twice the fraction values per decade -- 8-bit AdamW keeps m in the signed map and v (never negative) in the
    unsigned one."""
    check_flag("signed", signed)
    return _dynamic_map(signed).clone()


def _grid_codes(code: torch.Tensor) -> torch.Tensor:
    """(65536,) uint8: for grid point i, value -1 + 2i/65535 (in fp32), the number of code midpoints below it.
    Built once per code (cached by its bytes): an optimizer quantizes with the same two maps every step."""
    return _grid_codes_of(code.detach().cpu().contiguous().numpy().tobytes())


@lru_cache(maxsize=16)
def _grid_codes_of(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)  # (256,)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,) fp32
    grid = -1.0 + (2.0 * torch.arange(GRID_POINTS, dtype=torch.float32)) / float(GRID_POINTS - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8)  # bucketize counts midpoints < value


def _check_8bit_args(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError("x is empty: there is nothing to quantize")
    if not isinstance(code, torch.Tensor) or code.shape != (256,) or code.dtype != torch.float32:
        raise ValueError(f"code must be a float32 tensor of 256 sorted values, got {getattr(code, 'shape', code)}")
    check_positive_int("blocksize", blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None,
                            blocksize: int = BLOCKSIZE2) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise absmax quantization of ``x`` (any shape, read flat) with a sorted 256-value ``code``.

    Returns ``(codes, absmax)``: codes (numel,) uint8, absmax (ceil(numel / blocksize),) fp32. Bit-exact with
    ``bitsandbytes.functional.quantize_blockwise`` on CPU."""
    code = _dynamic_map() if code is None else code
    _check_8bit_args(x, code, blocksize)
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    whole = n // blocksize * blocksize  # elements in full blocks; a shorter last block is handled on its own
    absmax = torch.cat([flat[:whole].view(-1, blocksize).abs().amax(dim=1),
                        flat[whole:].abs().amax().view(1)] if whole < n else
                       [flat.view(-1, blocksize).abs().amax(dim=1)])  # (n_blocks,)
    if not torch.isfinite(absmax).all():
        raise ValueError("x contains NaN or Inf")
    nonzero = absmax > 0
    inverse = 1.0 / torch.where(nonzero, absmax, torch.ones((), device=x.device))  # (n_blocks,) 1 / absmax
    unit = _per_block(flat, inverse, blocksize).clamp_(-1.0, 1.0)  # (n,) x / absmax of its block, in [-1, 1]
    grid_index = unit.add_(1.0).mul_(0.5).mul_(float(GRID_POINTS - 1)).add_(0.5).to(torch.int32)  # C's truncation
    grid_index.clamp_(0, GRID_POINTS - 1)  # NaN (0 · inf, a subnormal absmax) -> 0, as C's cast on x86
    del unit  # (its memory is free before the codes are made: an optimizer step's scratch is 4 bytes less)
    codes = _grid_codes(code).to(x.device).index_select(0, grid_index)  # (n,) uint8
    if not nonzero.all():  # an all-zero block: code 0, absmax 0 (bitsandbytes' convention)
        codes.masked_fill_((~nonzero).repeat_interleave(blocksize)[:n], 0)
    return codes.view(x.shape), absmax


def _per_block(flat: torch.Tensor, per_block: torch.Tensor, blocksize: int) -> torch.Tensor:
    """flat · per_block[its block], a new (n,) fp32 tensor (no padding to whole blocks)."""
    n = flat.numel()
    whole = n // blocksize * blocksize
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    torch.mul(flat[:whole].view(-1, blocksize), per_block[:whole // blocksize, None],
              out=out[:whole].view(-1, blocksize))
    if whole < n:
        torch.mul(flat[whole:], per_block[-1], out=out[whole:])
    return out


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              blocksize: int = BLOCKSIZE2) -> torch.Tensor:
    """code[codes] · absmax of the block, in fp32, shaped like ``codes``."""
    code = _dynamic_map() if code is None else code
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    n = codes.numel()
    n_blocks = -(-n // blocksize)
    if absmax.shape != (n_blocks,):
        raise ValueError(f"absmax has shape {tuple(absmax.shape)}, but {n} codes in blocks of {blocksize} need "
                         f"({n_blocks},)")
    values = code.to(codes.device).index_select(0, codes.reshape(-1).int())  # (n,) fp32
    whole = n // blocksize * blocksize
    values[:whole].view(-1, blocksize).mul_(absmax[:whole // blocksize, None])
    if whole < n:
        values[whole:].mul_(absmax[-1])
    return values.view(codes.shape)


@dataclass
class DoubleQuantState:
    """The absmax of a 4-bit tensor, quantized again: ``absmax ≈ dynamic[codes] · absmax2[block] + offset``."""

    codes: torch.Tensor  # (n_blocks,) uint8
    absmax2: torch.Tensor  # (ceil(n_blocks / blocksize2),) fp32
    offset: torch.Tensor  # () fp32, the mean absmax that was subtracted
    blocksize2: int = BLOCKSIZE2

    def validate(self, n_blocks: int) -> None:
        """Raise ValueError unless this state describes ``n_blocks`` absmax values."""
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.uint8:
            raise ValueError(f"double-quant codes must be uint8, got {getattr(self.codes, 'dtype', self.codes)}")
        if self.codes.shape != (n_blocks,):
            raise ValueError(f"double-quant codes have shape {tuple(self.codes.shape)}, expected ({n_blocks},) "
                             "(one per 4-bit block)")
        blocks2 = -(-n_blocks // self.blocksize2)
        if not isinstance(self.absmax2, torch.Tensor) or self.absmax2.shape != (blocks2,) \
                or self.absmax2.dtype != torch.float32:
            raise ValueError(f"double-quant absmax2 must be float32 of shape ({blocks2},) for {n_blocks} blocks in "
                             f"groups of {self.blocksize2}, got {getattr(self.absmax2, 'shape', self.absmax2)}")
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
            raise ValueError(f"double-quant offset must be a one-element tensor, got {self.offset!r}")

    @property
    def nbytes(self) -> int:
        """Bytes stored for the block constants: the codes, the second-level absmax and the offset."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax2, self.offset))


def double_quantize(absmax: torch.Tensor, blocksize2: int = BLOCKSIZE2) -> DoubleQuantState:
    """Quantize fp32 block absmax values (n_blocks,) the way ``quantize_4bit(..., compress_statistics=True)`` does."""
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    offset = absmax.mean()  # () the same reduction bitsandbytes runs, so the same float
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, _dynamic_map(), blocksize2)
    return DoubleQuantState(codes=codes, absmax2=absmax2, offset=offset, blocksize2=blocksize2)


def double_dequantize(state: DoubleQuantState) -> torch.Tensor:
    """The fp32 absmax values (n_blocks,) back: dynamic[codes] · absmax2 + offset."""
    absmax = dequantize_blockwise_8bit(state.codes, state.absmax2, _dynamic_map(), state.blocksize2)
    return absmax.add_(state.offset)


# ---- bits per parameter -------------------------------------------------------------------------------------

def bits_per_parameter(q, constants_only: bool = False) -> float:
    """Bits per weight, measured from the bytes a ``lorabook.quant.nf4.QuantizedTensor`` actually stores.

    constants_only: count only the block constants (absmax, or its double-quantized form), not the 4-bit codes --
    the number the seed compares: 0.5 at blocksize 64, ≈ 0.127 with double quantization."""
    constants = q.double.nbytes if q.double is not None else q.absmax.numel() * q.absmax.element_size()
    stored = constants if constants_only else constants + q.packed.numel() * q.packed.element_size()
    return 8.0 * stored / q.numel


def bits_per_parameter_formula(blocksize: int = 64, double_quant: bool = False, blocksize2: int = BLOCKSIZE2,
                               constants_only: bool = False) -> float:
    """The paper's arithmetic: 4 bits + 32 / blocksize, or 4 + 8 / blocksize + 32 / (blocksize · blocksize2).

    (Leaves out the single fp32 offset and the padding of the last blocks, which vanish for large tensors.)"""
    check_positive_int("blocksize", blocksize), check_positive_int("blocksize2", blocksize2)
    check_flag("double_quant", double_quant), check_flag("constants_only", constants_only)
    constants = 8 / blocksize + 32 / (blocksize * blocksize2) if double_quant else 32 / blocksize
    return constants if constants_only else 4 + constants
