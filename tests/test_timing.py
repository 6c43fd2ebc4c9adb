import pytest
import torch

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


def test_torch_threads_sets_and_restores():
    from lorabook.timing import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: unchanged
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n"):
        with torch_threads(-1):
            pass
    assert torch.get_num_threads() == before


def test_the_train_command_leaves_the_callers_threads_as_they_were(tmp_path, capsys):
    from lorabook.train.__main__ import main
    torch.set_num_threads(2)
    main(["--model", "tiny", "--steps", "1", "--batch-size", "2", "--eval-n", "1", "--max-new-tokens", "1",
          "--no-before", "--no-progress", "--threads", "1"])
    assert torch.get_num_threads() == 2
