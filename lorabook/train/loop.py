"""One training loop for every lesson: AdamW, grad accumulation, clipping, warmup + cosine, eval, checkpoint/resume.

    history = train(model, examples, tokenizer, steps=60, lr=2e-3, batch_size=8)

Only parameters with ``requires_grad`` train, so the same loop does LoRA, the baselines and full fine-tuning:
the method decides what is trainable (``prepare``), the loop never needs to know.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` examples. The loss is the mean over the
answer tokens of the whole step (each micro-batch's summed token loss is divided by the step's total token
count), so ``grad_accum=2, batch_size=4`` computes the same gradient as ``grad_accum=1, batch_size=8``.

Checkpoint/resume reproduces the loss curve bit for bit: one file ``checkpoint.safetensors`` holds the trainable
weights, AdamW's moments and the torch RNG state as tensors, and the rest (step, data position, config, history,
optimizer hyper-parameters) as JSON in the safetensors metadata. It is written to a temporary file and renamed,
so a crash never leaves a half-written checkpoint; a resume checks the whole checkpoint against the model, the
optimizer and the settings before it loads any of it. The learning rate is a pure function of the step, so the
schedule needs no state of its own. The data order is too: epoch e is a permutation seeded by (seed, e).

CLI (prints the loss curve and the exact-match accuracy before and after):
    python -m lorabook.train --method lora --model smollm2 --steps 60 --out runs/sql [--resume]

Under torchrun (``lorabook.train.distributed``), with WORLD_SIZE = N > 1, the model is wrapped in
DistributedDataParallel (``strategy="ddp"``) or sharded by FSDP2 (``strategy="fsdp"``, ``lorabook.train.fsdp``);
``batch_size`` stays the global micro-batch and each rank reads its batch_size / N examples of it
(DistributedSampler), the loss is normalised by the tokens of the whole global step, so N gloo processes reproduce
the one-process loss curve under either (tested). Rank 0 logs and checkpoints (FSDP gathers the shards for it
first); rank 0 evaluates, every rank under FSDP. Each step records the bytes this rank sent and stores
(``lorabook.train.wire``). Run on CPUs (gloo) here, not yet on GPUs (nccl).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import baselines, data, qalora, qlora
from .._checks import check_choice, check_flag, check_int, check_module, check_number, check_positive_int
from ..adamw8bit import AdamW8bit
from ..paged import PagedAdamW, PagedAdamW8bit
from .checkpoint import apply_checkpoint, read_checkpoint, save_checkpoint
from .distributed import STRATEGIES, distributed, gradient_sync, world_size, wrap
from .fsdp import check_fsdp, full_optimizer_state, full_tensor, local_bytes, rank_step_peak, shard_checkpoint
from .wire import WireCounter

SCHEDULES = ("cosine", "constant")


# ----------------------------------------------------------------------------------------------------------
# Which parameters train

def methods() -> tuple[str, ...]:
    """The fine-tuning methods ``prepare`` knows: lora, adapter_h, adapter_l, bitfit, prefix, full (the seed's
    Table 2, ``lorabook.baselines``), qlora (``lorabook.qlora.add_qlora``) and qalora
    (``lorabook.qalora.add_qalora``)."""
    return (*baselines.PREPARE_FUNCTIONS, "qlora", "qalora")


def prepare(model, method: str, **kwargs):
    """Make ``model`` train with ``method`` (in place; returns it): ``lorabook.baselines.prepare``, or for "qlora"
    ``lorabook.qlora.add_qlora`` (an NF4 base under LoRA), for "qalora" ``lorabook.qalora.add_qalora`` (a
    group-wise INT-k base, LoRA on group means). kwargs go to the method (e.g. lora: target_modules, r)."""
    if method == "qlora":
        return qlora.add_qlora(model, **kwargs)
    if method == "qalora":
        return qalora.add_qalora(model, **kwargs)
    return baselines.prepare(model, method, **kwargs)


def trainable_parameters(model) -> dict:
    """name -> parameter for every trainable parameter (each tensor once, as ``named_parameters`` gives it)."""
    check_module("model", model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters: prepare it with a method first")
    return params


# ----------------------------------------------------------------------------------------------------------
# Schedule, data order, loss

def lr_at(step: int, lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine down to lr·min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or steps <= warmup_steps:
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)  # 0 -> 1
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(n: int, batch_size: int, micro: int, seed: int, world: int = 1, rank: int = 0) -> list[int]:
    """Example indices of rank ``rank``'s ``batch_size`` examples of micro-batch number ``micro`` (0-based, counted
    over the run): a pure function, so resuming at any micro-batch sees the same data; the ``world`` ranks' parts
    together are the one-process micro-batch of world · batch_size examples. Epoch e shuffles with
    DistributedSampler(seed) at epoch e."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_epoch = sampler.num_samples // batch_size  # full batches only; the rest wait for the next epoch
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {sampler.num_samples} examples per rank")
    sampler.set_epoch(micro // per_epoch)
    k = micro % per_epoch
    return list(sampler)[k * batch_size:(k + 1) * batch_size]


def token_loss_sum(model, batch: dict, net=None) -> torch.Tensor:
    """Sum over answer tokens of the next-token cross-entropy (a scalar); labels -100 count nothing.

    The output head (576 -> 49152 for SmolLM2, a fifth of the model's compute) runs only at the positions
    whose next token is scored, via transformers' ``logits_to_keep``; ``net`` is ``model`` or its DDP wrapper.
    """
    net = model if net is None else net
    targets = batch["labels"][:, 1:]  # (b, s-1): token t+1 is the target of position t
    keep = (targets != data.IGNORE).any(0).nonzero().squeeze(1)  # (k,) positions scored in some row
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = net(**inputs, logits_to_keep=keep).logits  # (b, k, V)
    else:
        logits = net(**inputs).logits[:, keep]  # (b, k, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                           ignore_index=data.IGNORE, reduction="sum")


@torch.no_grad()
def validate(model, tokenizer, examples: list[dict], batch_size: int = 8, max_len: int = 256,
             accuracy: bool = True, max_new_tokens: int = 40, progress: bool = False) -> dict:
    """{"val_loss": mean answer-token loss (teacher forcing), "accuracy": exact match of greedy answers}."""
    check_module("model", model)
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = _to(data.collate(examples[s:s + batch_size], tokenizer, max_len), device)
        total += token_loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != data.IGNORE).sum())
    point = {"val_loss": total / max(count, 1)}
    if accuracy:
        point["accuracy"] = data.evaluate(model, tokenizer, examples, max_new_tokens, max(batch_size, 16),
                                          progress=progress)
    model.train(was_training)
    return point


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# History and checkpoints

@dataclass
class History:
    """What a run measured. ``loss[i]`` is the mean answer-token loss of optimizer step ``step[i]`` (1-based)."""
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # non-padding tokens the step processed
    seconds: list = field(default_factory=list)  # wall time of the step: forward, backward, update
    eval: list = field(default_factory=list)  # {"step", "val_loss", ["accuracy"]}
    wire_bytes: list = field(default_factory=list)  # bytes this rank sent in the step (ring collectives; 1 rank: 0)
    stored_bytes: list = field(default_factory=list)  # {params, grads, optimizer, buffers}: this rank's, at the update
    peak_bytes: list = field(default_factory=list)  # track_memory: this rank's peak by category in one step

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / max(sum(self.seconds), 1e-9)

    @property
    def wall_time_s(self) -> float:
        return sum(self.seconds)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "wall_time_s": self.wall_time_s}


# ----------------------------------------------------------------------------------------------------------
# The loop

TRAIN_OPTIMIZERS = {"adamw": torch.optim.AdamW, "paged_adamw": PagedAdamW, "adamw8bit": AdamW8bit,
                    "paged_adamw8bit": PagedAdamW8bit}


def make_optimizer(params: dict, lr: float, weight_decay: float, optimizer: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decay only matrices (not biases, norms or other vectors).

    optimizer: "adamw" (torch's), "paged_adamw" (``lorabook.paged.PagedAdamW``: the same numbers, state in pages),
    "adamw8bit" (``lorabook.adamw8bit.AdamW8bit``: m and v in 8 bits, bitsandbytes' numbers) or "paged_adamw8bit"
    (``lorabook.paged.PagedAdamW8bit``: those, in pages)."""
    check_choice("optimizer", optimizer, tuple(TRAIN_OPTIMIZERS))
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return TRAIN_OPTIMIZERS[optimizer]([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def train(model, train_data, tokenizer, *, steps: int, lr: float = 2e-3, batch_size: int = 8,
          grad_accum: int = 1, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
          warmup_steps: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.0, max_len: int = 256,
          eval_every: int = 0, eval_examples: list[dict] | None = None, eval_accuracy: bool = True,
          max_new_tokens: int = 40, checkpoint_dir: Path | str | None = None, checkpoint_every: int = 0,
          resume: bool = False, stop_after: int | None = None, seed: int = 0, log_every: int = 10,
          progress: bool = True, optimizer: str = "adamw", strategy: str = "ddp",
          track_memory: bool = False) -> History:
    """Train the trainable parameters of ``model`` for ``steps`` optimizer steps; return the History.

    batch_size: examples per micro-batch -- under torchrun over all ranks (it must divide by the world size).
    train_data: dataset examples (``data.load_split``) or (prompt, answer) dicts, batched here in a seeded
        order; or any re-iterable of ready batches (dicts of input_ids, attention_mask, labels), e.g. a
        DataLoader -- on resume its first batches are skipped, exact if its order is deterministic.
    eval_every: every so many steps (and at the end) record the loss on ``eval_examples`` and, with
        ``eval_accuracy``, their exact-match accuracy by greedy generation.
    optimizer: a name of ``TRAIN_OPTIMIZERS`` (``make_optimizer``).
    strategy: under torchrun, "ddp" (every rank a whole replica; gradients all-reduced) or "fsdp" (FSDP2: each rank
        stores 1/N of parameters, gradients and moments; ``lorabook.train.fsdp``, optimizer "adamw" only).
    track_memory: run the second step (the optimizer's state exists by then) under torch's memory tracker
        (FSDPMemTracker under FSDP, else MemTracker; ``fsdp.rank_step_peak``): ``History.peak_bytes``.
    checkpoint_dir: save there at the end (and every ``checkpoint_every`` steps); ``resume=True`` continues
        from its checkpoint and must be given the same settings (the checkpoint is checked whole -- weights,
        optimizer state, metadata, settings -- before any of it is loaded). stop_after: stop after that step (as if the
        job were killed) while the schedule still runs to ``steps``.
    """
    check_module("model", model)
    for name, value in dict(steps=steps, batch_size=batch_size, grad_accum=grad_accum).items():
        check_positive_int(name, value)
    check_int("max_len", max_len, low=2)
    for name, value in dict(warmup_steps=warmup_steps, eval_every=eval_every, checkpoint_every=checkpoint_every,
                            log_every=log_every, max_new_tokens=max_new_tokens, seed=seed).items():
        check_int(name, value, low=0)
    check_number("lr", lr, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, low=0, low_open=True)
    check_choice("optimizer", optimizer, TRAIN_OPTIMIZERS)  # before anything starts (and torch.distributed)
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("strategy", strategy, STRATEGIES)
    check_number("min_lr_ratio", min_lr_ratio, low=0, high=1)
    for name, value in dict(resume=resume, progress=progress, eval_accuracy=eval_accuracy,
                            track_memory=track_memory).items():
        check_flag(name, value)
    if stop_after is not None:
        check_int("stop_after", stop_after, low=1, high=steps)
    if track_memory and grad_accum > 1:
        raise ValueError("track_memory=True needs grad_accum=1: torch's memory trackers follow one forward per step")
    if eval_every and not eval_examples:
        raise ValueError("eval_every > 0 needs eval_examples")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if isinstance(train_data, (list, tuple)) and not train_data:
        raise ValueError("train_data must not be empty")
    examples = isinstance(train_data, (list, tuple)) and "input_ids" not in train_data[0]  # else: batches
    config = dict(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                  weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
                  min_lr_ratio=min_lr_ratio, max_len=max_len, seed=seed, optimizer=optimizer)

    world = world_size()  # before torch.distributed starts
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by the world size {world} (torchrun's "
                         "processes): each rank takes batch_size / world examples of every micro-batch")
    per_rank = batch_size // world
    if examples:  # a batch_size the data cannot fill fails here, before the model or the RNG changes
        batch_indices(len(train_data), per_rank, 0, seed, world, 0)
    if world > 1 and strategy == "fsdp":  # what FSDP cannot do, refused before torch.distributed starts
        check_fsdp(model, optimizer)
    world, rank, local = distributed()
    net = wrap(model, strategy, local) if world > 1 else model  # FSDP: model's parameters are now its shards
    params = trainable_parameters(model)
    opt = make_optimizer(params, lr, weight_decay, optimizer)
    history, start = History(), 0
    if resume:  # read and check the whole checkpoint (and the history, the step) before anything is loaded
        checkpoint = read_checkpoint(checkpoint_dir, params, opt, config)
        history, start = _resumed_history(checkpoint.file, checkpoint.state, steps)
        if world > 1 and strategy == "fsdp":  # the whole tensors, cut to this rank's shards
            checkpoint = shard_checkpoint(checkpoint, params, opt)
        apply_checkpoint(checkpoint, params, opt)
    else:
        torch.manual_seed(seed)  # dropout; the data order has its own seed
    device = next(model.parameters()).device
    wire = WireCounter(world).attach(net) if world > 1 else None
    sharded = world > 1 and strategy == "fsdp"  # then every rank must run every forward (it is a collective)

    def next_batch(micro: int) -> dict:
        if examples:
            idx = batch_indices(len(train_data), per_rank, micro, seed, world, rank)
            return data.collate([train_data[i] for i in idx], tokenizer, max_len)
        return next(stream)

    if not examples:  # an iterable of batches: cycle it, skipping what a resumed run already used
        stream = _cycle(train_data, skip=start * grad_accum)

    model.train()
    end = stop_after or steps
    bar = tqdm(range(start, end), desc="train", disable=not progress or rank != 0, initial=start, total=end)
    for step in bar:
        batches = [_to(next_batch(step * grad_accum + k), device) for k in range(grad_accum)]
        step_lr = lr_at(step, lr, steps, warmup_steps, schedule, min_lr_ratio)
        if wire:
            wire.reset()  # count this step's traffic only (an FSDP evaluation all-gathers too)
        run = lambda: optimizer_step(model, net, batches, opt, params, step_lr, max_grad_norm, world)  # noqa: E731
        if track_memory and step == min(start + 1, end - 1):  # steady state: the second step
            points = []
            history.peak_bytes.append(rank_step_peak(lambda: points.append(run()), net, opt, batches[0]["input_ids"]))
            point = points[0]
        else:
            point = run()
        point["wire_bytes"] = wire.sent_per_rank() if wire else 0
        for key, value in dict(step=step + 1, lr=step_lr, **point).items():
            getattr(history, key).append(value)
        rate = point["tokens"] / point["seconds"]
        bar.set_postfix(loss=f"{point['loss']:.4f}", lr=f"{step_lr:.2e}", tok_s=f"{rate:.0f}")
        done = step + 1  # optimizer steps taken
        if rank == 0 and log_every and (done % log_every == 0 or done == end):
            tqdm.write(f"step {done:5d}/{steps}  loss {point['loss']:.4f}  lr {step_lr:.2e}  "
                       f"grad_norm {point['grad_norm']:.3f}  {rate:.0f} tok/s")
        if (rank == 0 or sharded) and eval_every and (done % eval_every == 0 or done == steps):
            history.eval.append({"step": done, **validate(model, tokenizer, eval_examples, batch_size, max_len,
                                                          eval_accuracy, max_new_tokens, progress and rank == 0)})
            if rank == 0:
                tqdm.write(f"eval at step {done}: {history.eval[-1]}")
        if checkpoint_dir is not None and (done == end or checkpoint_every and done % checkpoint_every == 0):
            whole = {n: full_tensor(p) for n, p in params.items()} if sharded else params  # FSDP: gathered
            state = full_optimizer_state(opt) if sharded else opt
            if rank == 0:
                save_checkpoint(checkpoint_dir, whole, state, dict(step=done, config=config, history=asdict(history)))
    bar.close()
    model.eval()
    return history


def _resumed_history(file, state: dict, steps: int) -> tuple[History, int]:
    """The History and the step a checkpoint's trainer state resumes from (a ValueError naming the file if they are
    not what ``train`` saved)."""
    start = check_int(f"checkpoint {file}: step", state["step"], low=0, high=steps)
    try:
        history = History(**state["history"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {file}: trainer_state history is not a lorabook.train History ({e})") from None
    if not all(isinstance(v, list) for v in asdict(history).values()):
        raise ValueError(f"checkpoint {file}: every trainer_state history entry must be a list")
    return history, start


def optimizer_step(model, net, batches: list[dict], optimizer, params: dict, lr: float,
                   max_grad_norm: float | None, world: int = 1) -> dict:
    """One AdamW step over ``batches`` (the micro-batches); returns its loss, grad_norm, tokens and seconds.

    Each micro-batch's summed token loss is divided by the token count of the whole step, over all ranks, so the
    gradients add up to the gradient of the step's mean token loss however the step is split (over micro-batches
    or ranks). DDP averages the ranks' gradients, hence the factor ``world``."""
    t0 = time.perf_counter()
    n_tok = torch.tensor(sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in batches))  # answer tokens
    if world > 1:
        torch.distributed.all_reduce(n_tok)  # the global step's answer tokens
    n_tok = int(n_tok)
    loss = torch.zeros((), device=batches[0]["input_ids"].device)
    for k, batch in enumerate(batches):
        with gradient_sync(net, k == len(batches) - 1):  # DDP/FSDP reduce gradients on the last micro-batch only
            micro = token_loss_sum(model, batch, net) * world / max(n_tok, 1)
            micro.backward()
        loss += micro.detach()
    if world > 1:  # the global step's mean token loss: the ranks' parts, summed (each carried a factor world)
        torch.distributed.all_reduce(loss)
        loss /= world
    grads = [p for p in params.values() if p.grad is not None]
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(grads, max_grad_norm or float("inf")))  # before clipping
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    stored = local_bytes(model, optimizer)  # what this rank holds: its gradients (and moments) still exist
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # non-padding tokens
    return dict(loss=loss.item(), grad_norm=float(norm), tokens=tokens, seconds=time.perf_counter() - t0,
                stored_bytes=stored)


def _cycle(loader, skip: int = 0):
    """Batches of ``loader`` forever (a new pass, and ``set_epoch`` on its sampler, when one ends)."""
    epoch, seen = 0, 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            if seen >= skip:
                yield batch
            seen += 1
        if empty:
            raise ValueError("train_data yielded no batches")
        epoch += 1


# ----------------------------------------------------------------------------------------------------------
# The models the command line trains

def load_model(name: str, seed: int = 0, device="cpu"):
    """(model, tokenizer): "smollm2" (the base model) or "tiny" (a random 2-layer Llama, byte tokenizer)."""
    if name == "tiny":
        from ..models import byte_tokenizer, tiny_llama
        tok = byte_tokenizer()
        return tiny_llama(seed=seed, vocab_size=len(tok), max_seq_len=512).to(device), tok
    if name == "smollm2":
        from ..models import load_base_model
        return load_base_model("smollm2", device=device)
    raise ValueError(f"unknown model {name!r}; models: ['tiny', 'smollm2']")
