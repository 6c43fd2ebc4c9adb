"""The passkey task: the template, the lengths in tokens, seeded keys and depths, scoring, bad input."""
import re

import pytest

from lorabook.longdata import FILLER, QUESTION, TASK, passkey_accuracy, passkey_examples, passkey_prompt


def words(text):
    """A tokenizer stand-in: one token per word (what passkey_examples needs of a tokenizer: ["input_ids"])."""
    return {"input_ids": text.split()}


def test_prompt_is_the_landmark_template_with_the_key_at_its_depth():
    prompt = passkey_prompt(31415, n_filler=10, depth=0.3)
    assert prompt.startswith(TASK) and prompt.endswith(QUESTION)
    before, after = prompt.split("The pass key is 31415. Remember it. 31415 is the pass key.")
    assert before.count(FILLER) == 3 and after.count(FILLER) == 7


def test_examples_fill_the_length_and_repeat_with_the_seed():
    examples = passkey_examples(words, 500, n=6, seed=3)
    assert all(450 < ex["tokens"] <= 500 for ex in examples)
    assert [len(ex["prompt"].split()) for ex in examples] == [ex["tokens"] for ex in examples]
    assert examples == passkey_examples(words, 500, n=6, seed=3)
    assert [ex["key"] for ex in examples] != [ex["key"] for ex in passkey_examples(words, 500, n=6, seed=4)]
    for ex in examples:
        assert 1 <= ex["key"] <= 50000 and 0 <= ex["depth"] < 1
        assert re.search(rf"The pass key is {ex['key']}\.", ex["prompt"])


def test_smollm2_finds_the_key_in_a_short_text(smollm2):
    model, tokenizer = smollm2
    examples = passkey_examples(tokenizer, 256, n=2, seed=0)
    assert all(240 < ex["tokens"] <= 256 for ex in examples)
    assert passkey_accuracy(model, tokenizer, examples, progress=False) == 1.0


@pytest.mark.parametrize("kwargs, match", [(dict(length=20), "room for the template"), (dict(length=0), "length"),
                                           (dict(n=0), "n must"), (dict(seed=1.5), "seed")])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_examples(words, **{"length": 500, "n": 2, **kwargs})
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(1, 3, 1.5)


def test_accuracy_of_no_examples_is_an_error():
    with pytest.raises(ValueError, match="examples"):
        passkey_accuracy(None, None, [])
