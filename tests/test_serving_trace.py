"""The fragmentation simulation: a seeded trace, the same scheduler, the paged pool against contiguous ranges."""
import pytest

from lorabook.serving.trace import request_trace, simulate

ADAPTER_PAGES = [2 * r * 4 * 2 for r in (4, 8, 16, 32)]      # rank r on q, k, v, o of a 2-layer model


def test_the_trace_is_seeded():
    assert request_trace(20, 4, seed=3) == request_trace(20, 4, seed=3) != request_trace(20, 4, seed=4)
    trace = request_trace(200, 4, seed=0)
    assert all(16 <= r.prompt <= 256 and 16 <= r.output <= 256 for r in trace)
    assert [r.arrival for r in trace] == sorted(r.arrival for r in trace)
    counts = [sum(r.adapter == k for r in trace) for k in range(4)]
    assert counts[0] > counts[3]                                # skewed: adapter 0 is the popular one


def test_pages_serve_the_same_trace_in_fewer_steps_with_less_memory_stranded():
    trace = request_trace(120, 4, seed=0, rate=1.0)
    paged = simulate(trace, 6000, ADAPTER_PAGES, kv_pages=2, allocator="paged", max_batch=16)
    naive = simulate(trace, 6000, ADAPTER_PAGES, kv_pages=2, allocator="contiguous", max_batch=16)
    assert paged["steps"] <= naive["steps"] and paged["mean_running"] >= naive["mean_running"]
    assert paged["free_at_refusal"] < naive["free_at_refusal"]  # holes: free memory that fits nothing
    assert simulate(trace, 6000, ADAPTER_PAGES, 2, "paged", 16) == paged   # deterministic


def test_bad_arguments():
    trace = request_trace(5, 4)
    with pytest.raises(ValueError, match="allocator"):
        simulate(trace, 1000, ADAPTER_PAGES, 2, allocator="buddy")
    with pytest.raises(ValueError, match="more than the capacity of 100"):
        simulate(trace, 100, ADAPTER_PAGES, 2)
    with pytest.raises(ValueError, match="n_adapters"):
        request_trace(5, 0)
