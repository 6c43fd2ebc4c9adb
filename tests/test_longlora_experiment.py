"""The LongLoRA experiment behind notebook 09, end to end on the tiny Llama and a one-word-per-token tokenizer:
every stage lands in the file, a second run skips them, the counts are LoRA+'s. Seconds."""
import json

import pytest
import torch

from lorabook.experiments import longlora as L
from lorabook.models import tiny_llama


class WordTokenizer:
    """Just what the experiment asks of a tokenizer: ids of a text (one per word), decode, an end-of-text id."""
    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        ids = [sum(word.encode()) % 255 + 1 for word in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + int(i) % 10) for i in ids)  # digits, so a prediction always parses


@pytest.fixture
def tiny_base(monkeypatch):
    import lorabook.models
    monkeypatch.setattr(lorabook.models, "load_base_model", lambda device=None: (tiny_llama(seed=0), WordTokenizer()))


def test_smoke_run_writes_every_stage_and_resumes(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "longlora.json"
    result = L.run("smoke", out=out)
    assert list(result["stages"]) == ["SmolLM2", "SmolLM2 + PI x2", "LongLoRA LoRA+", "LongLoRA LoRA", "LongLoRA full"]
    result = L.measurements(result)
    file = json.loads(out.read_text())
    saved = L.measurements(file)
    assert saved.keys() == result.keys() and file["original_context"] == 256
    plus, lora = saved["LongLoRA LoRA+"], saved["LongLoRA LoRA"]
    assert plus["counts"]["trainable"] == lora["counts"]["lora"] + 256 * 64 + 5 * 64  # + embeddings + 5 norms
    assert len(plus["loss"]) == 2 and plus["passkey"][0]["length"] == 256 and lora["passkey"] == []
    assert all(s["perplexity"]["256"]["ppl"] > 1 for s in saved.values())
    assert list(saved["SmolLM2"]["perplexity"]["256"]["by_positions"]) == ["0-254"]
    import lorabook.train.loop
    monkeypatch.setattr(lorabook.train.loop, "train", lambda *a, **k: pytest.fail("a finished stage ran again"))
    assert L.run("smoke", out=out)["stages"] == file["stages"]


def test_prepare_turns_on_interpolation_and_s2attn_and_leaves_the_base_alone(tiny_base):
    base = tiny_llama(seed=0)
    model, counts = L.prepare(base, "LoRA+", factor=2)
    assert model.config._attn_implementation == "lorabook_s2attn" and base.config._attn_implementation == "sdpa"
    assert model.config.rope_parameters["factor"] == 2 and base.config.rope_parameters["rope_type"] == "default"
    with pytest.raises(ValueError, match="method"):
        L.prepare(base, "prefix", factor=2)
    with pytest.raises(ValueError, match="scale"):
        L.run("tpu")
