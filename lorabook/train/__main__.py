"""The command line of ``python -m lorabook.train``: score, train with ``lorabook.train.train``, score again."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import lorabook

from .. import data
from .._checks import check_positive_int
from .._io import write_text
from ..lora import count_trainable
from ..models import check_checkpointing, enable_checkpointing
from ..timing import torch_threads
from .checkpoint import CKPT_NAME
from .distributed import distributed
from .loop import History, load_model, methods, prepare, train
from .merge import check_merge, merge

OPTIONS = [  # (flag, type, default, help) of `python -m lorabook.train`
    ("--method", str, "lora", "lora, qlora (NF4 base + LoRA), qalora (group-wise INT-k base + LoRA on group means), "
     "adapter_h, adapter_l, bitfit, prefix or full"),
    ("--model", str, "smollm2", "smollm2 or tiny (a random 2-layer Llama, for smoke tests)"),
    ("--steps", int, 30, "optimizer steps"), ("--lr", float, 3e-3, "peak learning rate"),
    ("--rank", int, 8, "lora/qlora/qalora: rank r"),
    ("--alpha", float, 16, "lora/qlora/qalora: alpha (the scale is alpha/r)"),
    ("--targets", str, "q_proj,v_proj", "lora/qlora/qalora: comma-separated layer names, or all-linear"),
    ("--bits", int, 4, "qalora: bits per weight (2, 3, 4 or 8)"),
    ("--group-size", int, 32, "qalora: input columns per quantization group (a power of two >= 8)"),
    ("--pool", str, "sum", "qalora: the adapter sees each group's sum, or its mean (the authors' code)"),
    ("--optimizer", str, "adamw", "adamw, paged_adamw (lorabook.paged: the same updates, state in pages), adamw8bit "
     "(8-bit m and v, bitsandbytes' numbers) or paged_adamw8bit"),
    ("--bottleneck", int, 16, "adapter_h/adapter_l: bottleneck width"), ("--n-prefix", int, 16, "prefix: length"),
    ("--prefix-text", str, None, "prefix: start from this text's keys/values (its first n-prefix tokens), not noise"),
    ("--batch-size", int, 8, "examples per micro-batch, over all ranks under torchrun (each takes batch-size / world)"),
    ("--strategy", str, "ddp", "under torchrun: ddp (a whole replica per rank) or fsdp (FSDP2: each rank stores 1/N "
     "of parameters, gradients and AdamW moments; --optimizer adamw)"),
    ("--grad-accum", int, 1, "micro-batches per optimizer step"), ("--max-len", int, 160, "tokens per example"),
    ("--max-grad-norm", float, 1.0, "clip the gradient norm (0: no clipping)"),
    ("--weight-decay", float, 0.0, "AdamW weight decay"), ("--warmup", int, 3, "linear warmup steps"),
    ("--schedule", str, "cosine", "cosine or constant after the warmup"),
    ("--eval-every", int, 0, "val loss and accuracy every N steps (0: never)"),
    ("--eval-n", int, 100, "test examples scored before and after"),
    ("--max-new-tokens", int, 40, "generation length (the longest answer has 31 tokens)"),
    ("--out", str, None, "checkpoint folder"), ("--checkpoint-every", int, 10, "steps between checkpoints"),
    ("--stop-after", int, None, "stop after this step, as if killed (then --resume)"),
    ("--results", str, None, "write everything measured as JSON here"),
    ("--seed", int, 0, "seed of the adapter init, dropout and data order"),
    ("--ptq-bits", int, 0, "with --merge (lora/qlora): then quantize the merged model to group-wise INT-k (0: no)"),
    ("--ptq-group-size", int, 32, "with --ptq-bits: input columns per quantization group"),
    ("--threads", int, 0, "torch CPU threads (0: torch's default; 1 is faster on a busy machine)"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorabook.train", description=__doc__.split("\n")[0])
    for flag, kind, default, help_ in OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=f"{help_} (default: {default})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-before", action="store_true", help="skip scoring the model before training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--merge", action="store_true",
                   help="lora/qlora/qalora: merge the adapter before scoring after training (lorabook.train.merge)")
    p.add_argument("--ptq-nf4", action="store_true",
                   help="with --merge (qlora): then quantize the merged model to NF4 again (merge_qlora requantize)")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing of each decoder layer (qlora always checkpoints)")
    p.add_argument("--track-memory", action="store_true",
                   help="run step 2 under torch's memory tracker (FSDPMemTracker under --strategy fsdp): peak bytes")
    return p.parse_args(argv)


def method_kwargs(args, tokenizer=None) -> dict:
    """The CLI options that concern ``args.method``, as ``prepare`` takes them."""
    if args.method in ("lora", "qlora", "qalora"):
        targets = "all-linear" if args.targets == "all-linear" else tuple(args.targets.split(","))
        extra = {"qlora": dict(dropout=0.0),  # qlora's default is 0.05; lora's and qalora's are 0
                 "qalora": dict(bits=args.bits, group_size=args.group_size, pool=args.pool)}.get(args.method, {})
        return dict(target_modules=targets, r=args.rank, alpha=args.alpha, **extra)
    if args.method == "prefix" and args.prefix_text is not None:
        ids = tokenizer(args.prefix_text, add_special_tokens=False)["input_ids"]
        if len(ids) < args.n_prefix:
            raise ValueError(f"--prefix-text has {len(ids)} tokens, fewer than --n-prefix {args.n_prefix}")
        return dict(n_prefix=args.n_prefix, init_ids=torch.tensor(ids[:args.n_prefix]))
    return {"adapter_h": dict(bottleneck=args.bottleneck), "adapter_l": dict(bottleneck=args.bottleneck),
            "prefix": dict(n_prefix=args.n_prefix)}.get(args.method, {})


def main(argv=None) -> dict:
    """The CLI: score ``--eval-n`` test examples, train, score again; print and return (and save) the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.method not in methods():
        raise ValueError(f"unknown method {args.method!r}; methods: {list(methods())}")
    if args.resume and not (args.out and (Path(args.out) / CKPT_NAME).is_file()):
        raise FileNotFoundError(f"--resume needs a checkpoint at {Path(args.out or '.') / CKPT_NAME}; "
                                "run once without --resume (with --out) first")
    check_positive_int("eval_n", args.eval_n)
    with torch_threads(args.threads):  # restored after: this may run inside a notebook's process
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> dict:
    world, rank, local = distributed()
    device = f"cuda:{local}" if torch.cuda.is_available() else lorabook.device()
    torch.manual_seed(args.seed)  # the model's (and the adapter's) random init
    model, tok = load_model(args.model, args.seed, device)
    train_ex, test_ex = data.load_split("train"), data.load_split("test", n=args.eval_n)
    progress = not args.no_progress
    score = lambda show: _timed(data.predict, model, tok, test_ex, args.max_new_tokens, progress=show)  # noqa
    before, before_s = (None, 0.0) if args.no_before or rank else score(progress)
    if args.checkpointing and args.method != "qlora":
        check_checkpointing(model)  # before prepare changes the model
    if args.merge:  # before the run, so that a bad setting costs nothing
        if world > 1 and args.strategy == "fsdp":
            raise ValueError("--merge with --strategy fsdp: merge the saved adapter after the run instead")
        check_merge(model, args.method, args.ptq_bits, args.ptq_group_size, args.ptq_nf4)
    elif args.ptq_bits or args.ptq_nf4:
        raise ValueError("--ptq-bits / --ptq-nf4 quantize the merged model: add --merge")
    prepare(model, args.method, **method_kwargs(args, tok))
    if args.checkpointing and args.method != "qlora":
        enable_checkpointing(model)
    n_train, n_all = count_trainable(model)
    if rank == 0:
        print(f"{args.method} on {args.model}: {n_train:,} trainable of {n_all:,} parameters "
              f"({100 * n_train / n_all:.3f}%)")
    history = train(model, train_ex, tok, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm or None,
                    weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                    max_len=args.max_len, eval_every=args.eval_every, max_new_tokens=args.max_new_tokens,
                    eval_examples=data.load_split("val", n=args.eval_n) if args.eval_every else None,
                    checkpoint_dir=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                    stop_after=args.stop_after, seed=args.seed, progress=progress,
                    log_every=max(1, args.steps // 20), optimizer=args.optimizer, strategy=args.strategy,
                    track_memory=args.track_memory)
    sharded = world > 1 and args.strategy == "fsdp"
    if sharded:  # an FSDP forward is a collective: every rank scores (the same answers), rank 0 reports
        after, after_s = score(progress and not rank)
    if world > 1:  # every rank's collectives done before any rank tears gloo down (a rank leaving early can abort)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank:  # rank 0 scores and reports
        return {}
    merged = merge(model, args.method, args.ptq_bits, args.ptq_group_size, args.ptq_nf4) if args.merge else {}
    if not sharded:
        after, after_s = score(progress)
    result = dict(command="python -m lorabook.train " + " ".join(argv), settings=vars(args),
                  device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                  trainable_params=n_train, total_params=n_all, eval_split="test", eval_n=len(test_ex), **merged,
                  **report(history, test_ex, before, after, before_s + after_s))
    if args.results:
        _write_json(Path(args.results), result)
    return result


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def report(history: History, examples: list[dict], before: list[str] | None, after: list[str],
           eval_s: float) -> dict:
    """Print the loss curve and the accuracies before/after; return them as a JSON-able dict."""
    print("step   loss")
    for s, loss in list(zip(history.step, history.loss))[::max(1, len(history.loss) // 20)]:
        print(f"{s:5d}  {loss:.4f}")
    acc_before = None if before is None else data.accuracy(before, examples)
    acc_after = data.accuracy(after, examples)
    shown = "n/a" if acc_before is None else f"{acc_before:.1%}"
    print(f"exact match on {len(examples)} test examples: before {shown}, after {acc_after:.1%}; training "
          f"{history.wall_time_s:.0f} s ({history.tokens_per_s:.0f} tok/s), scoring {eval_s:.0f} s")
    predictions = [{"id": ex["id"], "question": ex["question"], "gold": ex["sql"],
                    **({} if before is None else {"before": before[i]}), "after": a,
                    "match": data.exact_match(a, ex["sql"])} for i, (ex, a) in enumerate(zip(examples, after))]
    return dict(accuracy_before=acc_before, accuracy_after=acc_after, train_wall_time_s=history.wall_time_s,
                eval_wall_time_s=eval_s, tokens_per_s=history.tokens_per_s, loss_curve=history.loss,
                lr_curve=history.lr, eval_points=history.eval, predictions=predictions,
                wire_bytes_per_step=history.wire_bytes, stored_bytes=history.stored_bytes[:1],  # rank 0's
                peak_bytes=history.peak_bytes,
                load_avg_1m=os.getloadavg()[0])  # other work on the machine slows the timings


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=1) + "\n")


def run() -> None:
    """Entry point of ``python -m lorabook.train``: bad input prints its message, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    run()
