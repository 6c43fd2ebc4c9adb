"""lorabook.experiments.guide: the "which method when" page is what data/ says, and its statistics are right."""
import json
import math
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabook.data import DATA_DIR
from lorabook.experiments import guide
from lorabook.experiments.guide import (GUIDE, bench_rows, latency_rows, mcnemar, render, wilson, within_noise,
                                        write)

FILES = ("lora_tables.json", "lora_sql_results.json", "lora_table1.json", "bench_nf4.json", "bench_paged.json",
         "qlora_transfer.json")


def test_committed_guide_equals_a_fresh_generation():
    assert GUIDE.read_text() == render(), (
        f"notebooks/WHICH_METHOD.md is stale: regenerate it with .venv/bin/{guide.REGENERATE}")


def test_every_number_of_the_short_answer_comes_from_the_data():
    text = render()
    runs = json.loads((DATA_DIR / "lora_tables.json").read_text())["runs"]
    for run in ("full", "lora-all-r8", "lora-qv-r8", "qlora-qv-r8", "qlora-all-r8", "prefix-p40"):
        assert f"{100 * runs[run]['accuracy_after']:.0f}%" in text
    assert "vs Full fine-tuning" in text and "](10_serving_many_adapters.ipynb)" in text
    serving = json.loads((DATA_DIR / "bench_serving.json").read_text())
    for r in serving["rows"]:
        if r["metric"] == "tokens_per_s":
            assert f"{r['ratio']:.2f}× the tokens/s of {r['peer']}" in text


@pytest.fixture
def data(tmp_path):
    for name in FILES:
        if (DATA_DIR / name).is_file():
            shutil.copy(DATA_DIR / name, tmp_path / name)
    return tmp_path


def edit(folder, name, change):
    obj = json.loads((folder / name).read_text())
    change(obj)
    (folder / name).write_text(json.dumps(obj))


def test_the_text_follows_the_data(data):
    def worse(obj):
        obj["runs"]["lora-all-r8"]["accuracy_after"] = 0.5
    edit(data, "lora_tables.json", worse)
    text = render(data)
    assert ("1. **LoRA on all linear layers vs full fine-tuning:** LoRA (all linear, r=8) 50% vs Full fine-tuning 91%: "
            "41 points below, more than the noise" in text)
    assert "3. **QLoRA when the base in 16 bits does not fit.**" in text  # QLoRA (90%) is above LoRA now

    def qlora_worse(obj):
        obj["runs"]["qlora-all-r8"]["accuracy_after"] = 0.3
    edit(data, "lora_tables.json", qlora_worse)
    assert "3. **QLoRA against LoRA:** " in render(data)
    assert "| LoRA (all linear, r=8) | 2.44M | 1.82% | 50% |" in text


def test_a_missing_run_is_named(data):
    edit(data, "lora_tables.json", lambda obj: obj["runs"].pop("bitfit"))
    with pytest.raises(KeyError, match="'bitfit'.*python -m lorabook.experiments table2"):
        render(data)


def test_bench_paged_is_optional(data):
    (data / "bench_paged.json").unlink(missing_ok=True)
    text = render(data)
    assert "bench_paged" not in text and "From `data/bench_nf4.json` (ratio" in text


def test_write_is_the_render(data, tmp_path):
    out = write(tmp_path / "guide.md", data)
    assert out.read_text() == render(data)


# ---- statistics ------------------------------------------------------------------------------------------------

def test_wilson_known_values():
    lo, hi = wilson(77, 100)  # p = 0.77: centre (p + z²/2n) / (1 + z²/n), half-width z √(p(1-p)/n + z²/4n²) / ...
    z = guide.Z95
    centre = (0.77 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.77 * 0.23 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (round(lo, 4), round(hi, 4)) == (0.6785, 0.8416)
    assert wilson(0, 100)[0] == 0 and wilson(100, 100)[1] == 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10_000), data=st.data())
def test_wilson_invariants(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    mirror = wilson(n - k, n)
    assert (lo, hi) == pytest.approx((1 - mirror[1], 1 - mirror[0]), abs=1e-12)
    wide = wilson(k, n, z=3.0)
    assert wide[0] <= lo + 1e-12 and wide[1] >= hi - 1e-12


def test_within_noise():
    assert within_noise(0.77, 100, 0.76, 100) and within_noise(0.5, 100, 0.5, 100)
    assert not within_noise(0.91, 100, 0.54, 100)
    assert within_noise(0.91, 100, 0.81, 100) == within_noise(0.81, 100, 0.91, 100)
    assert not within_noise(0.81, 10_000, 0.91, 10_000)  # the same gap on more questions is a real difference


@pytest.mark.parametrize("kwargs, arg", [
    (dict(k=-1, n=10), "k"), (dict(k=11, n=10), "k"), (dict(k=1, n=0), "n"), (dict(k=1, n=True), "n"),
    (dict(k=1.5, n=10), "k"), (dict(k=1, n=10, z=0), "z"), (dict(k=1, n=10, z=float("nan")), "z")])
def test_wilson_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg} "):
        wilson(**kwargs)


@pytest.mark.parametrize("args, arg", [
    ((1.5, 100, 0.5, 100), "p1"), ((0.5, 100, -0.1, 100), "p2"), ((0.5, 0, 0.5, 100), "n1"),
    ((0.5, 100, 0.5, 2.5), "n2"), ((float("inf"), 100, 0.5, 100), "p1")])
def test_within_noise_rejects_bad_arguments(args, arg):
    with pytest.raises(ValueError, match=f"^{arg} "):
        within_noise(*args)


# ---- latency and benchmark rows ----------------------------------------------------------------------------------

def _lat(method, pct, **extra):
    return dict(method=method, batch=1, seq=16, trainable=10, ms=100.0, iqr_ms=4.0, overhead_pct=pct, **extra)


def test_latency_verdicts_with_a_confidence_interval():
    rows = [_lat("base", 0.0, ci_low_pct=0.0, ci_high_pct=0.0), _lat("lora", 3.0, ci_low_pct=1.0, ci_high_pct=5.0),
            _lat("lora_merged", -0.5, ci_low_pct=-1.0, ci_high_pct=0.2),
            _lat("adapter_h", -2.0, ci_low_pct=-3.0, ci_high_pct=-1.0)]
    shapes, out = latency_rows({"rows": rows})
    got = {r["method"]: r["cells"][(1, 16)]["verdict"] for r in out}
    assert shapes == [(1, 16)] and got == {"lora": "slower", "lora_merged": "within", "adapter_h": "faster"}
    assert out[0]["cells"][(1, 16)]["spread"] == "95% CI [-1.0, +0.2]"  # table order: merged, unmerged, ...


def test_latency_verdicts_from_the_iqr_without_an_interval():
    _, out = latency_rows({"rows": [_lat("base", 0.0), _lat("lora", 5.0), _lat("adapter_l", 3.0)]})
    got = {r["method"]: (r["cells"][(1, 16)]["verdict"], r["cells"][(1, 16)]["spread"]) for r in out}
    assert got == {"lora": ("slower", "IQR 4.0%"), "adapter_l": ("within", "IQR 4.0%")}


def test_bench_rows_keep_the_bitsandbytes_timings_and_every_paged_row():
    nf4 = {"rows": [dict(case="q", metric="seconds", lorabook=1.0, peer="bitsandbytes 0.50.2", peer_value=2.0,
                         ratio=0.5, exact=True),
                    dict(case="q", metric="seconds", lorabook=1.0, peer="lorabook reference path", peer_value=3.0,
                         ratio=0.3),
                    dict(case="d", metric="GB/s", lorabook=7.0, peer="bitsandbytes x", peer_value=2.0, ratio=3.5)]}
    paged = {"rows": [dict(case="p", metric="bytes paged in per step", lorabook=8.0, peer="state bytes",
                           peer_value=8.0, ratio=1.0, peak_device_bytes=2)]}
    rows = bench_rows(nf4, paged)
    assert [(r["source"], r["peer"]) for r in rows] == [("bench_nf4.json", "bitsandbytes 0.50.2"),
                                                       ("bench_paged.json", "state bytes")]
    assert rows[1]["exact"] is None and "peak_device_bytes" not in rows[1]
    assert bench_rows(nf4, None) == rows[:1]


# ---- the paired test (a QLoRA adapter moved to another base, notebook 07) ----------------------------------------
def test_mcnemar_exact_values():
    a = [True] * 19 + [False] * 6 + [True] * 30 + [False] * 45  # 19 right only under a, 6 only under b
    b = [False] * 19 + [True] * 6 + [True] * 30 + [False] * 45
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (19, 6)
    assert r["p"] == pytest.approx(2 * sum(math.comb(25, i) for i in range(7)) / 2 ** 25) == pytest.approx(0.0146, abs=1e-4)
    assert mcnemar(b, a)["p"] == r["p"]  # symmetric
    assert mcnemar([True, False], [True, False])["p"] == 1.0  # no disagreement: no evidence either way
    assert mcnemar([True] * 5, [False] * 5)["p"] == pytest.approx(2 / 32)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_mcnemar_is_a_probability_and_ignores_agreements(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    r = mcnemar(a, b)
    assert 0 < r["p"] <= 1
    assert mcnemar(a + [True, False], b + [True, False])["p"] == r["p"]  # questions both agree on change nothing


@pytest.mark.parametrize("a,b,exc,match", [
    ([True], [True, False], ValueError, "one length"), ([], [], ValueError, "non-empty"),
    ([1, 0], [True, False], TypeError, "bools"), ("TF", "TF", TypeError, "lists of bools")])
def test_mcnemar_bad_input(a, b, exc, match):
    with pytest.raises(exc, match=match):
        mcnemar(a, b)


def test_the_transfer_sentence_follows_the_file(data):
    text = render(data)
    transfer = json.loads((data / "qlora_transfer.json").read_text())
    own = transfer["adapters"]["nf4"]["eval"]["nf4"]["accuracy"]
    assert f"the NF4-trained adapter {100 * own:.0f}% on its own base" in text
    (data / "qlora_transfer.json").unlink()
    assert "Keep the adapter on the base it was trained on" not in render(data)
