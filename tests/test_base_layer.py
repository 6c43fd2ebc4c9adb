"""The base-layer protocol: a layer tells LoRA what it needs (``lora_base_layer() -> BaseLayer``); LoRA never looks
for sibling classes. QA-LoRA's and the serving bases will plug in this way."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorabook.lora import BaseLayer, LoRALinear, add_lora, base_layer, is_linear, merge_lora


class ScaledLinear(nn.Module):
    """A made-up base: y = 2 · x Wᵀ, weight (out, in), which describes itself to LoRA."""

    def __init__(self, d_in: int, d_out: int, mergeable: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0)))
        self.mergeable = mergeable

    def forward(self, x):
        return 2 * F.linear(x, self.weight)

    def lora_base_layer(self) -> BaseLayer:
        return BaseLayer(self.weight.shape[1], self.weight.shape[0], mergeable=self.mergeable,
                         adapter_dtype=torch.float64, device=self.weight.device,
                         not_mergeable_because="its forward doubles the weight")


class Block(nn.Module):
    def __init__(self, mergeable: bool):
        super().__init__()
        self.proj = ScaledLinear(8, 6, mergeable)
        self.other = nn.ReLU()

    def forward(self, x):
        return self.proj(x)


def test_a_self_describing_layer_is_a_linear_and_gets_its_adapter_dtype():
    block = Block(mergeable=False)
    assert is_linear(block.proj) and not is_linear(block.other) and base_layer(block.other) is None
    add_lora(block, ["proj"], r=2)
    layer = block.proj
    assert isinstance(layer, LoRALinear) and (layer.in_features, layer.out_features) == (8, 6)
    assert layer.lora_A["default"].dtype == torch.float64 and layer.lora_A["default"].shape == (2, 8)


def test_a_base_that_says_it_cannot_merge_is_refused_with_its_reason_and_left_alone():
    block = add_lora(Block(mergeable=False), ["proj"], r=2)
    before = block.proj.base.weight.clone()
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into a ScaledLinear base: its forward doubles"):
        merge_lora(block)
    assert torch.equal(block.proj.base.weight, before) and block.proj.merged is None


def test_nn_linear_and_conv1d_are_described_without_a_method():
    info = base_layer(nn.Linear(5, 3))
    assert (info.in_features, info.out_features, info.mergeable, info.fan_in_fan_out) == (5, 3, True, False)
    from transformers.pytorch_utils import Conv1D
    info = base_layer(Conv1D(3, 5))  # GPT-2's layout: weight (in, out) = (5, 3)
    assert (info.in_features, info.out_features, info.fan_in_fan_out) == (5, 3, True)


def test_the_layer_reads_the_base_again_after_a_move():
    """BaseLayer is asked each time: after ``.to(dtype)`` a new adapter follows the base's new dtype."""
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    layer.base.to(torch.float64)
    layer.add_adapter("two", r=2)
    assert layer.lora_A["two"].dtype == torch.float64
