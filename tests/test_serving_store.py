"""The adapter store (PEFT folders in host memory, checked against the model) and the device cache (LRU under a
byte budget, slots, counts; nothing changes on a refused fetch)."""
import peft
import pytest
import torch

from lorabook.models import tiny_llama
from lorabook.serving.store import AdapterStore, AdapterTooLarge, DeviceCache


def peft_folder(path, r, targets, seed=0, **kw):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                             task_type="CAUSAL_LM", **kw)
    peft.get_peft_model(tiny_llama(0), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sql": peft_folder(root / "sql", 4, ["q_proj", "v_proj"]),
            "style": peft_folder(root / "style", 8, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1),
            "rs": peft_folder(root / "rs", 2, ["down_proj"], seed=2, use_rslora=True)}


def test_store_reads_peft_folders_with_their_ranks_targets_and_scalings(folders):
    store = AdapterStore(tiny_llama(0))
    sql, style, rs = (store.add(name, path) for name, path in folders.items())
    assert set(sql.ranks) == {f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in ("q_proj", "v_proj")}
    assert set(style.ranks.values()) == {8} and len(style.layers) == 8
    A, B, s = rs.layers["model.layers.0.mlp.down_proj"]
    assert A.shape == (2, 128) and B.shape == (64, 2) and s == pytest.approx(4 / 2 ** 0.5)   # rsLoRA: α / √r
    assert sql.nbytes == 4 * sum(A.numel() + B.numel() for A, B, _ in sql.layers.values())
    with pytest.raises(KeyError, match="unknown adapter 'chat' .*'rs', 'sql', 'style'"):
        store["chat"]
    with pytest.raises(ValueError, match="taken"):
        store.add("sql", folders["sql"])


def test_an_adapter_for_another_architecture_is_refused_and_nothing_added(folders, tmp_path):
    store = AdapterStore(tiny_llama(0, d_model=32))       # same layer names, other shapes
    with pytest.raises(ValueError, match="shape"):
        store.add("sql", folders["sql"])
    assert len(store) == 0


def test_cache_evicts_the_least_recently_used_adapter_not_needed_now(folders):
    store = AdapterStore(tiny_llama(0))
    for name, path in folders.items():
        store.add(name, path)
    sizes = {n: store[n].nbytes for n in folders}
    cache = DeviceCache(store, budget_bytes=sizes["sql"] + sizes["style"])
    assert cache.fetch(["sql", None, "sql"]) == {"sql": 0}
    assert cache.fetch(["style"]) == {"style": 1}
    assert cache.fetch(["sql"]) == {"sql": 0}           # a hit: sql is now the most recent
    assert cache.fetch(["rs"]) == {"rs": 1}             # style (least recently used) goes; its slot is reused
    assert list(cache.resident) == ["sql", "rs"] and (cache.loads, cache.hits, cache.evictions) == (3, 1, 1)
    layer = cache.layer_adapters("model.layers.0.self_attn.q_proj")
    assert layer[0][0].shape == (4, 64) and layer[1] is None   # rs does not target q_proj


def test_a_refused_fetch_changes_nothing(folders):
    store = AdapterStore(tiny_llama(0))
    for name, path in folders.items():
        store.add(name, path)
    cache = DeviceCache(store, budget_bytes=store["style"].nbytes)
    cache.fetch(["style"])
    before = (list(cache.resident), dict(cache.slots), cache.loads, cache.evictions, cache.version)
    with pytest.raises(AdapterTooLarge, match="together"):
        cache.fetch(["sql", "style"])
    with pytest.raises(KeyError, match="unknown adapter"):
        cache.fetch(["sql", "nope"])
    assert (list(cache.resident), dict(cache.slots), cache.loads, cache.evictions, cache.version) == before
    with pytest.raises(AdapterTooLarge, match="more than the device budget"):
        DeviceCache(store, budget_bytes=100).fetch(["sql"])
    with pytest.raises(ValueError, match="budget_bytes"):
        DeviceCache(store, budget_bytes=0)
