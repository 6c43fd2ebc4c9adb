"""Quantization for QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): 4-bit NormalFloat and friends.

    codebooks.py     the NF4 / FP4 / INT4 levels (and QLoRA's eq. 4 read literally, NFk)
    nf4.py           int8 absmax, blockwise 4-bit quantize / dequantize with those levels, packing, to_bnb / from_bnb
                     (bit-exact with bitsandbytes), code occupancy
    double_quant.py  the block constants quantized again (8-bit dynamic map, blocks of 256), bits per parameter
    linear.py        LinearNF4 (a frozen 4-bit linear layer; LoRA on top = the QLoRA layer), quantize_model,
                     compute_linear (a 16-bit GEMM with fp32 sums), set_compute_dtype
    groupwise.py     group-wise asymmetric INT-k (QA-LoRA's base): min-max scales and fp zero points per group,
                     packing, dequantize, LinearGroupwise
    fast.py          nf4's fast PyTorch paths (lookup tables), bit-exact with its readable reference functions
    cpu_kernel.py    the dequantize loop in C (AVX-512 where present), compiled on first use; the fast CPU path of
                     nf4 and of groupwise's INT4
"""
from .double_quant import (DoubleQuantState, bits_per_parameter, bits_per_parameter_formula, double_dequantize,
                           double_quantize, dynamic_map)
from .linear import LinearNF4, compute_linear, dequantize_linear, quantize_model, set_compute_dtype
from .groupwise import (GroupQuantized, LinearGroupwise, dequantize_groupwise, dequantize_groupwise_reference,
                        quantize_groupwise)
from .codebooks import codebook, nf4_codebook, nf_codebook, qlora_eq4_levels
from .nf4 import (QuantizedTensor, code_occupancy, dequantize_4bit, dequantize_4bit_reference, dequantize_nf4,
                  entropy_bits, quantize_4bit, quantize_nf4, round_to_levels)

__all__ = ["DoubleQuantState", "bits_per_parameter", "bits_per_parameter_formula", "double_dequantize",
           "double_quantize", "dynamic_map", "LinearNF4", "compute_linear", "dequantize_linear", "quantize_model",
           "set_compute_dtype", "GroupQuantized", "LinearGroupwise", "dequantize_groupwise",
           "dequantize_groupwise_reference", "quantize_groupwise", "QuantizedTensor", "codebook",
           "dequantize_4bit", "dequantize_4bit_reference", "dequantize_nf4", "nf4_codebook", "quantize_4bit",
           "quantize_nf4", "code_occupancy", "entropy_bits", "nf_codebook", "qlora_eq4_levels", "round_to_levels"]
