"""Training checkpoints: one safetensors file that lets a run resume and reproduce the same loss curve.

What must come back for the curve to continue bit for bit: the trainable weights, AdamW's two moments (8-bit
AdamW: their codes and block absmax, nested one level down as bitsandbytes nests them) and step per tensor, its
hyper-parameters, the random-number state (dropout, data order) and the loop's own state (step, history).
Everything is a tensor in ``checkpoint.safetensors`` or JSON in its metadata: no pickle. The file is written as
one unit (``lorabook._io.write_file``: a temp file beside it, renamed into place), so a crash never leaves half a
checkpoint, and a failed save leaves the previous one loadable.

Loading is read, check, then change: ``read_checkpoint`` parses the whole file and checks it against the
trainable parameters (names, shapes, dtypes), the optimizer (its param_groups, and every state slot's shape; an
8-bit optimizer checks its own layout, ``check_state_dict``), the RNG state and the run's settings, changing
nothing; ``apply_checkpoint`` then writes it into the parameters, the optimizer and the RNG. A bad checkpoint
therefore raises with the model and the optimizer exactly as they were. ``load_checkpoint`` is the two in one call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._checks import check_int
from .._io import write_file

CKPT_NAME = "checkpoint.safetensors"
META_KEYS = ("trainer_state", "param_groups")  # JSON in the safetensors metadata
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")  # what every saved param group must give AdamW
ADAM_SLOTS = {"step", "exp_avg", "exp_avg_sq"}

__all__ = ["CKPT_NAME", "Checkpoint", "save_checkpoint", "read_checkpoint", "apply_checkpoint", "load_checkpoint"]


def save_checkpoint(path: Path | str, params: dict, optimizer, state: dict) -> Path:
    """Write ``path/checkpoint.safetensors`` atomically: weights, AdamW moments and RNG as tensors, ``state``
    (JSON-able) and the optimizer's hyper-parameters as metadata. ``optimizer``: the optimizer, or its state_dict
    (FSDP: ``lorabook.train.fsdp.full_optimizer_state``, gathered whole)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for i, slots in opt["state"].items():  # i: the parameter's position in the optimizer
        for key, value in slots.items():  # an 8-bit state nests its tensors one level down: optim.i.key.name
            for name, t in (value.items() if isinstance(value, dict) else [("", value)]):
                tensors[f"optim.{i}.{key}" + (f".{name}" if name else "")] = torch.as_tensor(t).cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"trainer_state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    return write_file(path / CKPT_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@dataclass
class Checkpoint:
    """A checkpoint read and checked against parameters and an optimizer; ``apply_checkpoint`` loads it."""
    file: Path
    params: dict[str, torch.Tensor]  # name -> saved weight
    optimizer: dict  # {"state": {index: {slot: tensor}}, "param_groups": [...]}: a torch state_dict
    rng_cpu: torch.Tensor
    state: dict  # the trainer's JSON: step, config, history, ...
    rng_cuda: list[torch.Tensor] = field(default_factory=list)


def _read(file: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not file.is_file():
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a bad file
        raise ValueError(f"{file} could not be read: truncated or corrupt ({type(e).__name__}: {e})") from None


def _metadata(file: Path, meta: dict) -> dict:
    parsed = {}
    for key in META_KEYS:
        if key not in meta:
            raise ValueError(f"checkpoint {file} has no {key!r} metadata (not written by lorabook.train?); "
                             f"it has {sorted(meta)}")
        try:
            parsed[key] = json.loads(meta[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {file}: metadata {key!r} is not valid JSON ({e})") from None
    state, groups = parsed["trainer_state"], parsed["param_groups"]
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {file}: trainer_state must be a JSON object with a 'step', got {state!r:.80}")
    check_int(f"checkpoint {file}: trainer_state step", state["step"], low=0)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                              and all(k in g for k in GROUP_KEYS) for g in groups):
        raise ValueError(f"checkpoint {file}: param_groups must be a list of optimizer groups, each with "
                         f"'params' and {list(GROUP_KEYS)}; got {groups!r:.120}")
    return parsed


def _check_params(file: Path, saved: dict, params: dict) -> None:
    problems = [f"missing {n}" for n in params if n not in saved]
    problems += [f"unexpected {n}" for n in saved if n not in params]
    for n, p in params.items():
        if n in saved and (saved[n].shape != p.shape or saved[n].dtype != p.dtype):
            problems.append(f"{n}: {saved[n].dtype} {tuple(saved[n].shape)} != {p.dtype} {tuple(p.shape)}")
    if problems:
        raise ValueError(f"checkpoint {file} does not fit the model's trainable parameters: {problems[:8]}")


def _optimizer_state(file: Path, tensors: dict, groups: list, optimizer) -> dict:
    """The saved optimizer state, checked against ``optimizer``'s groups and parameters."""
    mine = [p for g in optimizer.param_groups for p in g["params"]]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"checkpoint {file}: the saved optimizer has param groups of {sizes} parameters, this one "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    if [i for g in groups for i in g["params"]] != list(range(len(mine))):
        raise ValueError(f"checkpoint {file}: param_groups' parameter indices are not 0..{len(mine) - 1}")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, _, slot = key[len("optim."):].partition(".")
            if not index.isdigit() or not slot:
                raise ValueError(f"checkpoint {file}: tensor {key!r} is not optim.<index>.<slot>")
            slot, _, name = slot.partition(".")
            entry = state.setdefault(int(index), {})
            if name:
                entry.setdefault(slot, {})[name] = value
            else:
                entry[slot] = value
    if hasattr(optimizer, "check_state_dict"):  # AdamW8bit and PagedAdamW8bit check their own (8-bit) layout
        try:
            optimizer.check_state_dict({"state": state, "param_groups": groups})
        except ValueError as e:
            raise ValueError(f"checkpoint {file}: the optimizer state does not fit this optimizer: {e}") from None
        return state
    problems, slots = [], {frozenset(s) for s in state.values()}
    if len(slots) > 1:
        problems.append(f"the parameters have different state slots: {sorted(sorted(s) for s in slots)}")
    for i, entry in sorted(state.items()):
        if i >= len(mine):
            problems.append(f"state for parameter {i}, but the optimizer has {len(mine)} parameters")
            continue
        if "betas" in optimizer.defaults and not ADAM_SLOTS <= set(entry):
            problems.append(f"parameter {i}: slots {sorted(entry)} lack {sorted(ADAM_SLOTS - set(entry))}")
        for slot, t in entry.items():
            want = () if slot == "step" else tuple(mine[i].shape)
            if tuple(t.shape) != want and not (slot == "step" and t.numel() == 1):
                problems.append(f"parameter {i} {slot}: shape {tuple(t.shape)}, expected {want}")
    if problems:
        raise ValueError(f"checkpoint {file}: the optimizer state does not fit this optimizer: {problems[:8]}")
    return state


def _rng(file: Path, tensors: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cpu = tensors.get("rng.cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise ValueError(f"checkpoint {file}: rng.cpu must be the {tuple(torch.get_rng_state().shape)} uint8 CPU "
                         f"random state, got {None if cpu is None else (cpu.dtype, tuple(cpu.shape))}")
    devices = sorted(int(k[len("rng.cuda."):]) for k in tensors
                     if k.startswith("rng.cuda.") and k[len("rng.cuda."):].isdigit())
    cuda = [tensors[f"rng.cuda.{i}"] for i in devices]  # device 0, 1, ...
    if any(s.dtype != torch.uint8 or s.dim() != 1 for s in cuda):
        raise ValueError(f"checkpoint {file}: rng.cuda.* must be 1-D uint8 random states")
    return cpu, cuda


def read_checkpoint(path: Path | str, params: dict, optimizer, config: dict | None = None) -> Checkpoint:
    """Read ``path/checkpoint.safetensors`` and check all of it against ``params`` (name -> parameter),
    ``optimizer`` and, if given, the run's ``config`` (it must equal the saved one key by key); changes nothing."""
    file = Path(path) / CKPT_NAME
    meta, tensors = _read(file)
    parsed = _metadata(file, meta)
    known = [k for k in tensors if k.startswith(("param.", "optim.", "rng."))]
    if len(known) != len(tensors):
        raise ValueError(f"checkpoint {file} has tensors lorabook.train does not write: "
                         f"{sorted(set(tensors) - set(known))[:8]}")
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    _check_params(file, saved, params)
    state = _optimizer_state(file, tensors, parsed["param_groups"], optimizer)
    rng_cpu, rng_cuda = _rng(file, tensors)
    trainer = parsed["trainer_state"]
    if config is not None:
        saved_config = trainer.get("config")
        if not isinstance(saved_config, dict):
            raise ValueError(f"checkpoint {file}: trainer_state has no config to compare the settings with")
        changed = {k: (saved_config.get(k), v) for k, v in config.items() if saved_config.get(k) != v}
        if changed:
            raise ValueError(f"resume with different settings than the checkpoint {file} (saved, now): {changed}")
    return Checkpoint(file=file, params=saved, optimizer={"state": state, "param_groups": parsed["param_groups"]},
                      rng_cpu=rng_cpu, rng_cuda=rng_cuda, state=trainer)


def apply_checkpoint(checkpoint: Checkpoint, params: dict, optimizer) -> dict:
    """Load a ``read_checkpoint`` result into ``params``, ``optimizer`` and the RNG; return the trainer state."""
    optimizer.load_state_dict(checkpoint.optimizer)  # first: it is the one torch could still refuse
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(checkpoint.params[n])
    torch.set_rng_state(checkpoint.rng_cpu)
    if checkpoint.rng_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint.rng_cuda[:torch.cuda.device_count()])
    return checkpoint.state


def load_checkpoint(path: Path | str, params: dict, optimizer, config: dict | None = None) -> dict:
    """Restore what ``save_checkpoint`` wrote into ``params`` and ``optimizer`` (and the RNG); return the state.
    Everything is checked first (``read_checkpoint``): on an error nothing has changed."""
    return apply_checkpoint(read_checkpoint(path, params, optimizer, config), params, optimizer)
