"""PagedAdamW: bit-exact with torch.optim.AdamW at any page size and budget, the budget holds, LRU paging,
checkpoints that move between PagedAdamW and torch's AdamW, bad input."""
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.paged import PagedAdamW, PagePool, page_count

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 150), torch.nn.GELU(), torch.nn.Linear(150, 7)).to(dtype)


def train(model, optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g).to(dtype)
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()


def same_parameters(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def roundtrip(state_dict):
    """Through bytes, as a checkpoint file would (also unshares the step tensors)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@settings(max_examples=25, deadline=None)
@given(page_bytes=st.integers(64, 20_000), budget_pages=st.sampled_from([None, 1, 2, 7, 1000]),
       steps=st.integers(1, 4), weight_decay=st.sampled_from([0.0, 0.01, 0.3]), foreach=st.booleans())
def test_bit_exact_with_torch_adamw(page_bytes, budget_pages, steps, weight_decay, foreach):
    ours, theirs = tiny_mlp(), tiny_mlp()
    budget = None if budget_pages is None else budget_pages * page_bytes
    train(ours, PagedAdamW(ours.parameters(), lr=3e-3, weight_decay=weight_decay, page_bytes=page_bytes,
                           budget_bytes=budget), steps)
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=foreach), steps)
    assert same_parameters(ours, theirs)


def test_param_groups_missing_grads_and_bfloat16():
    ours, theirs = tiny_mlp(dtype=torch.bfloat16), tiny_mlp(dtype=torch.bfloat16)
    ours[2].bias.requires_grad_(False)  # never gets a gradient: no state, no pages
    theirs[2].bias.requires_grad_(False)

    def groups(model):
        return [{"params": list(model[0].parameters()), "lr": 1e-2},
                {"params": list(model[2].parameters()), "weight_decay": 0.0, "betas": (0.8, 0.99)}]
    optimizer = PagedAdamW(groups(ours), lr=1e-3, page_bytes=256, budget_bytes=1024)
    train(ours, optimizer, 3)
    train(theirs, torch.optim.AdamW(groups(theirs), lr=1e-3, foreach=False), 3)
    assert same_parameters(ours, theirs)
    assert ours[2].bias not in optimizer.state


def test_the_budget_holds_and_pages_move():
    model = tiny_mlp()
    total = 2 * 4 * sum(p.numel() for p in model.parameters())  # m and v, fp32
    optimizer = PagedAdamW(model.parameters(), page_bytes=1024, budget_bytes=total // 4)
    train(model, optimizer, 2)
    stats = optimizer.pools[torch.device("cpu")].stats
    assert stats.peak_device_bytes <= total // 4 and stats.page_ins > 0 and stats.page_outs > 0
    assert optimizer.state_bytes()["device"] + optimizer.state_bytes()["host"] == total


def test_page_count_matches_the_pages_made():
    model = tiny_mlp()
    optimizer = PagedAdamW(model.parameters(), page_bytes=1000)  # 125 fp32 elements of m and v per page
    train(model, optimizer, 1)
    made = len(optimizer.pools[torch.device("cpu")].on_device)
    assert made == sum(page_count(p.numel(), 4, 1000) for p in model.parameters()) == 29 + 2 + 9 + 1
    assert page_count(1, 4, 64) == 1 and page_count(9, 4, 64) == 2 and page_count(10, 2, 64) == 1


def test_no_budget_means_no_paging():
    model = tiny_mlp()
    optimizer = PagedAdamW(model.parameters(), page_bytes=1024)
    train(model, optimizer, 2)
    stats = optimizer.pools[torch.device("cpu")].stats
    assert stats.page_ins == stats.page_outs == 0 and optimizer.state_bytes()["host"] == 0


def test_page_out_frees_the_device_and_the_next_step_pages_back_in():
    ours, theirs = tiny_mlp(), tiny_mlp()
    optimizer = PagedAdamW(ours.parameters(), page_bytes=1024)
    reference = torch.optim.AdamW(theirs.parameters(), foreach=False)
    train(ours, optimizer, 1)
    total = optimizer.state_bytes()["device"]
    optimizer.page_out()  # before a memory spike
    assert optimizer.state_bytes() == {"device": 0, "host": total}
    train(ours, optimizer, 2)  # pages come back on use
    train(theirs, reference, 1)
    train(theirs, reference, 2)
    assert optimizer.state_bytes() == {"device": total, "host": 0} and same_parameters(ours, theirs)
    optimizer.page_out(keep_bytes=total // 2)
    assert 0 < optimizer.state_bytes()["device"] <= total // 2
    with pytest.raises(ValueError, match="keep_bytes must be an int >= 0, got -1"):
        optimizer.page_out(-1)


def test_pool_evicts_the_least_recently_used_page():
    pool = PagePool("cpu", budget_bytes=2 * 16)
    for key in "abc":  # 16 bytes each: a and b fit, c goes to the host
        pool.add(key, torch.full((4,), float(ord(key))))
    assert [pool.where(k) for k in "abc"] == ["device", "device", "host"]
    pool.get("a")  # b is now the least recently used
    assert pool.get("c")[0] == ord("c") and pool.where("b") == "host" and pool.where("a") == "device"
    assert pool.get("b")[0] == ord("b") and pool.where("a") == "host"  # values survive the trip
    assert pool.stats.page_ins == 2 and pool.stats.page_outs == 2 and pool.stats.peak_device_bytes == 32
    before = (list(pool.on_device), list(pool.on_host), vars(pool.stats).copy())
    assert pool.peek("a")[0] == ord("a") and pool.peek("c")[0] == ord("c")  # read where they are: nothing moves
    assert (list(pool.on_device), list(pool.on_host), vars(pool.stats)) == before


def test_moments_before_any_step_is_a_clear_error():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"shape \(150, 24\)\) has no optimizer state yet"):
        PagedAdamW(model.parameters()).moments(model[0].weight)


def test_moments_are_torch_adamws():
    ours, theirs = tiny_mlp(), tiny_mlp()
    optimizer = PagedAdamW(ours.parameters(), page_bytes=512, budget_bytes=2048)
    reference = torch.optim.AdamW(theirs.parameters(), foreach=False)
    train(ours, optimizer, 2)
    train(theirs, reference, 2)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        m, v = optimizer.moments(p)
        assert torch.equal(m, reference.state[q]["exp_avg"]) and torch.equal(v, reference.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("direction", ["torch -> paged", "paged -> torch"])
def test_checkpoints_move_between_paged_and_torch_adamw(direction):
    reference, moved = tiny_mlp(), tiny_mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    paged = lambda model: PagedAdamW(model.parameters(), lr=1e-2, page_bytes=512, budget_bytes=2048)  # noqa: E731
    first, second = (torch.optim.AdamW(moved.parameters(), lr=1e-2, foreach=False), paged(moved))
    if direction == "paged -> torch":
        first, second = paged(moved), torch.optim.AdamW(moved.parameters(), lr=1e-2, foreach=False)
    train(reference, ref_opt, 3)
    train(moved, first, 3)
    second.load_state_dict(roundtrip(first.state_dict()))
    train(reference, ref_opt, 3, seed=1)
    train(moved, second, 3, seed=1)
    assert same_parameters(reference, moved)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
    (dict(lr="1e-3"), "lr must be a finite number"),
    (dict(eps=-1e-8), "eps must be"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must be a finite number in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, float("nan"))), r"betas\[1\] must be"),
    (dict(page_bytes=32), "page_bytes must be an int >= 64, got 32"),
    (dict(page_bytes=4096.0), "page_bytes must be an int"),
    (dict(page_bytes=4096, budget_bytes=1000), "budget_bytes must be an int >= 4096, got 1000"),
    (dict(budget_bytes=True), "budget_bytes must be an int >= 1048576, got True"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(tiny_mlp().parameters(), **kwargs)


def test_bad_parameters_and_gradients():
    weight = torch.nn.Parameter(torch.randn(8, 6).t())  # a transposed view: not contiguous
    weight.grad = torch.ones(6, 8)
    with pytest.raises(ValueError, match=r"parameters must be contiguous, got one of shape \(6, 8\)"):
        PagedAdamW([weight]).step()
    sparse = torch.nn.Parameter(torch.randn(4))
    sparse.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        PagedAdamW([sparse]).step()


def test_bad_state_dicts():
    model = tiny_mlp()
    reference = torch.optim.AdamW(model.parameters(), amsgrad=True)
    train(model, reference, 1)
    fresh = PagedAdamW(model.parameters())
    with pytest.raises(ValueError, match=r"does not implement: \['amsgrad'\]"):
        fresh.load_state_dict(roundtrip(reference.state_dict()))
    assert not fresh.state and fresh.param_groups[0].get("amsgrad") is None  # unchanged
    saved = roundtrip(PagedAdamW(model.parameters()).state_dict())  # no state yet: loads fine
    PagedAdamW(model.parameters()).load_state_dict(saved)
    optimizer = PagedAdamW(model.parameters())
    train(model, optimizer, 1)
    saved = roundtrip(optimizer.state_dict())
    del saved["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="must hold exp_avg and exp_avg_sq"):
        PagedAdamW(model.parameters()).load_state_dict(saved)
    saved = roundtrip(optimizer.state_dict())
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"][:3]
    with pytest.raises(ValueError, match=r"state 0: moments of shape \(3, 24\) for a parameter of shape \(150, 24\)"):
        PagedAdamW(model.parameters()).load_state_dict(saved)


def test_pool_bad_use():
    pool = PagePool("cpu", budget_bytes=64)
    pool.add("a", torch.zeros(4))
    with pytest.raises(KeyError, match="already in the pool"):
        pool.add("a", torch.zeros(4))
    with pytest.raises(KeyError, match="no page 'b'"):
        pool.get("b")
    with pytest.raises(KeyError, match="no page 'b'"):
        pool.peek("b")
    with pytest.raises(ValueError, match="a page of 128 bytes does not fit budget_bytes=64"):
        pool.add("big", torch.zeros(32))
