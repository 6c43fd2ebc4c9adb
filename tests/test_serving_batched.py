"""Batched multi-adapter LoRA: every method equals running each row with its own adapter (random ranks, rows
without an adapter, layers an adapter does not target), and bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook.lora import LoRALinear
from lorabook.serving import (DENSE_WORK, METHODS, PagedPool, choose_method, lora_delta, lora_delta_dense,
                              lora_delta_gather, lora_delta_loop, lora_delta_padded, lora_delta_paged,
                              lora_delta_segments, pad_stack, ragged_pairs, stack_adapters, stack_pages)

IN, OUT = 12, 10


def random_adapters(ranks, seed=0, dtype=torch.float64):
    """One (A, B, scaling) per rank; rank 0 -> None (the adapter does not target this layer)."""
    g = torch.Generator().manual_seed(seed)
    return [None if r == 0 else (torch.randn(r, IN, generator=g, dtype=dtype),
                                 torch.randn(OUT, r, generator=g, dtype=dtype), 16 / r) for r in ranks]


@settings(max_examples=40, deadline=None)
@given(ranks=st.lists(st.sampled_from([0, 1, 2, 4, 8, 16]), min_size=1, max_size=6),
       slots=st.lists(st.integers(-1, 5), min_size=0, max_size=24), seed=st.integers(0, 3))
def test_every_method_equals_each_row_with_its_own_adapter(ranks, slots, seed):
    adapters = random_adapters(ranks, seed)
    stack = stack_adapters(adapters, IN, OUT, dtype=torch.float64)
    idx = torch.tensor([s if s < len(ranks) else -1 for s in slots], dtype=torch.int64)
    x = torch.randn(len(idx), IN, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    expected = torch.zeros(len(idx), OUT, dtype=torch.float64)
    for i, a in enumerate(idx.tolist()):                     # written out: s · B (A x), per row
        if a >= 0 and adapters[a] is not None:
            A, B, s = adapters[a]
            expected[i] = s * (B @ (A @ x[i]))
    for fn in (lora_delta_loop, lora_delta_segments, lora_delta_gather, lora_delta_dense, lora_delta_padded):
        torch.testing.assert_close(fn(x, idx, stack), expected, rtol=1e-12, atol=1e-12)
    for method in METHODS:
        torch.testing.assert_close(lora_delta(x, idx, stack, method), expected, rtol=1e-12, atol=1e-12)


def expected_delta(adapters, idx, x, out=OUT):
    expected = torch.zeros(len(idx), out, dtype=x.dtype)
    for i, a in enumerate(idx.tolist()):                     # written out: s · B (A x), per row
        if a >= 0 and adapters[a] is not None:
            A, B, s = adapters[a]
            expected[i] = s * (B @ (A @ x[i]))
    return expected


def into_pages(adapters, pool, free):
    """Each adapter's rows of A and Bᵀ into the next pages of ``free`` (padded to whole pages) -> stack_pages'
    input."""
    H, out = pool.page_size, []
    for adapter in adapters:
        if adapter is None:
            out.append(None)
            continue
        tables = []
        for rows in (adapter[0], adapter[1].T):                                 # (r, in), (r, out)
            per_row = -(-rows.shape[1] // H)
            pages = torch.tensor([next(free) for _ in range(rows.shape[0] * per_row)], dtype=torch.int64)
            pool.write(pages, torch.nn.functional.pad(rows, (0, per_row * H - rows.shape[1])).reshape(-1, H))
            tables.append(pages.view(rows.shape[0], per_row))
        out.append((*tables, adapter[2]))
    return out


@settings(max_examples=30, deadline=None)
@given(ranks=st.lists(st.sampled_from([0, 1, 2, 4, 8]), min_size=1, max_size=5),
       slots=st.lists(st.integers(-1, 4), min_size=0, max_size=20), page_size=st.sampled_from([5, 7, 12, 16]),
       seed=st.integers(0, 3))
def test_the_pages_give_the_same_rows_and_the_same_delta(ranks, slots, page_size, seed):
    """Adapters written into random pages of a pool: the gathered stack is the stack, and BGMV on the pages
    (alone, and fused with a second layer on the same x, of another width) equals each row with its own adapter."""
    adapters, wide = random_adapters(ranks, seed), random_adapters(ranks[::-1], seed + 1)
    wide = [None if a is None else (a[0], torch.cat([a[1], a[1]]), a[2]) for a in wide]     # out: 2 · OUT
    pool = PagedPool(600, page_size, dtype=torch.float64)
    free = iter(torch.randperm(600, generator=torch.Generator().manual_seed(seed)).tolist())
    paged = stack_pages(into_pages(adapters, pool, free), IN, OUT, page_size)
    paged_wide = stack_pages(into_pages(wide, pool, free), IN, 2 * OUT, page_size)
    idx = torch.tensor([s if s < len(ranks) else -1 for s in slots], dtype=torch.int64)
    x = torch.randn(len(idx), IN, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    want, got = stack_adapters(adapters, IN, OUT, dtype=torch.float64), paged.gather(pool.storage)
    for field in ("A", "Bt", "offsets", "ranks", "scalings", "column_scales"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    expected = expected_delta(adapters, idx, x)
    torch.testing.assert_close(lora_delta_paged(x, idx, paged, pool.storage), expected, rtol=1e-12, atol=1e-12)
    both = lora_delta_paged(x, idx, [paged, paged_wide], pool.storage)
    torch.testing.assert_close(both[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[1], expected_delta(wide, idx, x, 2 * OUT), rtol=1e-12, atol=1e-12)
    pairs = [ragged_pairs(idx, p, torch.float64) for p in (paged, paged_wide)]         # computed once, passed in
    for got, want in zip(lora_delta_paged(x, idx, [paged, paged_wide], pool.storage, pairs=pairs), both):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pages", ["one run each", "scattered"])
def test_an_adapters_rows_read_in_place_when_its_pages_are_one_run(pages):
    """PagedStack.rows(storage, slot): adapter slot's A, Bᵀ and scaling -- views of the pool (no copy) when its
    pages are consecutive, as the device cache lays a fresh adapter out, else gathered; equal either way."""
    adapters = random_adapters([4, 0, 2, 8], 3)
    pool = PagedPool(300, 5, dtype=torch.float64)                  # IN = 12, OUT = 10: 3 and 2 pages per row
    order = range(300) if pages == "one run each" else torch.randperm(300, generator=torch.Generator().manual_seed(0))
    paged = stack_pages(into_pages(adapters, pool, iter(list(order))), IN, OUT, 5)
    assert (paged.runs[0] is not None) == (pages == "one run each") and paged.runs[1] is None   # slot 1: rank 0
    for slot, adapter in enumerate(adapters):
        A, Bt, scaling = paged.rows(pool.storage, slot)
        if adapter is None:
            assert A.shape == (0, IN) and Bt.shape == (0, OUT)
            continue
        torch.testing.assert_close(A, adapter[0], rtol=0, atol=0)
        torch.testing.assert_close(Bt, adapter[1].T, rtol=0, atol=0)
        assert scaling == adapter[2]
        assert (A.data_ptr() - pool.storage.data_ptr() in range(pool.storage.numel() * 8)) == (pages == "one run each")


def test_the_compiled_shrink_equals_the_gemm_shrink_and_the_formula():
    """shrink="compiled" (torch.compile of shrink_pages, reading the pages in place) against "gemm" and the loop:
    rows of A over several pages, fused layers, batches of different sizes (one compiled kernel, dynamic shapes)."""
    adapters, wide = random_adapters([4, 0, 2, 8], 0), random_adapters([1, 3, 0, 5], 1)
    wide = [None if a is None else (a[0], torch.cat([a[1], a[1]]), a[2]) for a in wide]
    pool = PagedPool(300, 5, dtype=torch.float64)                  # IN = 12: each row of A takes 3 pages
    free = iter(torch.randperm(300, generator=torch.Generator().manual_seed(0)).tolist())
    paged = stack_pages(into_pages(adapters, pool, free), IN, OUT, 5)
    paged_wide = stack_pages(into_pages(wide, pool, free), IN, 2 * OUT, 5)
    g = torch.Generator().manual_seed(2)
    for idx in (torch.tensor([0, -1, 2, 3, 1, 3, 0]), torch.tensor([3, 2]), torch.tensor([-1, 1])):
        x = torch.randn(len(idx), IN, generator=g, dtype=torch.float64)
        fast = lora_delta_paged(x, idx, [paged, paged_wide], pool.storage, shrink="compiled")
        gemm = lora_delta_paged(x, idx, [paged, paged_wide], pool.storage, shrink="gemm")
        for got, want, adapters_, out in zip(fast, gemm, (adapters, wide), (OUT, 2 * OUT)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got, expected_delta(adapters_, idx, x, out), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shrink"):
        lora_delta_paged(x, idx, paged, pool.storage, shrink="triton")


def test_a_batch_equals_lora_linear_per_request():
    """Against lorabook's LoRALinear: base + delta for each request's rows equals that adapter's own layer."""
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT)
    layers = []
    for name, r in (("sql", 4), ("style", 8), ("tiny", 1)):
        layer = LoRALinear(base, r=r, alpha=8, adapter_name=name)
        torch.nn.init.normal_(layer.lora_B[name])              # B = 0 at init: make the update visible
        layers.append((name, layer))
    stack = stack_adapters([(l.lora_A[n].data, l.lora_B[n].data, l.scaling[n]) for n, l in layers], IN, OUT)
    idx = torch.tensor([2, 0, -1, 1, 1, 0, 2, -1])
    x = torch.randn(len(idx), IN)
    y = base(x) + lora_delta(x, idx, stack)
    for i, a in enumerate(idx.tolist()):
        own = base(x[i]) if a < 0 else layers[a][1](x[i])
        torch.testing.assert_close(y[i], own, rtol=1e-5, atol=1e-6)


def test_padding_to_the_largest_rank_costs_the_bytes_of_the_largest():
    stack = stack_adapters(random_adapters([4, 8, 64], dtype=torch.float32), IN, OUT)
    A, Bt = pad_stack(stack)
    assert A.shape == (3, 64, IN) and Bt.shape == (3, 64, OUT)
    assert stack.A.numel() == (4 + 8 + 64) * IN               # unpadded: Σ r rows
    assert A.numel() / stack.A.numel() == pytest.approx(3 * 64 / 76)


def test_auto_picks_dense_for_a_few_rows_segments_for_prompts_and_gather_for_many_adapters():
    stack = stack_adapters(random_adapters([16] * 64), IN, OUT)            # Σr = 1024
    assert choose_method(torch.arange(32), stack) == "dense"                 # decode: 32 × 1024 ≤ DENSE_WORK
    many = torch.arange(64).repeat_interleave(16)                            # prompts: 16 rows per adapter
    assert len(many) * 1024 > DENSE_WORK and choose_method(many, stack) == "segments"
    assert choose_method(torch.arange(64).repeat(2), stack) == "gather"     # 2 rows per adapter, 128 × 1024 wide
    wide = stack_adapters(random_adapters([16] * 512), IN, OUT)              # Σr = 8192: 512 adapters
    assert choose_method(torch.arange(512), wide) == "gather"                # one row each, too wide for dense


def test_bad_input_names_the_argument():
    stack = stack_adapters(random_adapters([4, 2]), IN, OUT, dtype=torch.float64)
    x = torch.zeros(3, IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="idx must hold adapter slots 0 … 1 or -1"):
        lora_delta(x, torch.tensor([0, 2, -1]), stack)
    with pytest.raises(ValueError, match="idx must be an int64 tensor of shape"):
        lora_delta(x, torch.tensor([0, 1]), stack)
    with pytest.raises(ValueError, match="x must be"):
        lora_delta(torch.zeros(3, IN + 1), torch.tensor([0, 1, -1]), stack)
    with pytest.raises(ValueError, match="method"):
        lora_delta(x, torch.tensor([0, 1, -1]), stack, method="bgmv")
    with pytest.raises(ValueError, match=r"adapters\[1\]"):
        stack_adapters([random_adapters([4])[0], (torch.zeros(2, IN), torch.zeros(OUT, 3), 1.0)], IN, OUT)
