"""The three ways to serve a mixed batch (merge per adapter, peft's mixed batch, lorabook) give the same tokens, and
the sweep over distinct adapters reports each."""
import peft
import pytest
import torch

from lorabook.models import tiny_llama
from lorabook.serving import Server
from lorabook.serving.compare import lorabook_batched, merge_per_adapter, peft_mixed, spread, sweep

ADAPTERS = {"a": (4, ["q_proj", "v_proj"]), "b": (8, ["o_proj", "down_proj"]), "c": (2, "all-linear")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                                   init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(20)                                  # updates large enough to change the tokens
        model.save_pretrained(root / name)
    model = peft.PeftModel.from_pretrained(tiny_llama(0), root / "a", adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(root / name, adapter_name=name)
    server = Server(tiny_llama(0))
    for name in ADAPTERS:
        server.add_adapter(name, root / name)
    return model.eval(), server


def test_the_three_strategies_give_the_same_tokens(served):
    model, server = served
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 256, (6, 7), generator=g).tolist()
    names = spread(list(ADAPTERS), 6, 3)
    ours = lorabook_batched(server, prompts, names, 5)
    assert merge_per_adapter(model, prompts, names, 5) == ours == peft_mixed(model, prompts, names, 5)
    assert len({tuple(t) for t in ours}) > 2
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    merge_per_adapter(model, prompts, names, 2)                  # every merge is undone
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_sweep_rows_and_bad_input(served):
    model, server = served
    prompts = [[5, 6, 7, 8]] * 4
    rows = sweep(model, server, list(ADAPTERS), prompts, distinct=(1, 3), max_new_tokens=3, progress=False)
    assert [(r["distinct"], r["strategy"]) for r in rows] == [
        (d, s) for d in (1, 3) for s in ("lorabook", "peft mixed batch", "merge per adapter")]
    assert all(r["tokens_per_s"] > 0 and r["equal_to_lorabook"] for r in rows)
    assert spread(["x", "y", "z"], 5, 2) == ["x", "y", "x", "y", "x"]
    with pytest.raises(ValueError, match="distinct"):
        spread(["x"], 3, 2)
    with pytest.raises(ValueError, match="one length"):
        peft_mixed(model, [[1, 2], [3]], ["a", "b"], 2)
