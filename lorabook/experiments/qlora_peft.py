"""The same QLoRA fine-tune through the libraries users know, beside lorabook's. Notebook 07 §4's comparison,
written to data/qlora_peft.json.

    lorabook   ``lorabook.qlora.add_qlora`` on the fp32 SmolLM2: LinearNF4 (NF4 + double quantization, bf16
               compute) and LoRA r = 8, α = 16 on every linear layer but the head, checkpointing
    peft+bnb   transformers' ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
               bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16))``, then
               peft's ``prepare_model_for_kbit_training`` (the other weights in fp32, checkpointing) and
               ``get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))``
    peft+bnb, lorabook's init   the same, with the adapter's initial A, B copied from lorabook's run

Every variant trains with ``lorabook.train.train`` and ``qlora_eval.RECIPE`` (8 steps of 8 examples, the same data
order and loss, paged AdamW, seed 0) and answers the first 100 test questions (greedy, 40 tokens). The 4-bit
weights are bit for bit the same (notebooks 04-05), so what can differ is the adapter's initial A (both draw
Kaiming-uniform, each in its own order of the random stream), the LoRA arithmetic's order and bf16 roundings.

    python -m lorabook.experiments peft        # ~10 minutes of one CPU thread (3 trainings, 3 scorings)
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings

import torch

from . import DATA, file_command
from .qlora_eval import RECIPE

__all__ = ["PEFT_OUT", "VARIANTS", "peft_qlora", "compare", "cli"]
PEFT_OUT = DATA / "qlora_peft.json"
VARIANTS = {"lorabook": "lorabook add_qlora", "peft+bnb": "BitsAndBytesConfig + peft, its own init",
            "peft+bnb, lorabook init": "BitsAndBytesConfig + peft, lorabook's initial adapter"}


def peft_qlora(folder: str, init_adapter: str | None = None) -> torch.nn.Module:
    """SmolLM2 (the fp32 weights in ``folder``) through transformers + bitsandbytes + peft, as the module docstring
    says; ``init_adapter``: a PEFT adapter folder whose weights replace peft's initial A and B."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = peft.LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["alpha"], target_modules="all-linear", lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    if init_adapter is not None:
        result = peft.set_peft_model_state_dict(model, load_file(os.path.join(init_adapter,
                                                                              "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"lorabook's adapter did not fit peft's model: {result.unexpected_keys[:3]}")
    return model


def compare(n: int = 100, steps: int = 8, seed: int = 0, threads: int = 1) -> dict:
    """Train and score VARIANTS (see the module docstring); returns their loss curves and answers."""
    from .. import data
    from ..lora import save_adapter
    from ..models import CACHE_NAME, cache_dir, load_base_model
    from ..qlora import add_qlora
    from ..train import train

    torch.set_num_threads(threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    base, tokenizer = load_base_model()
    train_ex, test_ex = data.load_split("train"), data.load_split("test", n=n)
    fit = dict(steps=steps, lr=RECIPE["lr"], batch_size=RECIPE["batch_size"], max_len=RECIPE["max_len"],
               warmup_steps=RECIPE["warmup_steps"], optimizer=RECIPE["optimizer"], seed=seed, progress=False,
               log_every=0)
    runs = {}
    with tempfile.TemporaryDirectory() as init, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' deprecation notes
        torch.manual_seed(seed)
        ours = add_qlora(copy.deepcopy(base), r=RECIPE["r"], alpha=RECIPE["alpha"], dropout=0.0)
        save_adapter(ours, init)  # the initial adapter, in PEFT's format
        models = {"lorabook": lambda: ours,
                  "peft+bnb": lambda: peft_qlora(str(cache_dir() / CACHE_NAME)),
                  "peft+bnb, lorabook init": lambda: peft_qlora(str(cache_dir() / CACHE_NAME), init)}
        for name, make in models.items():
            torch.manual_seed(seed)
            model = make()
            t1 = time.perf_counter()
            history = train(model, train_ex, tokenizer, **fit)
            t2 = time.perf_counter()
            preds = data.predict(model, tokenizer, test_ex, max_new_tokens=40, progress=False)
            runs[name] = dict(description=VARIANTS[name], loss_curve=list(history.loss),
                              trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                              accuracy=data.accuracy(preds, test_ex), predictions=preds,
                              train_wall_time_s=t2 - t1, eval_wall_time_s=time.perf_counter() - t2)
            print(f"{name}: loss {runs[name]['loss_curve'][0]:.4f} -> {runs[name]['loss_curve'][-1]:.4f}, exact "
                  f"match {runs[name]['accuracy']:.0%}", flush=True)
    ours_preds = runs["lorabook"]["predictions"]
    for r in runs.values():
        r["same_answers_as_lorabook"] = sum(a == b for a, b in zip(r["predictions"], ours_preds))
    import bitsandbytes
    import peft
    import transformers
    return dict(command="python -m lorabook.experiments peft", recipe=dict(RECIPE, steps=steps, seed=seed,
                                                                            targets="all-linear"),
                eval_split="test", eval_n=len(test_ex), threads=threads, torch=torch.__version__,
                peft=peft.__version__, bitsandbytes=bitsandbytes.__version__, transformers=transformers.__version__,
                wall_time_s=time.perf_counter() - t0, runs=runs)


def cli(args) -> bool:
    """``python -m lorabook.experiments peft``: runs ``compare`` into PEFT_OUT; True when nothing is left to run."""
    def report(result):
        return "\n".join(f"{name:<24} loss {' '.join(f'{x:.3f}' for x in r['loss_curve'])}  exact match "
                         f"{r['accuracy']:.0%}" for name, r in result["runs"].items())
    return file_command(args, "peft", f"{len(VARIANTS)} QLoRA fine-tunes", compare, PEFT_OUT, report)
