"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685): the layer, LoRA on a model, PEFT's file format.

    layer.py        LoRALinear, the readable forward and the fused one, what a base layer tells LoRA (BaseLayer)
    model.py        add_lora, named adapters, merge_lora / unmerge_lora / switch_adapter, delete, count
    peft_format.py  save_adapter / load_adapter / read_adapter (checked, the model unchanged) in PEFT's format
                    (adapter_config.json + adapter_model.safetensors)
"""
from .layer import BaseLayer, LoRALinear, base_layer, is_linear, lora_forward, lora_forward_fused
from .model import (active_adapter, add_lora, adapter_names, check_lora_targets, count_trainable, delete_adapter,
                    disable_adapters, find_targets, linear_names, lora_layers, merge_and_unload, merge_lora,
                    merged_adapter, output_head_name, select, set_adapter, switch_adapter, unmerge_lora)
from .peft_format import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_config, load_adapter, read_adapter,
                          read_adapter_files, save_adapter)

__all__ = ["BaseLayer", "LoRALinear", "base_layer", "is_linear", "lora_forward", "lora_forward_fused",
           "active_adapter", "add_lora", "adapter_names", "check_lora_targets", "count_trainable", "delete_adapter",
           "disable_adapters", "find_targets", "linear_names", "lora_layers", "merge_and_unload", "merge_lora",
           "merged_adapter", "output_head_name", "select", "set_adapter", "switch_adapter", "unmerge_lora",
           "CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_config", "load_adapter", "read_adapter",
           "read_adapter_files", "save_adapter"]
