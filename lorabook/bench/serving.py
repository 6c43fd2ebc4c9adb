"""``python -m lorabook.bench serving``: many requests over many adapters, three ways, tokens per second.

The model: a random Llama of SmolLM2-135M's shape (``--quick``: the tiny test Llama). 32 adapters (``--quick``: 8)
with ranks 4, 8, 16, 32, 64 in turn (``--quick``: 2 to 16) on W_q, W_k, W_v, W_o, B away from zero (as after
training), saved in PEFT's format. 32 requests of 16 prompt tokens (seeded), each with its own adapter, 16 new
tokens, greedy:

    lorabook          ``lorabook.serving.Server(compile=True)``: every running request in one batch, one GEMM per
                      linear layer for all rows, the LoRA parts batched (decoding: BGMV on the pool's pages, its
                      shrink compiled, ``lora_delta_paged``; prompts: SGMV on their adapters' rows in place),
                      adapters' weights and keys and values in one paged pool; once more with the shrink not
                      compiled (``gemm_shrink_*``)
    per-request loop  peft: one ``PeftModel`` holding every adapter; per request ``set_adapter`` + ``generate``
    peft mixed batch  peft's ``generate(..., adapter_names=...)``: the 32 prompts as one batch (same length, so no
                      padding), each linear layer looping over the adapters present

Rows: ``tokens_per_s`` (new tokens over the wall time of the whole run, and lorabook's median time from the call
to a request's first token, ``time_to_first_token``; lorabook and the mixed batch: the median of
5 interleaved runs, ``paired_ratio`` beside it), lorabook vs each peer, with ``outputs_equal`` (every request's tokens
the same in both); and what zero-padding every adapter to the largest rank
(vLLM's layout) would cost here: the bytes of the padded stack against the unpadded one (``metric`` bytes), and the
seconds of the padded gather against lorabook's on one decode step's rows of W_q.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import register, row
from .harness import bench_device, interleaved, paired_ratio, smollm2_shaped, threads
from ..lora import add_lora, delete_adapter, lora_layers, save_adapter
from ..serving import Server, lora_delta_gather, lora_delta_padded, pad_stack, stack_adapters
from ..serving.compare import peft_mixed
from ..timing import benchmark

RANKS, QUICK_RANKS = (4, 8, 16, 32, 64), (2, 4, 8, 16)   # the tiny Llama's k/v are 32 wide
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPT, NEW = 16, 16
ROUNDS = 5   # lorabook and peft's mixed batch, interleaved; the per-request loop runs once


def make_adapters(base, n: int, root: Path, ranks=RANKS) -> dict[str, Path]:
    """n PEFT folders for ``base`` (ranks cycling through ``ranks``, B seeded away from zero); the model unchanged."""
    g = torch.Generator().manual_seed(0)
    folders = {}
    for i in range(n):
        name = f"adapter{i:02d}"
        add_lora(base, target_modules=TARGETS, r=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)],
                 adapter_name=name)
        with torch.no_grad():
            for layer in lora_layers(base).values():
                B = layer.lora_B[name]
                B.copy_(torch.randn(B.shape, generator=g) * 0.02)
        folders[name] = save_adapter(base, root / name, adapter_name=name)
        delete_adapter(base, name)
    return folders


@register("serving")
def bench_serving(quick: bool = False) -> list[dict]:
    with threads(), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        return _bench(quick, Path(tmp))


def _bench(quick: bool, tmp: Path) -> list[dict]:
    import peft

    dev = bench_device()
    n = 8 if quick else 32
    base = smollm2_shaped(quick=quick).eval()
    ranks = QUICK_RANKS if quick else RANKS
    folders = make_adapters(base, n, tmp, ranks)
    base = base.to(dev)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (n, PROMPT), generator=g).tolist()
    names = list(folders)

    cfg, layers = base.config, len(base.model.layers)   # the pool: every adapter's and request's pages at once
    kv_dim = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    kv_pages = n * (PROMPT + NEW) * layers * -(-2 * kv_dim // cfg.hidden_size)
    adapter_pages = sum(8 * layers * ranks[i % len(ranks)] for i in range(n))      # 4r for A and 4r for B
    server = Server(base, max_batch=n, pool_pages=kv_pages + adapter_pages, compile=True)   # one batch, no waiting
    for name, path in folders.items():
        server.add_adapter(name, path)
    server.generate(prompts[:2], names[:2], 2)                       # compiles the shrink (not timed)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:                                           # peft wraps its own copy of the base
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    out = {}

    def ours():
        out["ours"] = server.generate(prompts, names, NEW)
        out["ttft"] = statistics.median(server.stats["time_to_first_token"])   # the call -> first token

    def mixed():
        out["mixed"] = peft_mixed(model, prompts, names, NEW)

    rounds = 1 if quick else ROUNDS
    t = interleaved({"ours": (None, ours, None), "mixed": (None, mixed, None)}, rounds=rounds, repeat=1, warmup=0,
                    device=dev)
    t_ours, t_mixed = t["ours"].median, t["mixed"].median
    server.shrink = "gemm"                                           # once more, the shrink not compiled
    start = time.perf_counter()
    gemm_equal = server.generate(prompts, names, NEW) == out["ours"]
    t_gemm = time.perf_counter() - start
    server.shrink = "compiled"
    start = time.perf_counter()
    loop = []
    for prompt, name in zip(prompts, names):                         # once: it is the slow one
        model.set_adapter(name)
        one = torch.tensor([prompt], device=dev)
        loop.append(model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)[0, PROMPT:].tolist())
    t_loop = time.perf_counter() - start
    ours, mixed = out["ours"], out["mixed"]

    tokens = sum(map(len, ours))
    case = f"{n} requests over {n} adapters (ranks {ranks[0]}-{ranks[-1]}), {PROMPT} + {NEW} tokens each"
    rows = [row(case, "tokens_per_s", tokens / t_ours, "per-request loop", sum(map(len, loop)) / t_loop,
                seconds=t_ours, peer_seconds=t_loop, outputs_equal=ours == loop, time_to_first_token=out["ttft"],
                gemm_shrink_tokens_per_s=tokens / t_gemm, gemm_shrink_outputs_equal=gemm_equal),
            row(case, "tokens_per_s", tokens / t_ours, "peft mixed batch", sum(map(len, mixed)) / t_mixed,
                seconds=t_ours, peer_seconds=t_mixed, outputs_equal=ours == mixed,
                paired_ratio=1 / paired_ratio(t["ours"], t["mixed"], 1))]

    # what padding to the largest rank costs: W_q of layer 0, every adapter, one decode step (a row per request)
    path = "model.layers.0.self_attn.q_proj"
    q = base.model.layers[0].self_attn.q_proj
    stack = stack_adapters([server.store[name].layers[path] for name in names], q.in_features, q.out_features,
                           device=dev)
    padded = pad_stack(stack)
    x = torch.randn(n, q.in_features, generator=g).to(dev)
    idx = torch.arange(n, device=dev)
    t_gather = benchmark(lambda: lora_delta_gather(x, idx, stack), warmup=2, repeat=20).median
    t_padded = benchmark(lambda: lora_delta_padded(x, idx, stack, padded), warmup=2, repeat=20).median
    unpadded_bytes = (stack.A.numel() + stack.Bt.numel()) * stack.A.element_size()
    padded_bytes = sum(t.numel() * t.element_size() for t in padded)
    rows += [row(f"{n} adapters' W_q (layer 0), unpadded vs padded to rank {ranks[-1]}", "bytes", unpadded_bytes,
                 "padded to the largest rank (vLLM)", padded_bytes),
             row(f"one decode step's LoRA on W_q, {n} rows: gather vs padded gather", "seconds", t_gather,
                 "padded to the largest rank (vLLM)", t_padded)]
    return rows
