"""The server: each request's tokens equal peft's greedy generate for that request alone, with its own adapter
(mixed ranks and targets, rows with no adapter, continuous batching); bad requests and adapters are refused."""
import peft
import pytest
import torch

from lorabook.lora import add_lora, save_adapter
from lorabook.models import tiny_llama
from lorabook.serving.server import Server
from lorabook.serving.store import AdapterTooLarge

ADAPTERS = {"sql": (4, ["q_proj", "v_proj"]), "style": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            "mlp": (2, ["gate_proj", "up_proj", "down_proj"]), "all": (8, "all-linear")}


def peft_folder(path, r, targets, seed):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(0), config)
    with torch.no_grad():                              # big enough updates that each adapter changes the tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {name: peft_folder(root / name, r, t, seed) for seed, (name, (r, t)) in enumerate(ADAPTERS.items())}


def peft_greedy(folder, prompt, max_new):
    model = tiny_llama(0) if folder is None else peft.PeftModel.from_pretrained(tiny_llama(0), folder)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("method, max_batch",
                         [("auto", 8), ("paged", 5), ("gather", 3), ("segments", 8), ("dense", 4), ("padded", 2)])
def test_every_request_equals_peft_alone_with_its_adapter(folders, method, max_batch):
    server = Server(tiny_llama(0), max_batch=max_batch, method=method, max_lora_rank=16)
    for name, path in folders.items():
        server.add_adapter(name, path)
    names = ["sql", None, "style", "mlp", "all", "sql", None, "all", "style"]
    asks = prompts(len(names))
    got = server.generate(asks, names, max_new_tokens=6)
    for prompt, name, tokens in zip(asks, names, got):
        assert tokens == peft_greedy(None if name is None else folders[name], prompt, 6), (name, prompt)
    assert len({tuple(t) for t in got}) > 3                   # the adapters make the answers differ
    assert server.pool.used_pages == server.cache.used_pages  # every request's pages are back; adapters stay
    assert server.stats["tokens"] == sum(map(len, got)) and len(server.stats["time_to_first_token"]) == len(names)


def test_a_small_pool_makes_requests_wait_not_fail(folders):
    server = Server(tiny_llama(0), max_batch=8, pool_pages=2 * 2 * 24)   # 2 layers, 1 page per token: 48 tokens
    server.add_adapter("sql", folders["sql"])
    asks = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    got = server.generate(asks, ["sql", None, "sql"], max_new_tokens=8)   # 12 + 11 + 13 tokens: not all at once
    assert got == [peft_greedy(folders["sql"] if n else None, p, 8) for p, n in zip(asks, ["sql", None, "sql"])]
    assert server.pool.peak_used <= server.pool.n_pages
    queued, ttft = server.stats["queued"], server.stats["time_to_first_token"]   # per request, from the call
    assert queued[0] == min(queued) and queued[2] > ttft[0]  # the third waited for the first's pages to come back
    assert all(q < t <= server.stats["seconds"] for q, t in zip(queued, ttft))


def test_a_fault_half_way_leaves_no_request_in_the_pool(folders, monkeypatch):
    server = Server(tiny_llama(0), max_batch=2)
    server.add_adapter("sql", folders["sql"])
    asks, names = prompts(3), ["sql", None, "sql"]
    attention, calls = server._attention, []

    def failing(*args):                                       # the fifth layer's attention: step 3, mid-forward
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("fault")
        return attention(*args)

    monkeypatch.setattr(server, "_attention", failing)
    with pytest.raises(RuntimeError, match="fault"):
        server.generate(asks, names, max_new_tokens=4)
    assert server.pool.used_pages == server.cache.used_pages  # only the adapter's pages: no keys or values left
    monkeypatch.undo()
    assert server.generate(asks, names, 4) == [peft_greedy(folders[n] if n else None, p, 4)
                                               for p, n in zip(asks, names)]


def test_adapters_and_keys_and_values_share_the_pool(folders):
    """Room for one adapter and one request at a time: the adapters take turns in the pages (evicted when idle),
    each request still as peft alone."""
    style_pages = 2 * 4 * (16 + 16)                                    # rank 16 on q, k, v, o of 2 layers: 256
    server = Server(tiny_llama(0), max_batch=4, pool_pages=style_pages + 2 * 18)   # + 18 tokens' keys and values
    for name in ("sql", "style"):
        server.add_adapter(name, folders[name])
    names = ["style", "sql", "style", None, "sql"]
    asks = prompts(len(names), seed=3)
    got = server.generate(asks, names, max_new_tokens=6)
    assert got == [peft_greedy(None if n is None else folders[n], p, 6) for p, n in zip(asks, names)]
    assert server.cache.evictions >= 2 and server.pool.peak_used <= server.pool.n_pages
    assert server.pool.used_pages == server.cache.used_pages


def test_max_loras_makes_adapters_take_turns(folders):
    server = Server(tiny_llama(0), max_loras=1)                    # vLLM's max_loras: one adapter at a time
    for name in ("sql", "mlp"):
        server.add_adapter(name, folders[name])
    names, asks = ["sql", "mlp", None, "sql"], prompts(4, seed=5)
    assert server.generate(asks, names, 4) == [peft_greedy(None if n is None else folders[n], p, 4)
                                               for p, n in zip(asks, names)]
    assert len(server.cache.resident) == 1 and server.cache.evictions >= 1


def test_bad_requests_are_refused_before_anything_runs(folders):
    server = Server(tiny_llama(0, max_seq_len=32), pool_pages=39)
    server.add_adapter("sql", folders["sql"])                  # 32 pages: 2 layers × (4 rows of A + 4 of B) × 2
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: unknown adapter 'chat' \(added: 'sql'\)"):
        server.generate([[1, 2], [3, 4]], [None, "chat"], 2)
    with pytest.raises(ValueError, match=r"input_ids\[0\] needs 40 pool pages .*\(and adapter\)"):
        server.generate([[1, 2]], ["sql"], 2)                # 4 tokens × 2 layers + the adapter's 32
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        server.generate([[1] * 30], [None], 4)
    with pytest.raises(ValueError, match="needs 40 pool pages"):
        server.generate([[1] * 10], [None], 10)
    assert server.kv_pages(10, 10) == 40 and server.cache.pages_of("sql") == 32
    with pytest.raises(ValueError, match=r"input_ids\[0\] must be a non-empty list of token ids in \[0, 256\)"):
        server.generate([[1, 256]], [None], 2)
    with pytest.raises(ValueError, match="one name .* per prompt"):
        server.generate([[1, 2]], [], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        server.generate([[1, 2]], [None], 0)
    assert server.pool.used_pages == 0 and server.cache.loads == 0


def test_bad_adapters_are_refused_and_not_added(folders, tmp_path):
    server = Server(tiny_llama(0), max_lora_rank=8, pool_pages=100)
    with pytest.raises(ValueError, match="rank 16 .* above max_lora_rank=8"):
        server.add_adapter("style", folders["style"])
    with pytest.raises(AdapterTooLarge, match=r"takes \d+ pages, more than the pool's 100"):
        server.add_adapter("all", folders["all"])
    with pytest.raises(ValueError, match="shape"):              # another architecture's adapter
        Server(tiny_llama(0, d_model=32)).add_adapter("sql", folders["sql"])
    head = save_adapter(add_lora(tiny_llama(0), target_modules=["lm_head"], r=2), tmp_path / "head")
    with pytest.raises(ValueError, match="does not adapt"):
        server.add_adapter("head", head)
    assert len(server.store) == 0
    with pytest.raises(ValueError, match="Llama-family"):
        Server(torch.nn.Linear(2, 2))


def test_smollm2_requests_equal_peft_alone(smollm2, tmp_path):
    """The real base: two adapters of different ranks and targets and a base row, each as peft alone."""
    import copy

    base, tok = smollm2
    folders = {}
    for name, r, targets, seed in (("sql", 4, ["q_proj", "v_proj"], 0), ("style", 8, ["o_proj", "down_proj"], 1)):
        torch.manual_seed(seed)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                                        init_lora_weights=False, task_type="CAUSAL_LM"))
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
    server = Server(base, pool_pages=4096)
    for name, path in folders.items():
        server.add_adapter(name, path)
    asks = [tok(q).input_ids for q in ("SELECT name FROM", "The capital of France is", "def add(a, b):")]
    names = ["sql", None, "style"]
    got = server.generate(asks, names, max_new_tokens=4)
    for prompt, name, tokens in zip(asks, names, got):
        model = base if name is None else peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[name])
        ids = torch.tensor([prompt])
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert tokens == want[0, len(prompt):].tolist(), name
