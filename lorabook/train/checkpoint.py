"""Training checkpoints: one safetensors file that lets a run resume and reproduce the same loss curve.

What must come back for the curve to continue bit for bit: the trainable weights, AdamW's two moments and
step per tensor, its hyper-parameters, the random-number state (dropout, data order) and the loop's own
state (step, history). Everything is a tensor in ``checkpoint.safetensors`` or JSON in its metadata: no
pickle. Writes go to a temporary file and are renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CKPT_NAME = "checkpoint.safetensors"


def save_checkpoint(path: Path | str, params: dict, optimizer, state: dict) -> Path:
    """Write ``path/checkpoint.safetensors`` atomically: weights, AdamW moments and RNG as tensors, ``state``
    (JSON-able) and the optimizer's hyper-parameters as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for i, slots in opt["state"].items():  # i: the parameter's position in the optimizer
        for key, value in slots.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"trainer_state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    target, tmp = path / CKPT_NAME, path / (CKPT_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, target)  # atomic on POSIX and Windows
    return target


def load_checkpoint(path: Path | str, params: dict, optimizer) -> dict:
    """Restore what ``save_checkpoint`` wrote into ``params`` and ``optimizer`` (and the RNG); return the state."""
    from safetensors import safe_open

    file = Path(path) / CKPT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {file}")
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    problems = [f"missing {n}" for n in params if n not in saved]
    problems += [f"unexpected {n}" for n in saved if n not in params]
    problems += [f"{n}: shape {tuple(saved[n].shape)} != {tuple(p.shape)}"
                 for n, p in params.items() if n in saved and saved[n].shape != p.shape]
    if problems:
        raise ValueError(f"checkpoint {file} does not fit the model's trainable parameters: {problems[:8]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, slot = key.split(".", 2)
            state.setdefault(int(i), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads(meta["trainer_state"])
