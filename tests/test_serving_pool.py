"""The unified paged pool and its naive peer: pages are all-or-none, freed pages are reused, and the contiguous
allocator fails where free memory is split into holes."""
import pytest
import torch

from lorabook.serving.pool import ContiguousAllocator, PagedPool, PoolExhausted


def test_pages_are_taken_all_or_none_and_reused_after_release():
    pool = PagedPool(8, 4)
    a = pool.allocate("adapter sql", 3)
    kv = pool.allocate("request 0", 4)
    assert a.tolist() == [0, 1, 2] and kv.tolist() == [3, 4, 5, 6] and pool.free_pages == 1
    with pytest.raises(PoolExhausted, match="needs 2 pages, 1 of 8 are free"):
        pool.allocate("request 1", 2)
    assert pool.free_pages == 1 and "request 1" not in pool.owned      # nothing half-allocated
    assert pool.release("adapter sql") == 3 and pool.free_pages == 4
    assert pool.allocate("request 1", 4).tolist() == [0, 1, 2, 7]      # any free page fits any need
    assert pool.peak_used == 8 and pool.release("nobody") == 0


def test_write_fills_the_pages_and_a_short_row_the_start_of_its_page():
    pool = PagedPool(4, 6)
    pages = pool.allocate("k/v", 2)
    pool.write(pages, torch.arange(8.).view(2, 4))                    # kv_dim 4 < page_size 6
    assert pool.storage[pages, :4].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pool.storage[pages, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="rows must be"):
        pool.write(pages, torch.zeros(2, 7))


def test_contiguous_ranges_fragment_where_pages_do_not():
    naive, pool = ContiguousAllocator(100), PagedPool(100, 1)
    for name in "abc":
        naive.allocate(name, 30)
        pool.allocate(name, 30)
    for name in "ac":
        naive.release(name)
        pool.release(name)
    assert naive.holes() == [30, 40] and naive.capacity - naive.used == 70
    with pytest.raises(PoolExhausted, match="70 free in holes of at most 40"):
        naive.allocate("d", 50)
    assert len(pool.allocate("d", 50)) == 50                           # 70 free pages, wherever they are


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_pages"):
        PagedPool(0, 4)
    with pytest.raises(ValueError, match="page_size"):
        PagedPool(4, True)
    with pytest.raises(ValueError, match="n must be"):
        PagedPool(4, 4).allocate("x", -1)
    naive = ContiguousAllocator(10)
    naive.allocate("x", 5)
    with pytest.raises(ValueError, match="already holds"):
        naive.allocate("x", 2)
    with pytest.raises(ValueError, match="size"):
        naive.allocate("y", 0)
