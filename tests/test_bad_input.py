"""Bad input across the package, one rule each: a non-model where a model goes is a TypeError naming ``model`` in
every public function that takes one, and numbers are numbers (NaN, ±Inf and a bool where an int goes are refused
with a ValueError naming the argument) everywhere, not only where someone remembered."""
import math

import pytest
import torch

from lorabook.models import byte_tokenizer
from lorabook import baselines, data, latency, memory, models, qlora, train as T
from lorabook import lora
from lorabook.memory import ModelSpec, estimate
from lorabook.paged import PagedAdamW
from lorabook.quant import double_quant, quantize_model
from lorabook.quant.nf4 import check_blocksize, quantize_4bit

TOK = byte_tokenizer()
EXAMPLES = data.load_split("val", n=2)

TAKES_A_MODEL = {  # every public function with a model argument, called with everything else valid
    "lora.find_targets": lambda m, d: lora.find_targets(m, "all-linear"),
    "lora.linear_names": lambda m, d: lora.linear_names(m),
    "lora.output_head_name": lambda m, d: lora.output_head_name(m),
    "lora.check_lora_targets": lambda m, d: lora.check_lora_targets(m, "all-linear", 4, 8, 0.0),
    "lora.add_lora": lambda m, d: lora.add_lora(m),
    "lora.lora_layers": lambda m, d: lora.lora_layers(m),
    "lora.count_trainable": lambda m, d: lora.count_trainable(m),
    "lora.adapter_names": lambda m, d: lora.adapter_names(m),
    "lora.merged_adapter": lambda m, d: lora.merged_adapter(m),
    "lora.active_adapter": lambda m, d: lora.active_adapter(m),
    "lora.set_adapter": lambda m, d: lora.set_adapter(m, "default"),
    "lora.disable_adapters": lambda m, d: lora.disable_adapters(m).__enter__(),
    "lora.delete_adapter": lambda m, d: lora.delete_adapter(m, "default"),
    "lora.merge_lora": lambda m, d: lora.merge_lora(m),
    "lora.unmerge_lora": lambda m, d: lora.unmerge_lora(m),
    "lora.switch_adapter": lambda m, d: lora.switch_adapter(m, "default"),
    "lora.merge_and_unload": lambda m, d: lora.merge_and_unload(m),
    "lora.adapter_config": lambda m, d: lora.adapter_config(m, "default"),
    "lora.save_adapter": lambda m, d: lora.save_adapter(m, d / "ad"),
    "lora.load_adapter": lambda m, d: lora.load_adapter(m, d),
    "quant.quantize_model": lambda m, d: quantize_model(m),
    "qlora.add_qlora": lambda m, d: qlora.add_qlora(m, r=4),
    "qlora.prepare_qlora": lambda m, d: qlora.prepare_qlora(m, r=4),
    **{f"baselines.prepare({method})": (lambda method: lambda m, d: baselines.prepare(m, method))(method)
       for method in baselines.PREPARE_FUNCTIONS},
    "baselines.add_adapter_houlsby": lambda m, d: baselines.add_adapter_houlsby(m),
    "baselines.add_adapter_lin": lambda m, d: baselines.add_adapter_lin(m),
    "baselines.add_bitfit": lambda m, d: baselines.add_bitfit(m),
    "baselines.add_prefix_tuning": lambda m, d: baselines.add_prefix_tuning(m),
    "baselines.full_finetune": lambda m, d: baselines.full_finetune(m),
    "train.train": lambda m, d: T.train(m, EXAMPLES, TOK, steps=1, batch_size=1, progress=False),
    "train.prepare": lambda m, d: T.prepare(m, "lora"),
    "train.trainable_parameters": lambda m, d: T.trainable_parameters(m),
    "train.validate": lambda m, d: T.validate(m, TOK, EXAMPLES),
    "memory.saved_by_module": lambda m, d: memory.saved_by_module(m, torch.zeros(1, 4, dtype=torch.long)),
    "models.enable_checkpointing": lambda m, d: models.enable_checkpointing(m),
    "models.check_checkpointing": lambda m, d: models.check_checkpointing(m),
    "models.chat": lambda m, d: models.chat(m, TOK, "hi"),
    "models.perplexity": lambda m, d: models.perplexity(m, TOK, "hello there"),
    "data.predict": lambda m, d: data.predict(m, TOK, EXAMPLES),
    "data.evaluate": lambda m, d: data.evaluate(m, TOK, EXAMPLES),
}


@pytest.mark.parametrize("not_a_model", ["SmolLM2", None], ids=["str", "None"])
@pytest.mark.parametrize("call", sorted(TAKES_A_MODEL))
def test_a_non_model_is_a_type_error_naming_the_argument(tmp_path, call, not_a_model):
    with pytest.raises(TypeError, match=f"model must be a torch nn.Module, got {type(not_a_model).__name__}"):
        TAKES_A_MODEL[call](not_a_model, tmp_path)


def test_measure_takes_a_model_or_a_name():
    """memory.measure also takes a model's name: a non-model that is no str is a TypeError, an unknown name a
    ValueError listing the names."""
    for bad in (None, 42, [1]):
        with pytest.raises(TypeError, match=f"model must be a torch nn.Module, got {type(bad).__name__}"):
            memory.measure(bad)
    with pytest.raises(ValueError, match="model must be an nn.Module, 'smollm2-135m' or 'tiny'"):
        memory.measure("SmolLM2")


NAN, INF = math.nan, math.inf
NUMBERS = {  # (call, the message it must raise): NaN, Inf and bools, one module after another
    "tiny_llama(n_layers=True)": (lambda: models.tiny_llama(n_layers=True), "n_layers must be a positive int, got T"),
    "tiny_llama(d_model=64.0)": (lambda: models.tiny_llama(d_model=64.0), "d_model must be a positive int"),
    "tiny_llama(seed=1.5)": (lambda: models.tiny_llama(seed=1.5), "seed must be an int, got 1.5"),
    "tiny_llama(tie_embeddings=1)": (lambda: models.tiny_llama(tie_embeddings=1), "tie_embeddings must be True or"),
    "perplexity(max_len=True)": (lambda: models.perplexity(models.tiny_llama(), TOK, "hi there", max_len=True),
                                 "max_len must be an int >= 2, got True"),
    "chat(max_new_tokens=0)": (lambda: models.chat(models.tiny_llama(), TOK, "hi", max_new_tokens=0),
                               "max_new_tokens must be a positive int, got 0"),
    "collate(max_len=True)": (lambda: data.collate(EXAMPLES, TOK, max_len=True), "max_len must be an int >= 2"),
    "load_split(n=nan)": (lambda: data.load_split("val", n=NAN), "n must be a positive int, got nan"),
    "generate(sizes=inf)": (lambda: data.generate(0, {"val": INF}), r"sizes\['val'\] must be an int >= 0, got inf"),
    "ModelSpec(n_layers=True)": (lambda: ModelSpec(True, 64, 4, 2, 128, 256), "ModelSpec.n_layers must be a positive"),
    "ModelSpec(d_ff=128.0)": (lambda: ModelSpec(2, 64, 4, 2, 128.0, 256), "ModelSpec.d_ff must be a positive int"),
    "estimate(lora_dropout=nan)": (lambda: estimate("smollm2-135m", lora_dropout=NAN), "lora_dropout must be a finite"),
    "estimate(lora_dropout=True)": (lambda: estimate("smollm2-135m", lora_dropout=True), "lora_dropout must be a"),
    "estimate(batch_size=True)": (lambda: estimate("smollm2-135m", batch_size=True), "batch_size must be a positive"),
    "size_for_budget(inf)": (lambda: latency.size_for_budget("lora", latency.gpt2_config(), INF),
                             "budget must be a finite number > 0, got inf"),
    "size_for_budget(nan)": (lambda: latency.size_for_budget("lora", latency.gpt2_config(), NAN), "budget must be"),
    "quantize_4bit(blocksize=64.0)": (lambda: quantize_4bit(torch.randn(64), blocksize=64.0), "blocksize must be a"),
    "check_blocksize(True)": (lambda: check_blocksize(True), "blocksize must be a power of two"),
    "quantize_blockwise_8bit(blocksize=True)": (lambda: double_quant.quantize_blockwise_8bit(torch.randn(8),
                                                                                             blocksize=True),
                                                "blocksize must be a positive int, got True"),
    "bits_per_parameter_formula(blocksize2=nan)": (lambda: double_quant.bits_per_parameter_formula(64, True, NAN),
                                                   "blocksize2 must be a positive int, got nan"),
    "bits_per_parameter_formula(double_quant=1)": (lambda: double_quant.bits_per_parameter_formula(64, 1),
                                                   "double_quant must be True or False, got 1"),
    "add_lora(r=True)": (lambda: lora.add_lora(models.tiny_llama(), r=True), "r must be a positive int, got True"),
    "add_lora(alpha=nan)": (lambda: lora.add_lora(models.tiny_llama(), alpha=NAN), "alpha must be a finite number"),
    "add_lora(dropout=nan)": (lambda: lora.add_lora(models.tiny_llama(), dropout=NAN), "dropout must be a finite"),
    "PagedAdamW(lr=inf)": (lambda: PagedAdamW([torch.nn.Parameter(torch.zeros(2))], lr=INF), "lr must be a finite"),
    "PagedAdamW(page_bytes=True)": (lambda: PagedAdamW([torch.nn.Parameter(torch.zeros(2))], page_bytes=True),
                                    "page_bytes must be an int >= 64, got True"),
    "measure(lora_rank=True)": (lambda: memory.measure("tiny", lora_rank=True), "lora_rank must be a positive int"),
    "add_adapter_houlsby(bottleneck=True)": (lambda: baselines.add_adapter_houlsby(models.tiny_llama(),
                                                                                   bottleneck=True),
                                             "bottleneck must be a positive int, got True"),
    "add_adapter_houlsby(train_norms=1)": (lambda: baselines.add_adapter_houlsby(models.tiny_llama(), train_norms=1),
                                           "train_norms must be True or False, got 1"),
    "add_prefix_tuning(init_std=nan)": (lambda: baselines.add_prefix_tuning(models.tiny_llama(), init_std=NAN),
                                        "init_std must be a finite number > 0, got nan"),
}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_numbers_are_numbers_and_flags_are_bools_everywhere(case):
    call, message = NUMBERS[case]
    with pytest.raises(ValueError, match=message):
        call()
