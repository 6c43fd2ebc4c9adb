"""QA-LoRA: quantization-aware low-rank adaptation (Xu et al. 2023, https://arxiv.org/abs/2309.14717).

QLoRA's adapter does not survive merging: dequant(W4) + B A is a 16-bit matrix, and quantizing it again
(post-training quantization) loses accuracy (``lorabook.qlora.merge_qlora``). QA-LoRA changes the base and the
adapter so that the merge is exact and stays quantized.

The base is group-wise INT-k (``lorabook.quant.groupwise``): row o, input column i in group g(i) = i // L,

    Ŵ[o, i] = (q[o, i] − zero[o, g(i)]) · scale[o, g(i)]          q integer codes, scale fp16, zero fp32

The adapter sees the input pooled over each group of L columns, summed by default:

    pool(x)[g] = Σ_{i in group g} x[i]                               x (..., in) -> (..., G),  G = in / L
    y = Ŵ x + (α / r) · B A pool(x)                                  A (r, G), B (out, r) zeros

As a weight, the update is ΔW[o, i] = (α / r) · (B A)[o, g(i)]: one number per (row, group), the same for the L
columns of a group. A constant c added to a group only moves its zero point,

    (q − zero) · scale + c = (q − (zero − c / scale)) · scale

so ``merge`` returns a ``LinearGroupwise`` with the same codes and scales and zero' = zero − (α / r)(B A) / scale.
Hence "why zeros?": an offset per group is the only place a per-group constant can go, and it must stay a
float -- a k-bit integer zero point (GPTQ's packed qzeros) cannot hold zero − c / scale.

Pooling conventions. The authors' released code averages (``AvgPool1d(L)``; its ``merge.py`` subtracts
(α / r)(B A) / L / scale from the zero points): ``pool="mean"`` here. peft (>= 0.16, ``use_qalora=True``, GPTQ
layers only, no merge) multiplies the mean by G = in / L. lorabook's default, ``pool="sum"``, is the mean times
L. All three are one model up to a constant factor c on pool(x), which A absorbs (A_peft = A · c / G with c = L
for "sum", 1 for "mean"); they differ in how fast training moves the output. Adam's step is about the same size
for every parameter whatever its gradient's scale. With the sum, a step of A changes (B A pool(x)) by
Σ_i ΔA[:, g(i)] x[i], a sum over all in inputs as plain LoRA's does, so LoRA's learning rates carry over; with
the mean the pooled inputs are L times smaller, and so is every step's effect. Notebook 08 measures both.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_module, check_number
from ._io import write_folder
from .lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_files
from .lora.layer import check_lora_args
from .lora.model import find_targets
from .quant.groupwise import FLOAT_DTYPES, GroupQuantized, LinearGroupwise, check_bits, check_group_size

POOLS = ("sum", "mean")

__all__ = ["POOLS", "check_qalora_args", "group_pool", "QALoRALinear", "add_qalora", "merge_qalora", "qalora_layers",
           "save_qalora_adapter", "load_qalora_adapter"]


def check_qalora_args(r, alpha, dropout, in_features: int, out_features: int, group_size) -> int:
    """Raise ValueError unless a QA-LoRA adapter (r, alpha, dropout) fits a layer (in_features, out_features) in
    groups of ``group_size``; returns the number of groups G. A is (r, G), so r cannot exceed G."""
    check_group_size(group_size, in_features)
    check_lora_args(r, alpha, dropout, in_features, out_features)
    groups = in_features // group_size
    if r > min(groups, out_features):
        raise ValueError(f"r={r} exceeds min(groups, out_features)={min(groups, out_features)}: A is (r, in_features "
                         f"/ group_size) = (r, {in_features} / {group_size}); use r <= {min(groups, out_features)} "
                         "or smaller groups")
    return groups


def group_pool(x: torch.Tensor, group_size: int, pool: str = "sum") -> torch.Tensor:
    """The input summed (or averaged) over each group of ``group_size`` consecutive features: (..., in) -> (..., G)."""
    *lead, n = x.shape
    groups = x.reshape(*lead, n // group_size, group_size)  # (..., G, L)
    return groups.sum(-1) if pool == "sum" else groups.mean(-1)


class QALoRALinear(nn.Module):
    """A frozen group-wise INT-k linear layer plus a LoRA adapter on the input pooled over each group.

    ``qweight``, ``scales``, ``zeros``: the base's (``LinearGroupwise``) buffers. ``lora_A`` (r, in / L) starts
    Kaiming-uniform like nn.Linear's weight over in / L inputs, ``lora_B`` (out, r) at zero: training starts
    exactly at the quantized base. ``pool``: "sum" or "mean" over each group (module docstring)."""

    def __init__(self, base: LinearGroupwise, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 pool: str = "sum"):
        super().__init__()
        if not isinstance(base, LinearGroupwise):
            raise TypeError(f"base must be a lorabook.quant.groupwise.LinearGroupwise, got {type(base).__name__}")
        groups = check_qalora_args(r, alpha, dropout, base.in_features, base.out_features, base.group_size)
        self.pool = check_choice("pool", pool, POOLS)
        self.base = base.requires_grad_(False)
        self.r, self.lora_alpha, self.lora_dropout = r, float(alpha), float(dropout)
        self.scaling = alpha / r
        device = base.qweight.device
        A = torch.empty(r, groups, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A)  # (r, G)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32, r: int = 8, alpha: float = 16,
                    dropout: float = 0.0, compute_dtype: torch.dtype = torch.float32, pool: str = "sum"
                    ) -> "QALoRALinear":
        """Quantize ``linear`` group-wise (``LinearGroupwise.from_linear``) and put a QA-LoRA adapter on it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_bits(bits), check_qalora_args(r, alpha, dropout, linear.in_features, linear.out_features, group_size)
        check_choice("pool", pool, POOLS)
        return cls(LinearGroupwise.from_linear(linear, bits, group_size, compute_dtype), r, alpha, dropout, pool)

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    group_size = property(lambda self: self.base.group_size)
    bits = property(lambda self: self.base.bits)
    qweight = property(lambda self: self.base.qweight)
    scales = property(lambda self: self.base.scales)
    zeros = property(lambda self: self.base.zeros)

    @property
    def pool_factor(self) -> float:
        """What pool(x) multiplies each input by: 1 for the sum, 1 / L for the mean."""
        return 1.0 if self.pool == "sum" else 1.0 / self.group_size

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in): (α / r) · (B A)[o, g(i)] (/ L with the mean), constant over each group's L columns."""
        per_group = (self.lora_B @ self.lora_A) * (self.scaling * self.pool_factor)  # (out, G)
        return per_group.repeat_interleave(self.group_size, dim=1)

    def delta_zeros(self) -> torch.Tensor:
        """How much each zero point moves in the merge, (out, G) fp32: (α / r) · (B A) / scale (/ L with the mean)."""
        B, A = self.lora_B.detach().float(), self.lora_A.detach().float()
        return (B @ A) * (self.scaling * self.pool_factor) / self.scales.float()

    def merge(self) -> LinearGroupwise:
        """The merged layer: a new ``LinearGroupwise`` with this layer's ``qweight`` and ``scales`` (the same
        tensors) and zero points that absorbed the adapter. This layer is left as it was."""
        merged = GroupQuantized(self.qweight, self.scales, self.zeros - self.delta_zeros(), self.bits,
                                self.group_size)
        base = self.base
        return LinearGroupwise(merged, base.bias, base.compute_dtype).to(self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        result = self.base(x)  # (..., out)
        pooled = group_pool(F.dropout(x, self.lora_dropout, training=self.training).to(self.lora_A.dtype),
                            self.group_size, self.pool)  # (..., G)
        return result + (self.scaling * (pooled @ self.lora_A.T @ self.lora_B.T)).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, pool={self.pool!r}"


def qalora_layers(model: nn.Module) -> dict[str, QALoRALinear]:
    """path -> QALoRALinear."""
    check_module("model", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}


def add_qalora(model: nn.Module, bits: int = 4, group_size: int = 32, r: int = 8, alpha: float = 16,
               dropout: float = 0.0, target_modules="all-linear", compute_dtype: torch.dtype = torch.float32,
               pool: str = "sum") -> nn.Module:
    """Freeze ``model`` and replace each targeted ``nn.Linear`` (default: every one but the output head) by a
    ``QALoRALinear`` (in place); returns the model. ``lorabook.train``'s "qalora" method.

    Everything is checked first -- the settings, every target's type and in_features -- and every layer is
    quantized before any is swapped in, so an error leaves the model as it was."""
    check_module("model", model)
    bits, _ = check_bits(bits), check_group_size(group_size)
    check_number("dropout", dropout, 0, 1, high_open=True)
    check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
    check_choice("pool", pool, POOLS)
    names = find_targets(model, target_modules)
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name} is a {type(module).__name__}; QA-LoRA quantizes nn.Linear layers only")
        try:
            check_qalora_args(r, alpha, dropout, module.in_features, module.out_features, group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for name in names:
        try:
            layers[name] = QALoRALinear.from_linear(model.get_submodule(name), bits, group_size, r, alpha, dropout,
                                                    compute_dtype, pool)
        except ValueError as e:  # the settings are checked above: this is the layer's weight
            raise ValueError(f"{name}.weight: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return model


def merge_qalora(model: nn.Module) -> nn.Module:
    """Replace every ``QALoRALinear`` by its merged ``LinearGroupwise`` (in place); returns the model. The merged
    model has the same integer codes and scales: it is still exactly INT-k, with no adapter left."""
    layers = qalora_layers(model)
    if not layers:
        raise ValueError("model has no QALoRALinear layers: add_qalora first (or it is merged already)")
    merged = {name: layer.merge() for name, layer in layers.items()}  # all computed before any is swapped in
    for name, layer in merged.items():
        model.set_submodule(name, layer)
    return model


# ---- the adapter on disk: PEFT's LoRA format with use_qalora ------------------------------------------------

def save_qalora_adapter(model: nn.Module, directory) -> Path:
    """Write the QA-LoRA adapter as a PEFT adapter folder (``use_qalora: true``, ``qalora_group_size``); returns
    the folder. A is written in peft's convention, A_peft = A · c / G (peft multiplies the group mean by
    G = in / L; c = L for pool "sum", 1 for "mean"), so peft's forward computes what this model computes; both
    files are written as one unit."""
    from safetensors.torch import save_file

    layers = qalora_layers(model)
    if not layers:
        raise ValueError("model has no QALoRALinear layers; nothing to save (add_qalora first)")
    settings = {(m.r, m.lora_alpha, m.lora_dropout, m.group_size) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the QA-LoRA layers differ in (r, alpha, dropout, group_size): {sorted(settings)}; "
                         "PEFT's format has one of each")
    r, alpha, dropout, group_size = settings.pop()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted({p.rsplit(".", 1)[-1] for p in layers}), "bias": "none",
              "use_qalora": True, "qalora_group_size": group_size, "fan_in_fan_out": False, "use_rslora": False}
    tensors = {}
    for path, m in layers.items():
        to_peft = m.pool_factor * m.group_size / (m.in_features // m.group_size)  # c / G
        tensors[f"{PREFIX}{path}.lora_A.weight"] = (m.lora_A.detach() * to_peft).contiguous().cpu()  # (r, G)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()  # (out, r)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return write_folder(Path(directory), {
        WEIGHTS_NAME: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
        CONFIG_NAME: lambda tmp: tmp.write_text(text, encoding="utf-8")})


def load_qalora_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a QA-LoRA adapter folder into a model from ``add_qalora`` (in place; returns it).

    Everything is checked before anything changes: the files, the group size (an adapter's A has one column per
    group, so it only fits a base quantized in groups of the same size), r and alpha, every key and shape."""
    layers = qalora_layers(model)
    if not layers:
        raise ValueError("model has no QALoRALinear layers: add_qalora first, with the adapter's bits and group size")
    config, tensors = read_adapter_files(directory, qalora=True)
    group_size = config["qalora_group_size"]
    sizes = sorted({m.group_size for m in layers.values()})
    if sizes != [group_size]:
        raise ValueError(f"the adapter was trained on a base quantized in groups of {group_size}; this model's "
                         f"QA-LoRA layers use groups of {sizes}: quantize the base with group_size={group_size}")
    expected = {}
    for path, m in layers.items():
        expected[f"{PREFIX}{path}.lora_A.weight"] = (m.r, m.in_features // m.group_size)
        expected[f"{PREFIX}{path}.lora_B.weight"] = (m.out_features, m.r)
        if (config["r"], float(config["lora_alpha"])) != (m.r, m.lora_alpha):
            raise ValueError(f"adapter has r={config['r']}, lora_alpha={config['lora_alpha']}; {path} has "
                             f"r={m.r}, alpha={m.lora_alpha}: add_qalora with the adapter's r and alpha")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter keys do not match the model's QA-LoRA layers: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    with torch.no_grad():
        for path, m in layers.items():
            to_peft = m.pool_factor * m.group_size / (m.in_features // m.group_size)
            m.lora_A.copy_(tensors[f"{PREFIX}{path}.lora_A.weight"] / to_peft)  # back from peft's convention
            m.lora_B.copy_(tensors[f"{PREFIX}{path}.lora_B.weight"])
    return model

