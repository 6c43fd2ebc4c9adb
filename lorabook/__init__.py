"""lorabook: parameter-efficient fine-tuning, built for real and taught in notebooks.

The package, by role (each subpackage's docstring maps its modules)::

    models       the base model (SmolLM2, offline), tiny_llama for tests, chat, perplexity
    data         the text-to-SQL task in data/, chat formatting, batching, exact match
    timing       one timer: CUDA events on a GPU, perf_counter on the CPU
    memory/      where training memory goes: estimate, activations, measure, the seed's numbers, widgets
    lora/        the LoRA layer, LoRA on a model, PEFT's file format
    baselines    Adapter^H, Adapter^L, BitFit, prefix tuning, full fine-tuning (the seed's Table 2)
    latency      the seed's Table 1: inference latency of LoRA vs adapters
    quant/       NF4 / FP4 / INT4, double quantization, LinearNF4, group-wise INT-k, the compiled CPU dequantize
    adamw8bit    AdamW8bit: m and v in 8 bits (blocks of 256), bitsandbytes' AdamW8bit bit for bit
    paged        PagedAdamW, PagedAdamW8bit: optimizer state in pages under a device budget
    qlora        add_qlora / prepare_qlora: NF4 base + LoRA + checkpointing + paged AdamW; merge_qlora
    qalora       QA-LoRA: a group-wise INT-k base, LoRA on group means, merged exactly into the zero points
    longlora     LongLoRA: S²-Attn (shifted sparse attention), position interpolation, LoRA+ (embeddings, norms)
    longlora_kernel  S²-Attn's memory-lean CPU path: the flash kernel on views, with its own backward
    longdata     long-context data: the passkey task, a long offline text
    serving/     many adapters on one base (S-LoRA): batched multi-adapter LoRA, one paged pool for adapters and
                 KV cache, a continuous-batching Server
    train/       one training loop, checkpoints, torch.distributed, ``python -m lorabook.train``
    experiments/ the sweeps behind the notebooks' tables -> data/
    bench/       ``python -m lorabook.bench NAME``: lorabook vs its peer in the same run
    teach/       show source, exercise checks, student copies, Colab: ``python -m lorabook.teach``

Importing lorabook imports none of these and changes no other library's state. ``lorabook.nf4`` and
``lorabook.double_quant`` (the names the design map uses) are the modules in ``quant/``, imported on first use.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"
__all__ = ["device", "__version__"]


def device() -> torch.device:
    """The best device here, the one every lorabook demo, timer and benchmark uses: CUDA, then Apple's MPS,
    then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_SHORT_NAMES = {"nf4": "lorabook.quant.nf4", "double_quant": "lorabook.quant.double_quant"}


def __getattr__(name: str):
    """``lorabook.nf4`` / ``from lorabook import nf4``: the module in ``quant/``, imported on first use."""
    if name in _SHORT_NAMES:
        import importlib
        return importlib.import_module(_SHORT_NAMES[name])
    raise AttributeError(f"module 'lorabook' has no attribute {name!r}")
