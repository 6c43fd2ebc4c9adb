"""Training checkpoints are one unit and are read, checked whole, then loaded: a bad checkpoint -- the fault put in
its LAST parameter, its LAST optimizer slot, its metadata, its settings -- raises a ValueError naming the file, with
the model's weights, the optimizer's state and the RNG bit for bit as they were."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_same, optimizer_snapshot, snapshot
from lorabook import data, train as T
from test_train import EXAMPLES, SHORT, TOK, tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=3, lr=1e-2, batch_size=2, **SHORT)
NAMES = list(T.trainable_parameters(tiny_lora()))
LAST, N = NAMES[-1], len(NAMES)  # the last trainable parameter; the optimizer's last index is N - 1


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint after 2 of 3 steps (AdamW, one param group of N LoRA matrices)."""
    folder = tmp_path_factory.mktemp("good")
    T.train(tiny_lora(), EXAMPLES, TOK, checkpoint_dir=folder, stop_after=2, **KW)
    return folder / T.CKPT_NAME


def rewrite(file, tensors=None, meta=None):
    with safe_open(str(file), framework="pt") as f:
        m, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors and tensors(t)
    meta and meta(m)
    save_file(t, str(file), metadata=m)


def in_tensors(fn):
    return lambda file: rewrite(file, tensors=fn)


def in_json(key, fn):
    """Edit metadata ``key`` as JSON (``fn`` changes it in place)."""
    def edit(meta):
        value = json.loads(meta[key])
        fn(value)
        meta[key] = json.dumps(value)
    return lambda file: rewrite(file, meta=edit)


def in_meta(fn):
    return lambda file: rewrite(file, meta=fn)


P, S = f"param.{LAST}", f"optim.{N - 1}"
FAULTS = {  # name: (damage(file), what the error says)
    "last param: wrong shape": (in_tensors(lambda t: t.update({P: torch.zeros(5, 5)})),
                                rf"does not fit the model's trainable parameters.*{re.escape(LAST)}.*\(5, 5\)"),
    "last param: wrong dtype": (in_tensors(lambda t: t.update({P: t[P].double()})),
                                f"{re.escape(LAST)}: torch.float64"),
    "last param: missing": (in_tensors(lambda t: t.pop(P)), f"missing {re.escape(LAST)}"),
    "a param the model lacks": (in_tensors(lambda t: t.update({"param.model.extra": torch.zeros(2)})),
                                "unexpected model.extra"),
    "last slot: wrong shape": (in_tensors(lambda t: t.update({f"{S}.exp_avg_sq": torch.zeros(3)})),
                               rf"parameter {N - 1} exp_avg_sq: shape \(3,\)"),
    "last slot: missing": (in_tensors(lambda t: t.pop(f"{S}.exp_avg_sq")), "different state slots"),
    "last slot: step not a scalar": (in_tensors(lambda t: t.update({f"{S}.step": torch.zeros(2)})),
                                     rf"parameter {N - 1} step: shape \(2,\)"),
    "state for one parameter too many": (in_tensors(lambda t: t.update(
        {f"optim.{N}.{k}": t[f"{S}.{k}"].clone() for k in ("step", "exp_avg", "exp_avg_sq")})),
        f"state for parameter {N}, but the optimizer has {N} parameters"),
    "optimizer tensor misnamed": (in_tensors(lambda t: t.update({"optim.last.exp_avg": torch.zeros(1)})),
                                  "not optim.<index>.<slot>"),
    "a tensor train does not write": (in_tensors(lambda t: t.update({"extra": torch.zeros(1)})),
                                      r"does not write: \['extra'\]"),
    "no rng state": (in_tensors(lambda t: t.pop("rng.cpu")), "rng.cpu must be"),
    "rng state of another dtype": (in_tensors(lambda t: t.update({"rng.cpu": t["rng.cpu"].float()})),
                                   "rng.cpu must be"),
    "no trainer_state": (in_meta(lambda m: m.pop("trainer_state")), "no 'trainer_state' metadata"),
    "no param_groups": (in_meta(lambda m: m.pop("param_groups")), "no 'param_groups' metadata"),
    "trainer_state not JSON": (in_meta(lambda m: m.update(trainer_state="{")), "'trainer_state' is not valid JSON"),
    "param_groups not JSON": (in_meta(lambda m: m.update(param_groups="[")), "'param_groups' is not valid JSON"),
    "trainer_state not an object": (in_meta(lambda m: m.update(trainer_state="[]")), "JSON object with a 'step'"),
    "step negative": (in_json("trainer_state", lambda s: s.update(step=-1)), "step must be an int >= 0, got -1"),
    "step a string": (in_json("trainer_state", lambda s: s.update(step="2")), "step must be an int >= 0, got '2'"),
    "step past the run": (in_json("trainer_state", lambda s: s.update(step=99)), "step must be an int >= 0 <= 3"),
    "no history": (in_json("trainer_state", lambda s: s.pop("history")), "history is not a lorabook.train History"),
    "history with a field History lacks": (in_json("trainer_state", lambda s: s["history"].update(bogus=[])),
                                           "history is not a lorabook.train History"),
    "history entry not a list": (in_json("trainer_state", lambda s: s["history"].update(loss=1.0)),
                                 "history entry must be a list"),
    "no saved config": (in_json("trainer_state", lambda s: s.pop("config")), "no config to compare"),
    "saved config differs": (in_json("trainer_state", lambda s: s["config"].update(lr=0.5)),
                             r"different settings .*'lr': \(0.5, 0.01\)"),
    "param groups: one more": (in_json("param_groups", lambda g: g.append({**g[0], "params": []})),
                               r"param groups of \[28, 0\] parameters, this one \[28\]"),
    "param groups: no lr": (in_json("param_groups", lambda g: g[0].pop("lr")), "each with 'params' and"),
    "param groups: bad indices": (in_json("param_groups", lambda g: g[0]["params"].__setitem__(-1, N + 5)),
                                  "indices are not 0..27"),
    "truncated file": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated or corrupt"),
    "garbage file": (lambda f: f.write_bytes(b"\x00" * 64), "truncated or corrupt"),
}
OPTIMIZER_FAULTS = [f for f in sorted(FAULTS) if f.startswith(("last slot", "state for", "param groups"))]


def damaged(good, folder, fault):
    shutil.copy(good, folder / T.CKPT_NAME)
    FAULTS[fault][0](folder / T.CKPT_NAME)
    return folder / T.CKPT_NAME


def test_the_fixture_checkpoint_fits(good):
    assert N == 28 and len([k for k in safe_open(str(good), "pt").keys() if k.startswith("optim.")]) == 3 * N


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_checkpoint_is_refused_before_anything_is_loaded(good, tmp_path, fault):
    file = damaged(good, tmp_path, fault)
    model = tiny_lora(seed=1)  # other weights than the checkpoint's: any load would show
    before, rng = snapshot(model), torch.get_rng_state()
    with pytest.raises(ValueError, match=FAULTS[fault][1]) as error:
        T.train(model, EXAMPLES, TOK, checkpoint_dir=tmp_path, resume=True, **KW)
    assert str(file) in str(error.value)  # the file is named
    assert_same(snapshot(model), before)
    assert torch.equal(torch.get_rng_state(), rng)


def optimizer_with_state(kind):
    """A LoRA model and its optimizer after one step: the state a refused load must keep."""
    model = tiny_lora(seed=1)
    params = T.trainable_parameters(model)
    optimizer = T.make_optimizer(params, 1e-2, 0.0, kind)
    batch = data.collate(EXAMPLES[:2], TOK, 400)
    T.optimizer_step(model, model, [batch], optimizer, params, 1e-2, 1.0)
    return model, params, optimizer


@pytest.mark.parametrize("kind", ["adamw", "paged_adamw"])  # 8-bit: test_train.py
@pytest.mark.parametrize("fault", OPTIMIZER_FAULTS)
def test_a_refused_load_keeps_the_optimizer_state_bit_for_bit(good, tmp_path, fault, kind):
    damaged(good, tmp_path, fault)
    model, params, optimizer = optimizer_with_state(kind)
    before, state = snapshot(model), optimizer_snapshot(optimizer)
    with pytest.raises(ValueError, match=FAULTS[fault][1]):
        T.load_checkpoint(tmp_path, params, optimizer)
    assert_same(snapshot(model), before)
    assert_same(optimizer_snapshot(optimizer), state)


@pytest.mark.parametrize("kind", ["adamw", "paged_adamw"])  # 8-bit: test_train.py
def test_a_good_checkpoint_loads_into_either_optimizer(good, kind):
    model, params, optimizer = optimizer_with_state(kind)
    state = T.load_checkpoint(good.parent, params, optimizer)
    assert state["step"] == 2
    with safe_open(str(good), framework="pt") as f:
        assert all(torch.equal(p, f.get_tensor(f"param.{n}")) for n, p in params.items())
        exp_avg = f.get_tensor(f"{S}.exp_avg")
    assert torch.equal(optimizer.state_dict()["state"][N - 1]["exp_avg"], exp_avg)


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(good, tmp_path, monkeypatch):
    import safetensors.torch

    shutil.copy(good, tmp_path / T.CKPT_NAME)
    before = (tmp_path / T.CKPT_NAME).read_bytes()
    _, params, optimizer = optimizer_with_state("adamw")

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpo")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(tmp_path, params, optimizer, {"step": 3})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [T.CKPT_NAME] and (tmp_path / T.CKPT_NAME).read_bytes() == before
    assert T.load_checkpoint(tmp_path, params, optimizer)["step"] == 2  # the previous one, loadable
