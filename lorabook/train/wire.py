"""Bytes on the wire: what data parallelism sends per optimizer step, counted at the collectives and computed.

    counter = WireCounter(world)
    counter.attach(net)            # a DDP module (a comm hook) or an FSDP2 model (its custom comms)
    ... one step ...
    counter.sent_per_rank()        # bytes each rank sent, for ring collectives

What travels (N ranks, ring algorithms: each rank sends (N-1)/N of the payload for an all-gather or a
reduce-scatter, twice that for an all-reduce):

    DDP        all-reduce of the trainable gradients, once a step:      2 · (N-1)/N · T · grad_bytes
    FSDP2      all-gather of every parameter, forward and again for the
               backward, for each of the step's M micro-batches
               (the root unit stays gathered between the two):         ≲ 2M · (N-1)/N · P · param_bytes
               + reduce-scatter of the trainable gradients, once:       (N-1)/N · T · grad_bytes

So under DDP only the trainable parameters' gradients move: LoRA sends ~0.1-1% of what full fine-tuning sends.
Under FSDP the frozen base travels too, every micro-batch -- it is what FSDP trades for storing 1/N of it; a
4-bit base (QLoRA, ``lorabook.train.fsdp``) makes that traffic ~4x smaller than a 16-bit one. ``ring_bytes``
is the formula, for models (7B, 65B) this machine cannot train; the counter measures the payloads a real run
hands to the collectives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_choice, check_int, check_number
from .distributed import STRATEGIES

__all__ = ["WireCounter", "ring_bytes"]


def ring_bytes(strategy: str, world: int, grad_bytes: float, param_bytes: float = 0,
               micro_batches: int = 1) -> float:
    """Bytes one rank sends per optimizer step (the formula above; FSDP counts every unit gathered twice).

    grad_bytes: the trainable parameters' gradients, in bytes (as reduced: fp32 for lorabook's adapters);
    param_bytes: every parameter as stored, frozen ones too (FSDP gathers them: a 4-bit base ~0.52 bytes per
    weight); micro_batches: the step's gradient-accumulation count (FSDP gathers for each)."""
    check_choice("strategy", strategy, STRATEGIES)
    check_int("world", world, low=1)
    check_number("grad_bytes", grad_bytes, low=0)
    check_number("param_bytes", param_bytes, low=0)
    check_int("micro_batches", micro_batches, low=1)
    share = (world - 1) / world
    if strategy == "ddp":
        return 2 * share * grad_bytes
    return 2 * micro_batches * share * param_bytes + share * grad_bytes


@dataclass
class WireCounter:
    """Payload bytes handed to each kind of collective since the last ``reset`` (this rank's view)."""
    world: int
    all_reduce: int = 0
    all_gather: int = 0  # bytes of the gathered (full) tensors
    reduce_scatter: int = 0  # bytes of the tensors before scattering
    calls: dict = field(default_factory=lambda: {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0})

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        setattr(self, kind, getattr(self, kind) + tensor.numel() * tensor.element_size())
        self.calls[kind] += 1

    def reset(self) -> None:
        self.all_reduce = self.all_gather = self.reduce_scatter = 0
        self.calls = dict.fromkeys(self.calls, 0)

    def sent_per_rank(self) -> float:
        """Bytes this rank sent, as ring collectives send them."""
        share = (self.world - 1) / self.world
        return 2 * share * self.all_reduce + share * (self.all_gather + self.reduce_scatter)

    def attach(self, net) -> "WireCounter":
        """Count ``net``'s gradient traffic: a DistributedDataParallel module (a comm hook that all-reduces and
        averages, as DDP's own does) or a ``fully_shard``-ed model (every FSDP unit's all-gather and reduce-scatter)."""
        from torch.nn.parallel import DistributedDataParallel
        if isinstance(net, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(process_group, bucket):
                self.add("all_reduce", bucket.buffer())
                return allreduce_hook(process_group, bucket)
            net.register_comm_hook(None, hook)
            return self
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in net.modules() if isinstance(m, FSDPModule)]
        if not units:
            raise TypeError(f"net must be a DistributedDataParallel module or a fully_shard-ed model, got "
                            f"{type(net).__name__}")
        gather, scatter = _fsdp_comms(self)
        for unit in units:
            unit.set_custom_all_gather(gather)
            unit.set_custom_reduce_scatter(scatter)
        return self


def _fsdp_comms(counter: WireCounter):
    """FSDP2's default all-gather and reduce-scatter, counting their payloads (torch exports the hooks that take
    them, ``set_custom_all_gather`` / ``set_custom_reduce_scatter``, but not these base classes)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counter.add("all_gather", output_tensor)
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counter.add("reduce_scatter", input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()
