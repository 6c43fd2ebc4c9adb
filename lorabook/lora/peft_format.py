"""Save and load LoRA adapters in PEFT's on-disk format, so adapters move between lorabook and peft both ways.

A PEFT LoRA adapter is a folder with two files (what ``peft.PeftModel.save_pretrained`` writes, peft 0.21):

    adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                  "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
                                  "use_rslora": false, "fan_in_fan_out": false, "rank_pattern": {}, ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)
                                 base_model.model.<module path>.lora_B.weight   (out, r)

``<module path>`` is the layer's name in the causal-LM model (``model.layers.0.self_attn.q_proj`` for a
Llama, ``transformer.h.0.attn.c_attn`` for GPT-2); ``base_model.model.`` is where peft's wrappers put that
model. The adapter's name is not in the keys: the loader chooses it. A and B keep nn.Linear's layout even for
GPT-2's Conv1D (config ``fan_in_fan_out: true``). ``rank_pattern`` / ``alpha_pattern`` map a module-name
pattern to its own r / α; peft matches a pattern ``k`` against a module name with ``(.*\\.)?(k)$``.

``load_adapter`` checks the whole folder against the model first (the file reads, every key names a linear
layer the config targets, every target has both keys, every shape is (r, in) / (out, r)) and only then
changes the model, so a bad folder leaves the model exactly as it was. ``save_adapter`` writes the two files as
one unit (``lorabook._io.write_folder``): a failure at any point leaves the previous adapter in the folder, loadable.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .._checks import check_module
from .._io import write_folder
from .layer import LoRALinear, base_layer, check_adapter_name, check_lora_args
from .model import (active_adapter, adapter_names, linear_names, lora_layers, merged_adapter, output_head_name,
                    select, set_adapter)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# settings a peft LoRA config may carry that this loader does not implement, with their "off" values
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "lora_bias": False,
                "layers_to_transform": None, "exclude_modules": None, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None, "use_qalora": False,
                "megatron_config": None, "alora_invocation_tokens": None, "use_bdlora": None,
                **{f"{k}_config": None for k in ("eva", "corda", "lora_ga", "kasa", "monteclora", "arrow",
                                                  "velora", "loftq")}}
# initialisations that only choose A and B; the others (pissa, olora, loftq, corda, eva, ...) change W0 too
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def _most_common(values: dict):
    return Counter(values.values()).most_common(1)[0][0]


def _pattern(per_module: dict[str, float], default) -> dict[str, float]:
    # the exact module path as the pattern: peft's (.*\.)?(path)$ then matches that module only
    return {re.escape(p): v for p, v in per_module.items() if v != default}


def _target_modules(model: nn.Module, paths: list[str]):
    """The layers' short names when those select exactly ``paths``; otherwise a regex of the full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if sorted(select(linear_names(model), short)) == sorted(paths):
        return short
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"  # peft: re.fullmatch(target, path)


def adapter_config(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None = None,
                   task_type: str = "CAUSAL_LM") -> dict:
    """The adapter_config.json dict peft would write for this adapter."""
    layers = {p: m for p, m in lora_layers(model).items() if adapter_name in m.lora_A}
    ranks = {p: m.r[adapter_name] for p, m in layers.items()}
    alphas = {p: m.lora_alpha[adapter_name] for p, m in layers.items()}
    rslora = {m.use_rslora[adapter_name] for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes use_rslora True and False; PEFT's format has one flag")
    r, alpha = _most_common(ranks), _most_common(alphas)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha,
        "lora_dropout": _most_common({p: m.lora_dropout[adapter_name] for p, m in layers.items()}),
        "target_modules": _target_modules(model, list(layers)),
        "fan_in_fan_out": all(m.fan_in_fan_out for m in layers.values()), "bias": "none",
        "use_rslora": rslora.pop(), "use_dora": False, "lora_bias": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "rank_pattern": _pattern(ranks, r), "alpha_pattern": _pattern(alphas, alpha),
    }


def save_adapter(model: nn.Module, directory, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a PEFT adapter folder; returns the folder."""
    from safetensors.torch import save_file

    check_module("model", model)
    names = adapter_names(model)
    if not names:
        raise ValueError("model has no LoRA layers; nothing to save (add_lora or load_adapter first)")
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name not in names:
        raise ValueError(f"unknown adapter_name {name!r}; adapters on this model: {names}")
    config = adapter_config(model, name, base_model_name_or_path)
    tensors = {}
    for path, m in lora_layers(model).items():
        if name in m.lora_A:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[name].detach().contiguous().cpu()  # (r, in)
            tensors[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[name].detach().contiguous().cpu()  # (out, r)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return write_folder(Path(directory), {  # both files as one unit: the old adapter stays loadable on a failure
        WEIGHTS_NAME: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
        CONFIG_NAME: lambda tmp: tmp.write_text(text, encoding="utf-8")})


# ---- loading: read, check everything, then change the model -------------------------------------------------

def read_adapter_files(directory, qalora: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, the tensors) of a PEFT LoRA folder, checked as far as the files alone allow.

    qalora: the folder must be a QA-LoRA adapter (``use_qalora: true`` and an int ``qalora_group_size``;
    ``lorabook.qalora`` loads it); otherwise it must not be one."""
    directory = Path(directory)
    return _read_config(directory, qalora), _read_tensors(directory)


def _read_config(directory: Path, qalora: bool = False) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"directory {str(directory)!r} has no {CONFIG_NAME}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))  # JSON is UTF-8 (RFC 8259), whatever the locale
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
        raise ValueError(f"{path} is {what}: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_NAME}: peft_type must be 'LORA', got "
                         f"{config.get('peft_type') if isinstance(config, dict) else config!r}")
    if config.get("use_qalora") and not qalora:
        raise ValueError(f"{CONFIG_NAME} is a QA-LoRA adapter (use_qalora: true): load it with "
                         "lorabook.qalora.load_qalora_adapter onto a model from add_qalora")
    if qalora:
        size = config.get("qalora_group_size")
        if config.get("use_qalora") is not True or not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"{CONFIG_NAME} is not a QA-LoRA adapter: it needs use_qalora: true and an int "
                             f"qalora_group_size, got use_qalora={config.get('use_qalora')!r}, "
                             f"qalora_group_size={size!r}")
    unsupported = {k: off for k, off in _UNSUPPORTED.items() if not (qalora and k == "use_qalora")}
    problems = [f"{k}={config[k]!r}" for k, off in unsupported.items() if config.get(k) not in (off, None, [], {})]
    if qalora and (config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora")):
        problems.append("rank_pattern/alpha_pattern/use_rslora with QA-LoRA (one r and alpha for every layer)")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={config['init_lora_weights']!r} (it also changes the base weights)")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        problems.append("use_rslora together with rank_pattern/alpha_pattern")
    if problems:
        raise ValueError(f"{CONFIG_NAME} uses settings lorabook does not implement: {', '.join(problems)}")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in config:
            raise ValueError(f"{CONFIG_NAME} has no {k!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(k) or {}, dict):
            raise ValueError(f"{CONFIG_NAME}: {k} must be a dict of module pattern -> value, got {config[k]!r}")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        raise ValueError(f"directory {str(directory)!r} has no {WEIGHTS_NAME}" +
                         (f" (found {other}: only safetensors is loaded)" if other else ""))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a bad file
        raise ValueError(f"{path} could not be read: truncated or corrupt ({type(e).__name__}: {e})") from None


def _pattern_value(patterns: dict, path: str, default):
    for k, v in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({k})$", path):  # peft's rule for rank_pattern / alpha_pattern keys
                return v
        except re.error as e:
            raise ValueError(f"{CONFIG_NAME}: pattern {k!r} is not a valid regex ({e})") from None
    return default


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _plan(model: nn.Module, config: dict, tensors: dict, adapter_name: str) -> dict[str, dict]:
    """Check the folder against the model; return {module path: its settings and A, B} or raise listing all."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            unexpected.append(key)
        else:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
    linears = linear_names(model)
    absent = sorted(set(pairs) - set(linears))  # keys for layers this model does not have
    if absent:
        raise ValueError(f"{WEIGHTS_NAME} has keys for {len(absent)} layers this model does not have (an adapter "
                         f"for another architecture?): {_listing(absent)}; this model's linear layers are named "
                         f"like {_listing(linears, 4)}")
    try:
        head = output_head_name(model)
        targets = select(linears, config["target_modules"], head=head, arg="target_modules in " + CONFIG_NAME)
    except ValueError as e:
        raise ValueError(f"{e} (an adapter for another architecture?)") from None
    unexpected += [f"{PREFIX}{p}.lora_{ab}.weight" for p in sorted(pairs) if p not in targets for ab in pairs[p]]
    missing = [f"{PREFIX}{p}.lora_{ab}.weight" for p in targets for ab in "AB" if ab not in pairs.get(p, {})]
    r0, alpha0 = config["r"], config["lora_alpha"]
    dropout, rslora = config.get("lora_dropout", 0.0), bool(config.get("use_rslora", False))
    plan, wrong = {}, []
    for p in targets:
        if p not in pairs or len(pairs[p]) < 2:
            continue
        module = model.get_submodule(p)
        info = module.info if isinstance(module, LoRALinear) else base_layer(module)
        in_f, out_f = info.in_features, info.out_features
        r = _pattern_value(config.get("rank_pattern"), p, r0)
        alpha = _pattern_value(config.get("alpha_pattern"), p, alpha0)
        try:
            check_lora_args(r, alpha, dropout, in_f, out_f)
        except ValueError as e:
            raise ValueError(f"{CONFIG_NAME} for {p}: {e}") from None
        A, B = pairs[p]["A"], pairs[p]["B"]
        for ab, t, shape in (("A", A, (r, in_f)), ("B", B, (out_f, r))):
            if tuple(t.shape) != shape:
                wrong.append(f"{PREFIX}{p}.lora_{ab}.weight has shape {tuple(t.shape)}, expected {shape} (r={r})")
            elif not t.is_floating_point() or not torch.isfinite(t).all():
                wrong.append(f"{PREFIX}{p}.lora_{ab}.weight is not finite floating point ({t.dtype})")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            if module.merged == adapter_name:
                wrong.append(f"{p}: adapter {adapter_name!r} is merged; unmerge_lora first")
            elif module.r[adapter_name] != r:
                wrong.append(f"{p}: the model's adapter {adapter_name!r} has r={module.r[adapter_name]}, "
                             f"the file r={r}")
        plan[p] = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, A=A, B=B)
    have = {p for p, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if have and have != set(targets):
        wrong.append(f"adapter {adapter_name!r} exists on other layers ({_listing(sorted(have ^ set(targets)))}); "
                     "load under another adapter_name or delete_adapter first")
    errors = ([f"missing keys: {_listing(missing)}"] if missing else []) + \
             ([f"unexpected keys: {_listing(unexpected)}"] if unexpected else []) + wrong
    if errors:
        raise ValueError("cannot load the adapter into this model:\n  " + "\n  ".join(errors))
    return plan


def read_adapter(model: nn.Module, directory, adapter_name: str = "default") -> dict[str, dict]:
    """A PEFT LoRA adapter folder, checked against ``model`` as ``load_adapter`` checks it, without changing the
    model: {module path: {"r", "alpha", "dropout", "use_rslora", "A" (r, in), "B" (out, r)}}."""
    check_module("model", model)
    check_adapter_name(adapter_name)
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} does not exist or is not a folder")
    return _plan(model, _read_config(directory), _read_tensors(directory), adapter_name)


def load_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA adapter folder as adapter ``adapter_name`` (created from the config if the model does not
    have it, overwritten if it has it with the same layers and ranks); it becomes the active adapter unless
    another one is merged. Everything is checked first: on any error the model is unchanged."""
    plan = read_adapter(model, directory, adapter_name)
    if not lora_layers(model):
        for p in model.parameters():  # as add_lora: the base model is frozen once LoRA is on it
            p.requires_grad_(False)
    for path, s in plan.items():
        module = model.get_submodule(path)
        kw = dict(r=s["r"], alpha=s["alpha"], dropout=s["dropout"], use_rslora=s["use_rslora"])
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, adapter_name=adapter_name, **kw)
            model.set_submodule(path, module)
        elif adapter_name not in module.lora_A:
            module.add_adapter(adapter_name, **kw)
        else:  # same layers and rank (checked): the config's alpha, dropout and rsLoRA flag apply
            module.lora_alpha[adapter_name], module.lora_dropout[adapter_name] = s["alpha"], float(s["dropout"])
            module.use_rslora[adapter_name] = s["use_rslora"]
            module.scaling[adapter_name] = s["alpha"] / (math.sqrt(s["r"]) if s["use_rslora"] else s["r"])
        with torch.no_grad():
            module.lora_A[adapter_name].copy_(s["A"])
            module.lora_B[adapter_name].copy_(s["B"])
    if merged_adapter(model) is None:
        set_adapter(model, adapter_name)
    return model
