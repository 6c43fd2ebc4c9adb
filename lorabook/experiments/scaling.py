"""Scaling out on SmolLM2: what each of 2 gloo processes stores and sends per step, DDP vs FSDP2, full FT vs LoRA
vs QLoRA. Notebook 07's last section, written to data/scaling_out.json.

Every run is ``torchrun --nproc_per_node 2 -m lorabook.train`` (``lorabook.train.torchrun_command``) for
``STEPS`` steps on this machine's CPUs; ``lorabook.train`` records per step the bytes rank 0 sent
(``lorabook.train.wire.WireCounter``: the payloads handed to the collectives, as ring collectives send them) and
what rank 0 stores (``lorabook.train.fsdp.local_bytes``: its parameters, gradients, AdamW moments and buffers --
under FSDP its shards), and rank 0's peak in step 2 by torch's trackers (``--track-memory``: FSDPMemTracker under
FSDP, MemTracker otherwise). The same settings in one process give what a whole replica stores.

    python -m lorabook.experiments scaling     # ~5 minutes: 6 two-process runs and 3 one-process runs

QLoRA runs with torch's AdamW here (``--strategy fsdp`` does not take the paged one), an NF4 base with bf16
compute and the LoRA adapters in fp32, as everywhere in lorabook.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from . import DATA, file_command

__all__ = ["SCALING_OUT", "METHODS", "STEPS", "COMMON", "run", "scaling", "cli"]
SCALING_OUT = DATA / "scaling_out.json"
STEPS = 2
COMMON = ["--model", "smollm2", "--steps", str(STEPS), "--batch-size", "2", "--grad-accum", "1", "--max-len", "128",
          "--warmup", "0", "--eval-n", "1", "--max-new-tokens", "2", "--no-before", "--no-progress", "--threads", "1",
          "--track-memory"]
METHODS = {  # the lessons' settings: full FT (lr 1e-4), LoRA on W_q, W_v (r 8), QLoRA on every linear layer (r 8)
    "full": ["--method", "full", "--lr", "1e-4"],
    "lora": ["--method", "lora", "--targets", "q_proj,v_proj", "--rank", "8"],
    "qlora": ["--method", "qlora", "--targets", "all-linear", "--rank", "8", "--lr", "2e-4"],
}
KEEP = ("trainable_params", "total_params", "loss_curve", "wire_bytes_per_step", "stored_bytes", "peak_bytes",
        "train_wall_time_s")


def run(method: str, strategy: str | None, folder: Path) -> dict:
    """One run of ``method``: under torchrun with ``strategy`` ("ddp" or "fsdp"), or in one process (None)."""
    args = [*COMMON, *METHODS[method], "--results", folder / f"{method}-{strategy}.json"]
    if strategy is None:
        from ..train.__main__ import main
        result = main([str(a) for a in args])
    else:
        from ..train import torchrun_command
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(torchrun_command(2, [*args, "--strategy", strategy]), env=env, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"torchrun {method} {strategy} failed:\n{done.stderr[-3000:]}")
        result = json.loads((folder / f"{method}-{strategy}.json").read_text())
    return {k: result[k] for k in KEEP}


def scaling() -> dict:
    """Every method in one process, and with 2 processes under DDP and under FSDP2."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            for strategy in (None, "ddp", "fsdp"):
                name = f"{method}/{strategy or 'one'}"
                runs[name] = run(method, strategy, Path(tmp))
                print(f"{name}: sent {runs[name]['wire_bytes_per_step']} bytes per step", flush=True)
    return dict(command="python -m lorabook.experiments scaling", world=2, steps=STEPS, common=COMMON,
                methods=METHODS, runs=runs)


def cli(args) -> bool:
    """``python -m lorabook.experiments scaling``: runs ``scaling`` into SCALING_OUT; True when nothing is left."""
    def report(result):
        return "\n".join(f"{name:<12} sent/step {r['wire_bytes_per_step'][0] / 1e6:9.2f} MB   stored "
                         f"{sum(r['stored_bytes'][0].values()) / 1e6:9.1f} MB" for name, r in result["runs"].items())
    return file_command(args, "scaling", f"{len(METHODS)} methods x (1 process, ddp, fsdp)", scaling, SCALING_OUT,
                        report)
