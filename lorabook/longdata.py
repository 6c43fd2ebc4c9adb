"""Long-context data: the passkey task (can a model find one number hidden in a long text? LongLoRA's check) and
a long natural text to fine-tune and measure perplexity on, offline.

Passkey. 
The template is the one LongLoRA evaluates with (from Landmark Attention, Mohtashami & Jaggi 2023,
https://arxiv.org/abs/2305.16300): a task line, filler sentences repeated, the pass key line at a random depth,
more filler, and the question at the end, which the model completes:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz
    you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.   (× before)
    The pass key is 31415. Remember it. 31415 is the pass key.
    The grass is green. ...                                                                   (× after)
    What is the pass key? The pass key is

The key is a random integer in [1, 50000], the depth (the share of the filler before the key line) uniform in
[0, 1), both from a seeded ``random.Random``: the same seed gives the same prompts. The length is in tokens of
the model's tokenizer: the filler is repeated as often as fits in ``length``. Scoring: the first integer of the
greedy continuation must equal the key.

Long text. LongLoRA fine-tunes on RedPajama and measures perplexity on PG-19 books and proof-pile; neither is
reachable offline. Every Python carries a long English text of its own: the language reference's topics
(``pydoc_data.topics``, ~460k characters, ~110k SmolLM2 tokens, on 3.11). ``long_text_windows`` cuts its tokens
into windows: the last ``held_out`` tokens for evaluation, the rest for training (it differs a little between
Python versions, so data/ records the version it was measured on).
"""
from __future__ import annotations

import random
import re

import torch

from ._checks import check_int, check_module, check_positive_int

__all__ = ["TASK", "FILLER", "QUESTION", "passkey_prompt", "passkey_examples", "passkey_predict", "passkey_accuracy",
           "long_text", "long_text_windows"]

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)


def _key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(key: int, n_filler: int, depth: float) -> str:
    """The prompt with ``n_filler`` filler sentences, round(depth · n_filler) of them before the key line."""
    check_int("key", key, low=0)
    check_int("n_filler", n_filler, low=0)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    before = round(depth * n_filler)
    return " ".join([TASK, *[FILLER] * before, _key_line(key), *[FILLER] * (n_filler - before), QUESTION])


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def passkey_examples(tokenizer, length: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` passkey prompts of at most ``length`` tokens each: [{"prompt", "key", "depth", "tokens"}].

    The filler count is the largest that fits (one tokenization of the key line's longest form fixes it)."""
    check_positive_int("length", length)
    check_positive_int("n", n)
    check_int("seed", seed)
    probe = [_n_tokens(tokenizer, passkey_prompt(KEY_RANGE[1], f, 0.5)) for f in (0, 10)]
    per_filler = (probe[1] - probe[0]) / 10
    if probe[0] + per_filler > length:
        raise ValueError(f"length must leave room for the template and one filler sentence "
                         f"(>= {int(probe[0] + per_filler) + 1} tokens), got {length}")
    n_filler = int((length - probe[0]) // per_filler)
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        key, depth = rng.randint(*KEY_RANGE), rng.random()
        prompt = passkey_prompt(key, n_filler, depth)
        while (tokens := _n_tokens(tokenizer, prompt)) > length:  # the estimate was off by a token: one fewer
            n_filler -= 1
            prompt = passkey_prompt(key, n_filler, depth)
        examples.append({"prompt": prompt, "key": key, "depth": depth, "tokens": tokens})
    return examples


@torch.no_grad()
def passkey_predict(model, tokenizer, examples: list[dict], max_new_tokens: int = 8, progress: bool = True
                    ) -> list[int | None]:
    """The first integer of each greedy continuation (None when there is none), one prompt at a time (the long
    prompts differ in length, and padding a batch of them would cost more than it saves)."""
    from tqdm.auto import tqdm

    check_module("model", model)
    check_positive_int("max_new_tokens", max_new_tokens)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    found = []
    for ex in tqdm(examples, desc="passkey", disable=not progress, leave=False):
        ids = tokenizer(ex["prompt"], return_tensors="pt")["input_ids"].to(device)  # (1, tokens)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        match = re.search(r"\d+", text)
        found.append(int(match.group()) if match else None)
    model.train(was_training)
    return found


def passkey_accuracy(model, tokenizer, examples: list[dict], max_new_tokens: int = 8, progress: bool = True
                     ) -> float:
    """Share of ``examples`` whose key the model's greedy continuation names first (0..1)."""
    if not examples:
        raise ValueError("examples must not be empty")
    found = passkey_predict(model, tokenizer, examples, max_new_tokens, progress)
    return sum(f == ex["key"] for f, ex in zip(found, examples)) / len(examples)


def long_text() -> str:
    """Python's language-reference topics (``pydoc_data.topics``), in name order, blank lines between them."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def long_text_windows(tokenizer, length: int, split: str = "train", held_out: int = 24576) -> list[torch.Tensor]:
    """``long_text()`` tokenized and cut into windows of ``length`` token ids, (length,) each: ``split`` "train"
    from the start up to the last ``held_out`` tokens, "eval" from those last ``held_out`` tokens."""
    check_positive_int("length", length)
    check_positive_int("held_out", held_out)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be one of ['train', 'eval'], got {split!r}")
    ids = torch.tensor(tokenizer(long_text())["input_ids"])                     # (tokens,)
    if held_out >= len(ids):
        raise ValueError(f"held_out ({held_out}) must be less than the text's {len(ids)} tokens")
    part = ids[:len(ids) - held_out] if split == "train" else ids[len(ids) - held_out:]
    if length > len(part):
        raise ValueError(f"length ({length}) must be <= the {split} split's {len(part)} tokens")
    return list(part[:len(part) // length * length].view(-1, length))
