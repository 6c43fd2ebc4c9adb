"""FSDP2 for the training loop: every rank keeps 1/N of the parameters, gradients and AdamW moments.

    model = shard(model)       # under torchrun, WORLD_SIZE = N > 1; in place

ZeRO stage 3 (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054) as torch's FSDP2 does it
(``torch.distributed.fsdp.fully_shard``): each decoder layer, and then the rest of the model (embeddings, final
norm, head), is one unit. A parameter of shape (d0, ...) becomes a DTensor whose local shard is rows
[r·⌈d0/N⌉, (r+1)·⌈d0/N⌉) on rank r (the last shard padded). Before a unit's forward its shards are all-gathered
into the full tensors, which are freed after it and gathered again for its backward; its gradients are
reduce-scattered (averaged) so each rank holds the gradient of its own shard, and AdamW updates only that.
Per rank, of P parameters (T trainable):

    stored:  P/N parameters + T/N gradients + 2·T/N AdamW moments (fp32)
    sent:    all-gather 2 · (N-1)/N · P·bytes (forward and backward) + reduce-scatter (N-1)/N · T·4 bytes

(``lorabook.train.wire`` measures the second line). A frozen base still travels: FSDP saves memory, not bytes.

QLoRA and QA-LoRA. FSDP1 flattens a unit into one tensor of one dtype, so bitsandbytes stores 4-bit codes in a
float-typed tensor (``quant_storage``) to let FSDP shard them. FSDP2 shards parameter by parameter, any dtype,
but only parameters: lorabook's ``LinearNF4`` and ``LinearGroupwise`` keep their codes and constants as buffers,
which FSDP would copy whole to every rank. ``shard`` re-registers them as frozen parameters
(``quantized_storage_as_parameters``; the names, and so the state_dict, stay the same), so each rank stores 1/N
of the quantized base too. The double-quant offset, one fp32 scalar, stays a buffer: fully_shard refuses 0-d
parameters.

Checkpoints are whole: saving gathers the shards (``full_tensor``, ``full_optimizer_state``), resuming cuts the
checked tensors into this rank's shards again (``shard_checkpoint``): a run stopped under FSDP resumes exactly
(tested), from the same whole-tensor file one process writes.

Not supported (each refused with a message): lorabook's paged and 8-bit optimizers (their state is laid out per
whole tensor), a model without a list of decoder layers, and trainable parameters of more than one dtype (FSDP2
reduces one dtype per unit).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.groupwise import LinearGroupwise
from ..quant.linear import LinearNF4

__all__ = ["decoder_layers", "check_shardable", "check_fsdp", "quantized_storage_as_parameters", "shard", "full_tensor",
           "full_optimizer_state", "shard_checkpoint", "local_bytes", "rank_step_peak"]

QUANTIZED_STORAGE = {  # the buffers FSDP should shard, per quantized layer type (all of dim 0 = out_features)
    LinearNF4: ("weight_packed", "weight_absmax", "weight_absmax_codes", "weight_absmax2"),  # not the 0-d offset
    LinearGroupwise: ("qweight", "scales", "zeros"),
}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its longest ``nn.ModuleList`` of modules of one class (a ValueError if none)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(b) for b in m}) == 1]
    if not lists:
        raise ValueError(f"strategy='fsdp' cannot shard this {type(model).__name__}: it has no nn.ModuleList of "
                         "decoder layers to make FSDP units of")
    return max(lists, key=len)


def check_shardable(model: nn.Module) -> nn.ModuleList:
    """What ``shard`` would refuse, checked before anything changes; returns the decoder layers."""
    layers = decoder_layers(model)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if len(dtypes) > 1:
        raise ValueError(f"strategy='fsdp' needs the trainable parameters in one dtype (FSDP2 reduce-scatters one "
                         f"dtype per unit), got {sorted(map(str, dtypes))}")
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"strategy='fsdp' cannot shard 0-d parameters (torch's fully_shard refuses them): {scalars}")
    return layers


def quantized_storage_as_parameters(model: nn.Module) -> int:
    """Re-register every ``LinearNF4``'s and ``LinearGroupwise``'s codes and constants (QUANTIZED_STORAGE) as frozen
    parameters, in place, so that FSDP shards them (lorabook's quant_storage); returns how many tensors moved.
    Names and values do not change."""
    moved = 0
    for module in model.modules():
        names = next((names for kind, names in QUANTIZED_STORAGE.items() if isinstance(module, kind)), ())
        for name in names:
            tensor = module._buffers.get(name)
            if tensor is not None:
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
                moved += 1
    return moved


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """``fully_shard`` each decoder layer and then the whole model over ``mesh`` (default: all ranks, the
    process group's device type), in place; returns the model. Needs torch.distributed started."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = check_shardable(model)
    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    quantized_storage_as_parameters(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's ``state_dict`` with every sharded state tensor gathered whole (collective), for a checkpoint
    that one process can read."""
    sd = optimizer.state_dict()
    state = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in slots.items()}
             for i, slots in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_checkpoint(checkpoint, params: dict, optimizer: torch.optim.Optimizer):
    """A ``read_checkpoint`` result (whole tensors, checked against the sharded ``params``' global shapes) with each
    weight and each moment cut to this rank's shard: ``distribute_tensor`` onto its parameter's mesh and placements
    (a collective: every rank, the same order). ``apply_checkpoint`` then loads it as it loads a whole one."""
    from dataclasses import replace

    from torch.distributed.tensor import distribute_tensor

    def like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if not hasattr(p, "device_mesh") or tuple(t.shape) != tuple(p.shape):  # a step count, or an unsharded one
            return t
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)

    mine = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: like(v, mine[i]) for k, v in slots.items()} for i, slots in checkpoint.optimizer["state"].items()}
    return replace(checkpoint, params={n: like(checkpoint.params[n], p) for n, p in params.items()},
                   optimizer={**checkpoint.optimizer, "state": state})


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank stores: {"params", "grads", "optimizer", "buffers"}; a DTensor counts its local shard only.
    Measure "grads" after a backward and before ``zero_grad``."""
    params = list(model.parameters())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()
                                          if isinstance(v, torch.Tensor)]
    size = lambda ts: sum(_local(t).numel() * _local(t).element_size() for t in ts)  # noqa: E731
    return dict(params=size(params), grads=size(p.grad for p in params if p.grad is not None),
                optimizer=size(state), buffers=size(model.buffers()))


def check_fsdp(model: nn.Module, optimizer: str) -> None:
    """The training loop's refusals for strategy="fsdp", before torch.distributed starts or anything changes."""
    if optimizer != "adamw":
        raise ValueError(f"strategy='fsdp' trains with optimizer='adamw' only, got {optimizer!r}: lorabook's paged "
                         "and 8-bit optimizers lay their state out per whole tensor, not per shard")
    check_shardable(model)


def rank_step_peak(step, model: nn.Module, optimizer, *inputs: torch.Tensor) -> dict[str, int]:
    """This rank's peak bytes by category over one call of ``step()``: torch's FSDPMemTracker for a fully_shard-ed
    ``model`` (sharded and unsharded parameters, all-gather and reduce-scatter buffers, ...), MemTracker
    (``lorabook.memory.step_peak``) for any other."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        from ..memory import step_peak
        return step_peak(step, model, *inputs, optimizer=optimizer)
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs(inputs)
    with tracker:
        step()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {})  # this rank's one device
    return {getattr(k, "value", str(k)): int(v) for k, v in snapshot.items()}
