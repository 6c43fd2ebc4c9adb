"""The 4-bit codebooks of QLoRA's lesson (Dettmers et al. 2023, sec. 3, https://arxiv.org/abs/2305.14314).

Each is 16 values in code order, normalised to [-1, 1], fp32 (NFk: 2^k values):

    nf4_codebook()      NF4 as bitsandbytes' ``create_normal_map`` builds it (bit-equal to its table)
    nf_codebook(bits)   the same construction for k bits          qlora_eq4_levels(bits)  the paper's eq. 4, literally
    fp4_codebook()      bitsandbytes' 4-bit float                 int4_codebook()         symmetric absmax INT4
    codebook(name)      one of CODEBOOKS by name (a copy)

``lorabook.quant.nf4`` quantizes with them.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .._checks import check_int, check_number

CODEBOOKS = ("nf4", "fp4", "int4")
NF4_OFFSET = 0.9677083  # the probability whose quantile becomes ±1 (bitsandbytes'; = ½(31/32 + 29/30))


# ---- the codebooks: 16 values in code order, normalised to [-1, 1] ------------------------------------------

def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4's 16 levels (sorted, code i -> value i): quantiles of N(0, 1), normalised to [-1, 1].

    8 positive levels at the quantiles of 8 equal steps from ``offset`` down to 1/2 (excluded), 7 negative levels
    at 7 such steps, and 0. Probabilities in fp32, the inverse normal CDF in fp64, rounded to fp32 and divided by
    the largest level, as ``bitsandbytes.functional.create_normal_map`` does."""
    offset = check_number("offset", offset, 0.5, 1.0, low_open=True, high_open=True)  # Φ⁻¹(1) = ∞
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # (7,)
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return levels / levels.max()


def nf_codebook(bits: int = 4, offset: float = NF4_OFFSET) -> torch.Tensor:
    """k-bit NormalFloat (NFk, QLoRA sec. 3) built as ``nf4_codebook`` builds NF4: 2^(k-1) positive levels,
    2^(k-1) - 1 negative ones and 0, sorted, (2^bits,) fp32 in [-1, 1]. ``nf_codebook(4)`` equals NF4."""
    bits = check_int("bits", bits, 2, 8)
    offset = check_number("offset", offset, 0.5, 1.0, low_open=True, high_open=True)
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double()).float()  # (half,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double()).float()  # (half - 1,)
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (2^bits,)
    return levels / levels.max()


def qlora_eq4_levels(bits: int = 4) -> torch.Tensor:
    """QLoRA's eq. 4 read literally: cut N(0, 1) into 2^k + 1 bins of equal probability; each level is the mean
    of its bin's two edge quantiles,

        q_i = ½ (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))),     i = 0 … 2^k

    The outer two are ∓∞ (Q_X(0) = -∞, Q_X(1) = +∞); the 2^k - 1 finite ones are returned, divided by the
    largest: (2^bits - 1,) fp32, sorted, symmetric, with an exact 0 (the middle bin is centred on 0). Not
    bitsandbytes' NF4 (``nf4_codebook``: single quantiles at probabilities from 1/2 to ``NF4_OFFSET``)."""
    n = 2 ** check_int("bits", bits, 2, 8) + 1  # bins
    edges = torch.special.ndtri(torch.arange(n + 1, dtype=torch.float64) / n)  # (n + 1,) -inf … +inf
    q = (edges[:-1] + edges[1:]) / 2  # (n,) eq. 4 for i = 0 … 2^k
    finite = q[1:-1]  # (n - 2,)
    finite = (finite - finite.flip(0)) / 2  # exactly antisymmetric (Q_X(1 - p) = -Q_X(p) up to rounding)
    return (finite / finite.max()).float()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 in code order: bit 3 the sign, bits 2-1 an exponent field e, bit 0 a mantissa bit m.

    e = 0 is subnormal, m · 2^-4; otherwise (1 + m/2) · 2^(4 - e) -- in bitsandbytes' layout the exponent field
    counts *down*. The largest value, 12, is scaled to 1. Code 8 (sign bit, zero) is +0.0 as in bitsandbytes'
    table (its C kernel decodes it as -0.0, which compares equal)."""
    values = []
    for code in range(16):
        sign, e, m = (-1.0 if code & 8 else 1.0), (code >> 1) & 3, code & 1
        magnitude = m * 2.0 ** -4 if e == 0 else (1 + m / 2) * 2.0 ** (4 - e)
        values.append(sign * magnitude if magnitude else 0.0)
    return torch.tensor(values, dtype=torch.float32) / 12.0


def int4_codebook() -> torch.Tensor:
    """Symmetric absmax INT4, the seed's int8 formula with 7 for 127: levels k / 7 for code k + 8, k = -8 … 7.

    After absmax scaling to [-1, 1] the nearest level is round(7 x): -8/7 is never used, like -128 in int8."""
    return torch.arange(-8, 8, dtype=torch.float32) / 7.0


@lru_cache(maxsize=None)
def codebook_table(name: str) -> torch.Tensor:
    """The cached levels of a checked ``name`` (shared: do not modify; ``codebook`` returns a copy)."""
    return {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}[name]()


def codebook(name: str = "nf4") -> torch.Tensor:
    """The 16 levels of ``name`` ("nf4", "fp4" or "int4") in code order, fp32 (a copy)."""
    return codebook_table(check_codebook(name)).clone()


def check_codebook(name) -> str:
    if name not in CODEBOOKS:
        raise ValueError(f"codebook must be one of {CODEBOOKS}, got {name!r}")
    return name
