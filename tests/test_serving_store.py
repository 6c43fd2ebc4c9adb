"""The adapter store (PEFT folders in host memory, checked against the model) and the device cache (the adapters'
rows in pool pages, LRU, slots, counts; nothing changes on a refused fetch)."""
import peft
import pytest
import torch

from lorabook.models import tiny_llama
from lorabook.serving.batched import stack_adapters, stack_pages
from lorabook.serving.pool import PagedPool, PoolExhausted
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


def store_of(folders):
    store = AdapterStore(tiny_llama(0))
    for name, path in folders.items():
        store.add(name, path)
    return store


def test_an_adapter_takes_a_page_per_row_of_A_and_of_B_transposed(folders):
    store = store_of(folders)        # the tiny Llama: H = 64, k/v 32 wide, MLP 128 wide
    assert store["style"].pages(64) == 2 * 4 * (8 + 8)           # 4r pages for A, 4r for B, in each of 2 layers
    assert store["rs"].pages(64) == 2 * 2 * (2 + 1)              # down_proj: A's rows are 128 long (2 pages)
    assert store["sql"].pages(32) == 2 * 4 * (2 + 2 + 2 + 1)     # pages of 32: q's rows take two pages


def test_cache_evicts_the_least_recently_used_adapter_not_needed_now(folders):
    store = store_of(folders)
    cache = DeviceCache(store, PagedPool(store["sql"].pages(64) + store["style"].pages(64), 64))
    assert cache.fetch(["sql", None, "sql"]) == {"sql": 0}
    assert cache.fetch(["style"]) == {"style": 1}
    assert cache.fetch(["sql"]) == {"sql": 0}           # a hit: sql is now the most recent
    assert cache.fetch(["rs"]) == {"rs": 1}             # style (least recently used) goes; its slot is reused
    assert list(cache.resident) == ["sql", "rs"] and (cache.loads, cache.hits, cache.evictions) == (3, 1, 1)
    assert cache.used_pages == cache.pool.used_pages == store["sql"].pages(64) + store["rs"].pages(64)
    layer = cache.layer_pages("model.layers.0.self_attn.q_proj")
    assert layer[0][0].shape == (4, 1) and layer[1] is None   # rs does not target q_proj


@pytest.mark.parametrize("page_size", [64, 24])
def test_the_pages_hold_the_adapters_rows_exactly(folders, page_size):
    store = store_of(folders)
    cache = DeviceCache(store, PagedPool(400 if page_size == 64 else 1200, page_size))
    cache.fetch(["rs", "sql", "style"])
    for path in ("model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        lin = tiny_llama(0).get_submodule(path)
        by_slot = {s: store[n].layers.get(path) for n, s in cache.slots.items()}
        want = stack_adapters([by_slot[s] for s in range(3)], lin.in_features, lin.out_features)
        got = stack_pages(cache.layer_pages(path), lin.in_features, lin.out_features, page_size).gather(
            cache.pool.storage)
        for field in ("A", "Bt", "offsets", "ranks", "scalings", "column_scales"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (path, field)


def test_idle_adapters_give_their_pages_to_the_kv_cache(folders):
    store = store_of(folders)
    pool = PagedPool(store["sql"].pages(64) + store["style"].pages(64), 64)
    cache = DeviceCache(store, pool)
    cache.fetch(["sql", "style"])
    assert cache.fetch(["style"], keep_free=10) == {"style": 1} and list(cache.resident) == ["style"]
    assert pool.free_pages >= 10 and cache.evictions == 1


def test_a_refused_fetch_changes_nothing(folders):
    store = store_of(folders)
    cache = DeviceCache(store, PagedPool(store["style"].pages(64) + 4, 64), max_adapters=2)
    cache.fetch(["style"])
    before = (list(cache.resident), dict(cache.slots), cache.loads, cache.evictions, cache.version,
              cache.pool.free_pages, cache.pool.storage.clone())
    with pytest.raises(PoolExhausted, match="need .* more pages"):
        cache.fetch(["sql", "style"])
    with pytest.raises(PoolExhausted, match="stay free for the KV cache"):
        cache.fetch(["style"], keep_free=5)
    with pytest.raises(AdapterTooLarge, match="3 adapters, more than max_adapters=2"):
        cache.fetch(["sql", "style", "rs"])
    with pytest.raises(KeyError, match="unknown adapter"):
        cache.fetch(["sql", "nope"])
    after = (list(cache.resident), dict(cache.slots), cache.loads, cache.evictions, cache.version,
             cache.pool.free_pages, cache.pool.storage)
    assert after[:-1] == before[:-1] and torch.equal(after[-1], before[-1])
    with pytest.raises(ValueError, match="max_adapters"):
        DeviceCache(store, cache.pool, max_adapters=0)
    with pytest.raises(TypeError, match="pool must be a PagedPool"):
        DeviceCache(store, 100)
