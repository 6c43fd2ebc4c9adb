"""Where training memory goes -- weights, gradients, optimizer states, activations -- estimated and measured.

    spec.py         ModelSpec (the shapes memory depends on), the papers' models by name, as_spec
    estimate.py     estimate(model, method, dtype, optimizer, batch_size, seq_len, ...) -> Estimate: analytic bytes
                    by category at the peak moment of a training step; ModelSpec, the known models' shapes
    activations.py  what autograd saves per decoder layer, term by term (the activation formula)
    measure.py      measure(...) -> Measurement: the peak of real training steps under torch's MemTracker;
                    state_bytes_after_step: an optimizer's state bytes, counted
    paper.py        the seed's numbers next to ours (the "4 slots", GPT-3 175B LoRA, LLaMA-7B QLoRA)
    widgets.py      plot_breakdown (stacked bars) and an ipywidgets calculator
"""
from .estimate import (CATEGORIES, DTYPES, ESTIMATE_METHODS, ESTIMATE_OPTIMIZERS, Estimate, estimate, human,
                       optimizer_state_bytes)
from .measure import Measurement, measure, peak_over_slots, saved_by_module, state_bytes_after_step, step_peak
from .spec import KNOWN_MODELS, ModelSpec, as_spec, lora_modules
from .paper import format_rows, seed_four_slots, seed_gpt3_lora, seed_qlora_llama7b
from .widgets import calculator, plot_breakdown

__all__ = ["CATEGORIES", "DTYPES", "ESTIMATE_METHODS", "ESTIMATE_OPTIMIZERS", "KNOWN_MODELS", "Estimate", "ModelSpec",
           "as_spec", "estimate", "human", "lora_modules", "optimizer_state_bytes", "Measurement", "measure",
           "step_peak", "saved_by_module", "peak_over_slots", "state_bytes_after_step", "format_rows",
           "seed_four_slots", "seed_gpt3_lora", "seed_qlora_llama7b", "calculator", "plot_breakdown"]
