"""Shared fixtures: tiny seeded models (milliseconds) and, for the few tests that need it, SmolLM2."""
import pytest
import torch


@pytest.fixture
def tiny():
    from lorabook.models import tiny_llama
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real base model (prepared by `make test`), loaded once per test session."""
    from lorabook.models import load_base_model
    torch.manual_seed(0)
    return load_base_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine makes two threads many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- "a refused call changes nothing": snapshots compared bit for bit (NaN == NaN here) ----------------------

def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so a NaN equals itself and -0.0 differs from 0.0)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model) -> dict:
    """Everything a refused call must leave as it was: every state tensor's bytes and dtype, which parameters
    train, and the module tree."""
    return {"state": {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": [(n, type(m)) for n, m in model.named_modules()]}


def optimizer_snapshot(optimizer) -> dict:
    """An optimizer's state (every slot's bytes; an 8-bit state's nested tensors too) and its param groups'
    settings."""
    saved = optimizer.state_dict()
    def slot(v):
        if isinstance(v, dict):
            return {k: slot(t) for k, t in v.items()}
        return torch.as_tensor(v).dtype, bits(torch.as_tensor(v))
    return {"state": {i: {k: slot(v) for k, v in slots.items()} for i, slots in saved["state"].items()},
            "groups": [{k: v for k, v in g.items()} for g in saved["param_groups"]]}


def assert_same(after: dict, before: dict) -> None:
    """Two snapshots agree bit for bit (a readable diff of the keys first)."""
    assert after.keys() == before.keys()
    for key in before:
        if isinstance(before[key], dict):
            assert after[key].keys() == before[key].keys(), key
            for k in before[key]:
                assert _same(after[key][k], before[key][k]), f"{key}: {k} changed"
        else:
            assert after[key] == before[key], key


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def poison_last_linear(model, value: float = float("nan")) -> str:
    """Put ``value`` (NaN, Inf) in the last weight of the model's last nn.Linear before the head; return its name.
    The last one: a call that checked layer by layer and changed as it went would have changed all the others."""
    from lorabook.lora import output_head_name

    head = output_head_name(model)
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head][-1]
    with torch.no_grad():
        model.get_submodule(name).weight[-1, -1] = value
    return name
