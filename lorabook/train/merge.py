"""Merging the trained adapter before scoring, as it would be served (``python -m lorabook.train --merge``):
LoRA into W0 (Hu et al. 2021, sec. 4.1), QLoRA into dequant(W4) (``lorabook.qlora.merge_qlora``), QA-LoRA into its
zero points (``lorabook.qalora``, Xu et al. 2023) -- and, for the first two, post-training quantization of the
merged model to group-wise INT-k (``--ptq-bits``), the step QA-LoRA makes unnecessary."""
from __future__ import annotations

import torch

from .. import qalora, qlora
from .._checks import check_choice, check_flag, check_int
from ..lora import merge_lora, output_head_name
from ..quant.groupwise import check_bits, check_group_size, quantize_model_groupwise

__all__ = ["MERGEABLE", "check_merge", "merge"]


MERGEABLE = ("lora", "qlora", "qalora")  # methods whose adapter ``merge`` folds into the weights


def check_merge(model, method: str, ptq_bits: int = 0, ptq_group_size: int = 32, ptq_nf4: bool = False) -> None:
    """Raise ValueError (changing nothing) unless ``merge(model, method, ptq_bits, ptq_group_size, ptq_nf4)`` can
    run on ``model`` once it is trained: called before training, so a bad setting does not cost a run."""
    check_choice("method (to merge)", method, MERGEABLE)
    check_int("ptq_bits", ptq_bits, low=0)
    check_flag("ptq_nf4", ptq_nf4)
    if ptq_nf4 and (method != "qlora" or ptq_bits):
        raise ValueError("ptq_nf4 re-quantizes a merged QLoRA model to NF4 (merge_qlora(requantize=True)): "
                         f"method must be 'qlora' and ptq_bits 0, got {method!r} and {ptq_bits}")
    if ptq_bits:
        if method == "qalora":
            raise ValueError("ptq_bits: a merged QA-LoRA model is group-wise INT-k already; there is nothing to "
                             "quantize after the merge")
        check_bits(ptq_bits)
        head = output_head_name(model)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != head:
                try:
                    check_group_size(ptq_group_size, m.in_features)
                except ValueError as e:
                    raise ValueError(f"ptq_group_size: {name}: {e}") from None


def merge(model, method: str, ptq_bits: int = 0, ptq_group_size: int = 32, ptq_nf4: bool = False) -> dict:
    """Fold the trained adapter into the model, in place, as it would be served; returns what was done and the
    bytes of the linear layers (but the head) afterwards:

        lora     ``merge_lora``: W0 + ΔW
        qlora    ``merge_qlora``: dequant(W4) + ΔW, a 16-bit (here fp32) model
        qalora   ``merge_qalora``: the same INT-k codes and scales, ΔW in the zero points
    ptq_bits k > 0 (lora, qlora): then quantize that merged model group-wise INT-k (round to nearest on each
    group's min-max grid, ``quantize_model_groupwise``): post-training quantization, what QA-LoRA avoids.
    ptq_nf4 (qlora): merge into dequant(W4) and quantize to NF4 again, ``merge_qlora(requantize=True)``."""
    check_merge(model, method, ptq_bits, ptq_group_size, ptq_nf4)
    if ptq_nf4:
        qlora.merge_qlora(model, requantize=True)
    else:
        {"lora": merge_lora, "qlora": qlora.merge_qlora, "qalora": qalora.merge_qalora}[method](model)
    done = {"lora": "merge_lora", "qlora": "merge_qlora (into dequant(W4))", "qalora": "merge_qalora"}[method]
    if ptq_nf4:
        done += ", then quantized to NF4 again (requantize=True)"
    if ptq_bits:
        quantize_model_groupwise(model, ptq_bits, ptq_group_size)
        done += f", then round to nearest INT{ptq_bits} in groups of {ptq_group_size}"
    head = output_head_name(model)
    linear = [m for n, m in model.named_modules() if n != head and (hasattr(m, "nbytes") or
                                                                    isinstance(m, torch.nn.Linear))]
    nbytes = sum(m.nbytes if hasattr(m, "nbytes") else m.weight.numel() * m.weight.element_size() for m in linear)
    return {"merge": done, "linear_bytes": nbytes}
