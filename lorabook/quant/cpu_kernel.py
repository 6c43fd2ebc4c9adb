"""A compiled one-pass 4-bit dequantization for the CPU (QLoRA, Dettmers et al. 2023, sec. 3,
https://arxiv.org/abs/2305.14314), beside the readable and the fast PyTorch ways of ``lorabook.quant.nf4``.

``lorabook.quant.fast.dequantize_into`` makes two passes over the output: an ``index_select`` writes each byte's
two levels, then a multiply scales each block by its absmax. The C loop below makes one, as bitsandbytes'
CPU kernel does, and does less work per value than ``level · absmax``: for each block it first builds the block's
16 possible outputs, rounded once to the output dtype,

    table[k] = dtype(code[k] · absmax[b])          k = 0..15        (16 products per block of 64 values)

and then every byte of the block is two table reads:

    out[2j] = table[byte_j >> 4]        out[2j + 1] = table[byte_j & 15]

On a CPU with AVX-512 (checked at run time) the table sits in one register and a single permute decodes 16 codes
(``vpermps``, fp32) or 32 (``vpermw``, bf16/fp16); elsewhere the portable loop above runs. The products are the
same fp32 products, rounded the same way (round to nearest even, to bf16 or fp16 by hand below), so the result is
bit-for-bit the PyTorch path's -- and bitsandbytes'. Blocks are split between threads with OpenMP
(``torch.get_num_threads()`` of them).

The source is compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``; about a second)
into ``~/.cache/lorabook`` (``$LORABOOK_CACHE``; without OpenMP if the compiler lacks it) and loaded with
``ctypes`` -- no PyTorch headers, no build step at install. No compiler, a failed compile, ``LORABOOK_KERNEL=0``,
a tensor that is not on the CPU: ``available()`` says so (``reason()`` says why) and ``dequantize_4bit`` uses its
PyTorch path.

A fresh output costs more than the loop. A 64 MB tensor from ``torch.empty`` is new memory from the operating
system: untouched, so the loop's first write to each 4 KB page faults and the kernel zeroes it -- 16384 faults,
about 30 ms on one thread of the 2-core VM this course is built on, eight times the 4 ms loop. ``empty_huge_pages``
asks for 2 MB pages on the buffer's 2 MB-aligned interior (``madvise(MADV_HUGEPAGE)``, Linux with transparent
huge pages "always" or "madvise"): 32 faults, and the zeroing (about 6 ms there) is then most of what is left.
The tensor is as fresh as ``torch.empty``'s (the same allocation); only its pages are larger.
``LORABOOK_HUGEPAGES=0`` turns the advice off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .._io import cache_dir, write_file

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline uint32_t bits_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float float_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* fp32 -> bf16, round to nearest, ties to even (finite x): add just under half of the dropped 16 bits, plus
   the kept lowest bit, and cut. */
static inline uint16_t to_bf16(float x) {
    uint32_t u = bits_of(x);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp32 -> fp16, round to nearest, ties to even (finite x). */
static inline uint16_t to_fp16(float x) {
    uint32_t u = bits_of(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7FFFFFFFu;                                /* |x| */
    if (u >= 0x47800000u) return sign | 0x7C00u;     /* |x| >= 2^16: infinity */
    if (u < 0x38800000u) {                           /* |x| < 2^-14: a subnormal fp16, in units of 2^-24 */
        /* adding 0.5 puts the units in the low mantissa bits; the fp32 add rounds to nearest even for us */
        return sign | (uint16_t)(bits_of(float_of(u) + 0.5f) - 0x3F000000u);
    }
    uint32_t odd = (u >> 13) & 1u;                   /* the lowest bit fp16 keeps */
    u += 0xC8000000u + 0x0FFFu + odd;                /* rebias the exponent (127 -> 15), round, maybe carry */
    return sign | (uint16_t)(u >> 13);               /* a carry past 65504 lands on infinity, as it should */
}

/* Two families share the loops below; they differ only in a block's 16 outputs (VALUE(k), or VALUES on AVX-512):
     NF4 / FP4 (QLoRA):          code[k] · absmax[b]
     affine INT4 (QA-LoRA):      (k − zero[b]) · scale[b]      (the subtraction first, then one multiply) */
#define NF4_ARGS const uint8_t* packed, const float* absmax, const float* code, void* out_, int64_t n, \
                 int64_t blocksize, int threads
#define INT4_ARGS const uint8_t* packed, const float* scale, const float* zero, void* out_, int64_t n, \
                  int64_t blocksize, int threads
#define NF4_CALL packed, absmax, code, out_, n, blocksize, threads
#define INT4_CALL packed, scale, zero, out_, n, blocksize, threads
#define NF4_VALUE(k) (code[k] * absmax[b])
#define INT4_VALUE(k) (((float)(k) - zero[b]) * scale[b])

/* The portable loop: per block, its 16 outputs, then two table reads per byte. */
#define SCALAR_LOOP(T, CONVERT, VALUE)                                                                        \
    T table[16];                                         /* this block's 16 outputs, rounded once */        \
    for (int k = 0; k < 16; ++k) table[k] = CONVERT(VALUE(k));                                              \
    for (; j < count / 2; ++j) {                                                                             \
        uint8_t byte = bytes[j];                                                                             \
        o[2 * j] = table[byte >> 4];                     /* first code in the high nibble */                \
        o[2 * j + 1] = table[byte & 15];                                                                     \
    }                                                                                                        \
    if (count & 1) o[count - 1] = table[bytes[count / 2] >> 4];  /* an odd count ends on a high nibble */

#define FOR_EACH_BLOCK(BODY)                                                                                  \
    int64_t n_blocks = (n + blocksize - 1) / blocksize;                                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
    for (int64_t b = 0; b < n_blocks; ++b) {                                                                  \
        int64_t start = b * blocksize;                   /* blocksize is even: a block starts on a byte */  \
        int64_t count = n - start < blocksize ? n - start : blocksize;                                       \
        const uint8_t* bytes = packed + start / 2;                                                           \
        int64_t j = 0;                                   /* bytes done */                                   \
        BODY                                                                                                 \
    }

static inline float as_float(float x) { return x; }
#define SCALAR(NAME, ARGS, VALUE, T, CONVERT) \
static void NAME(ARGS) { T* out = out_; FOR_EACH_BLOCK(T* o = out + start; SCALAR_LOOP(T, CONVERT, VALUE)) }
#define SCALARS(P, F) /* family F's portable loops for the three output dtypes, named P##scalar_* */           \
    SCALAR(P##scalar_f32, F##_ARGS, F##_VALUE, float, as_float)                                              \
    SCALAR(P##scalar_bf16, F##_ARGS, F##_VALUE, uint16_t, to_bf16)                                           \
    SCALAR(P##scalar_f16, F##_ARGS, F##_VALUE, uint16_t, to_fp16)
SCALARS(, NF4)
SCALARS(int4_, INT4)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* AVX-512: the 16-entry table fits one register and one permute looks up 16 (fp32) or 32 (16-bit) codes. */
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define NF4_VALUES _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax[b]))
#define INT4_VALUES _mm512_mul_ps(_mm512_sub_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                                _mm512_set1_ps(zero[b])), _mm512_set1_ps(scale[b]))

/* 16 bytes -> 32 codes in output order (hi, lo, hi, lo, ...) as 16-bit lanes */
AVX512 static inline __m512i codes_16bit(const uint8_t* bytes) {
    __m512i twice = _mm512_cvtepu8_epi16(_mm256_set_m128i(
        _mm_unpackhi_epi8(_mm_loadu_si128((const __m128i*)bytes), _mm_loadu_si128((const __m128i*)bytes)),
        _mm_unpacklo_epi8(_mm_loadu_si128((const __m128i*)bytes), _mm_loadu_si128((const __m128i*)bytes))));
    const __m512i shift = _mm512_set1_epi32(4);          /* 16-bit lanes: shift 4 (even lanes), 0 (odd lanes) */
    return _mm512_and_si512(_mm512_srlv_epi16(twice, shift), _mm512_set1_epi16(15));
}

#define AVX512_F32(NAME, ARGS, VALUES, VALUE)                                                                 \
AVX512 static void NAME(ARGS) {                                                                               \
    float* out = out_;                                                                                        \
    FOR_EACH_BLOCK(                                                                                           \
        float* o = out + start;                                                                               \
        __m512 values = VALUES;                          /* the block's 16 outputs */                        \
        const __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);              \
        for (; j + 8 <= count / 2; j += 8) {             /* 8 bytes -> 16 values; vpermps reads 4 index bits */ \
            __m128i eight = _mm_loadl_epi64((const __m128i*)(bytes + j));                                     \
            __m512i idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(eight, eight)), shift);   \
            _mm512_storeu_ps(o + 2 * j, _mm512_permutexvar_ps(idx, values));                                  \
        }                                                                                                     \
        if (2 * j < count) { SCALAR_LOOP(float, as_float, VALUE) })  /* a partial last block's tail */      \
}
AVX512_F32(avx512_f32, NF4_ARGS, NF4_VALUES, NF4_VALUE)
AVX512_F32(int4_avx512_f32, INT4_ARGS, INT4_VALUES, INT4_VALUE)

/* the 16 fp32 outputs rounded to 16 bits, in the low lanes of a register (vpermw reads 32 lanes; the codes
   only ever pick lanes 0..15): bf16 by the same round-to-nearest-even as to_bf16, fp16 by the CPU's converter */
AVX512 static inline __m512i table_bf16(__m512 values) {
    __m512i u = _mm512_castps_si512(values);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(rounded));
}
AVX512 static inline __m512i table_f16(__m512 values) {
    return _mm512_castsi256_si512(_mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#define AVX512_16BIT(NAME, ARGS, VALUES, VALUE, TABLE, CONVERT)                                               \
AVX512 static void NAME(ARGS) {                                                                               \
    uint16_t* out = out_;                                                                                     \
    FOR_EACH_BLOCK(                                                                                           \
        uint16_t* o = out + start;                                                                            \
        __m512i values = TABLE(VALUES);                                                                       \
        for (; j + 16 <= count / 2; j += 16)             /* 16 bytes -> 32 values */                          \
            _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(codes_16bit(bytes + j), values));        \
        if (2 * j < count) { SCALAR_LOOP(uint16_t, CONVERT, VALUE) })  /* a partial last block's tail */     \
}
AVX512_16BIT(avx512_bf16, NF4_ARGS, NF4_VALUES, NF4_VALUE, table_bf16, to_bf16)
AVX512_16BIT(avx512_f16, NF4_ARGS, NF4_VALUES, NF4_VALUE, table_f16, to_fp16)
AVX512_16BIT(int4_avx512_bf16, INT4_ARGS, INT4_VALUES, INT4_VALUE, table_bf16, to_bf16)
AVX512_16BIT(int4_avx512_f16, INT4_ARGS, INT4_VALUES, INT4_VALUE, table_f16, to_fp16)
static int use_avx512(int simd) {
    return simd && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#else                                                    /* not x86-64: the portable loop only */
#define avx512_f32 scalar_f32
#define avx512_bf16 scalar_bf16
#define avx512_f16 scalar_f16
#define int4_avx512_f32 int4_scalar_f32
#define int4_avx512_bf16 int4_scalar_bf16
#define int4_avx512_f16 int4_scalar_f16
static int use_avx512(int simd) { return 0; }
#endif

/* simd: 1 = AVX-512 where the CPU has it, 0 = the portable loop. Returns 1 if AVX-512 ran. */
#define ENTRY(NAME, ARGS, CALL, SCALAR, VECTOR)                                                               \
int NAME(ARGS, int simd) {                                                                                    \
    int vector = use_avx512(simd);                                                                            \
    (vector ? VECTOR : SCALAR)(CALL);                                                                         \
    return vector;                                                                                            \
}
#define ENTRIES(NAME, P, F) /* the exported functions NAME##_f32 / _bf16 / _f16 of family F */                 \
    ENTRY(NAME##_f32, F##_ARGS, F##_CALL, P##scalar_f32, P##avx512_f32)                                      \
    ENTRY(NAME##_bf16, F##_ARGS, F##_CALL, P##scalar_bf16, P##avx512_bf16)                                   \
    ENTRY(NAME##_f16, F##_ARGS, F##_CALL, P##scalar_f16, P##avx512_f16)
ENTRIES(dequantize_4bit, , NF4)
ENTRIES(dequantize_int4, int4_, INT4)
"""

FUNCTIONS = {torch.float32: "dequantize_4bit_f32", torch.bfloat16: "dequantize_4bit_bf16",
             torch.float16: "dequantize_4bit_f16"}
INT4_FUNCTIONS = {torch.float32: "dequantize_int4_f32", torch.bfloat16: "dequantize_int4_bf16",
                  torch.float16: "dequantize_int4_f16"}
PARALLEL_FROM = 2 ** 16  # values; below this, starting threads costs more than it saves
FLAGS = ["-O3", "-shared", "-fPIC"]  # -O3 without -ffast-math: the fp32 products stay exact IEEE
OPENMP = "-fopenmp"  # tried first; a compiler without OpenMP (Apple's clang) builds a one-thread loop instead


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(cc: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        source = Path(tmp) / "nf4_kernel.c"
        source.write_text(SOURCE)

        def build(built: Path) -> None:
            command = [cc, *FLAGS, str(source), "-o", str(built)]
            try:
                subprocess.run(command + [OPENMP], capture_output=True, text=True, check=True)
            except subprocess.CalledProcessError:
                subprocess.run(command, capture_output=True, text=True, check=True)  # the pragma is then ignored
        write_file(library, build)  # atomic: another process compiling at the same time is harmless


@lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not). Compiled once per source and flags; later runs load the cached file."""
    if os.environ.get("LORABOOK_KERNEL", "1") == "0":
        return None, "disabled by LORABOOK_KERNEL=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set $CC)"
    key = hashlib.sha256("\n".join([SOURCE, cc, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / f"nf4_kernel_{key}.so"
    if not library.exists():
        try:
            _compile(cc, library)
        except (OSError, subprocess.CalledProcessError) as error:  # unwritable cache, missing or failing compiler
            detail = getattr(error, "stderr", None) or str(error)
            return None, f"{cc} failed: {detail.strip()[-500:]}"
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as error:
        return None, f"cannot load {library}: {error}"
    for name in (*FUNCTIONS.values(), *INT4_FUNCTIONS.values()):
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        function.restype = ctypes.c_int
    return lib, ""


def available() -> bool:
    """True if the compiled kernel is (or can be) loaded. Compiles it on the first call."""
    return _load()[0] is not None


def reason() -> str:
    """Why the kernel is not available ("" if it is)."""
    return _load()[1]


# ---- a fresh output on 2 MB pages ----------------------------------------------------------------------------

HUGE_PAGE = 2 ** 21  # bytes: x86-64's (and arm64's with 4 KB base pages) transparent huge page
HUGE_FROM = 2 ** 22  # bytes: smaller buffers gain little (and mostly come from memory the allocator reuses)
MADV_HUGEPAGE = 14  # <linux/mman.h>
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=None)
def _madvise():
    """libc's ``madvise``, or None where huge pages cannot be had: not Linux, THP "[never]", LORABOOK_HUGEPAGES=0."""
    if os.environ.get("LORABOOK_HUGEPAGES", "1") == "0":
        return None
    try:
        if "[never]" in THP_MODE.read_text():
            return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise  # the process's own libc
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def empty_huge_pages(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(n, dtype=dtype)`` on the CPU, with its whole 2 MB pages advised to be huge pages.

    Only the advice differs: the same fresh, uninitialised allocation, freed the same way. Buffers under 4 MB,
    and systems without transparent huge pages, get plain ``torch.empty``."""
    out = torch.empty(n, dtype=dtype)
    madvise, nbytes = _madvise(), n * out.element_size()
    if madvise is not None and nbytes >= HUGE_FROM:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the first 2 MB boundary inside the buffer
        stop = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE  # the last one
        madvise(start, stop - start, MADV_HUGEPAGE)  # a refusal (an old kernel: EINVAL) leaves 4 KB pages
    return out


def dequantize_into(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor,
                    blocksize: int, simd: bool = True) -> bool:
    """out[i] = dtype(code[codes[i]] · absmax[i // blocksize]) for the n = out.numel() codes in ``packed``.

    packed (ceil(n / 2),) uint8, absmax (ceil(n / blocksize),) fp32, code (16,) fp32, out (n,) fp32/bf16/fp16 --
    all contiguous CPU tensors (checked here: the C loop trusts them). simd: use AVX-512 where the CPU has it (else
    the portable loop). Returns whether AVX-512 ran. Raises RuntimeError if not ``available()``."""
    _check_blocksize("blocksize", blocksize)
    n = out.numel()
    return _call(FUNCTIONS, blocksize, simd, packed=(packed, torch.uint8, (n + 1) // 2),
                 absmax=(absmax, torch.float32, -(-n // blocksize)), code=(code, torch.float32, 16), out=(out, None, n))


def dequantize_int4_into(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor,
                         group_size: int, simd: bool = True) -> bool:
    """out[i] = dtype((codes[i] − zero[g]) · scale[g]), g = i // group_size: QA-LoRA's affine INT4 groups
    (``lorabook.quant.groupwise``), the same loop with a group's 16 outputs made from its scale and zero point.

    packed (ceil(n / 2),) uint8 (first code in the high nibble), scale and zero (ceil(n / group_size),) fp32,
    out (n,) fp32/bf16/fp16, contiguous CPU tensors. Returns whether AVX-512 ran."""
    _check_blocksize("group_size", group_size)
    n, groups = out.numel(), -(-out.numel() // group_size)
    return _call(INT4_FUNCTIONS, group_size, simd, packed=(packed, torch.uint8, (n + 1) // 2),
                 scale=(scale, torch.float32, groups), zero=(zero, torch.float32, groups), out=(out, None, n))


def _check_blocksize(name: str, blocksize) -> int:
    """A positive even int (a block then starts on a byte); returns it."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"{name} must be a positive even int, got {blocksize!r}")
    return blocksize


def _call(functions: dict, blocksize: int, simd: bool, **tensors) -> bool:
    """Check the tensors (name=(tensor, dtype or None for out's own, numel)) and run the loop for out's dtype."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the compiled 4-bit kernel is not available: {why}")
    out = tensors["out"][0]
    if out.dtype not in functions:
        raise ValueError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    for name, (tensor, dtype, numel) in tensors.items():
        dtype = out.dtype if dtype is None else dtype
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != dtype or \
                tensor.numel() != numel:
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of {numel} elements, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    n = out.numel()
    threads = torch.get_num_threads() if n >= PARALLEL_FROM else 1
    pointers = [t.data_ptr() for t, _, _ in tensors.values()]  # packed, the two per-block tables, out
    return bool(getattr(lib, functions[out.dtype])(*pointers, n, blocksize, threads, int(simd)))
