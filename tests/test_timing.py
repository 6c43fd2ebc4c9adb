import pytest

from lorabook.timing import Timing, benchmark


def test_benchmark_calls_warmup_plus_repeat_times():
    calls = []
    t = benchmark(lambda: calls.append(1), warmup=2, repeat=5, device="cpu")
    assert len(calls) == 7 and len(t.times) == 5 and t.device == "cpu"
    assert t.min <= t.median and t.iqr >= 0


def test_timing_summary_is_the_median():
    t = Timing(times=[3.0, 1.0, 2.0, 100.0, 2.5], device="cpu")
    assert t.median == 2.5 and t.min == 1.0
    assert str(t).startswith("2500.000 ms (median of 5")


@pytest.mark.parametrize("kwargs, arg", [
    (dict(fn=None), "fn must be callable"), (dict(warmup=-1), "warmup"), (dict(repeat=0), "repeat"),
])
def test_bad_input(kwargs, arg):
    args = dict(fn=lambda: None) | kwargs
    with pytest.raises(ValueError, match=arg):
        benchmark(**args)
