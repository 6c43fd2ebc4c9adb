import json
import math

import pytest

from lorabook import bench
from lorabook.bench import __main__ as bench_cli


def test_row_ratio_is_lorabook_over_peer():
    r = bench.row("case", "seconds", 2.0, "peer", 4.0, exact=True)
    assert r == {"case": "case", "metric": "seconds", "lorabook": 2.0, "peer": "peer", "peer_value": 4.0,
                 "ratio": 0.5, "exact": True}
    assert math.isnan(bench.row("c", "bytes", 1, "p", 0)["ratio"])


def test_json_output_has_the_documented_shape(capsys, monkeypatch):
    monkeypatch.setitem(bench.BENCHMARKS, "toy", lambda quick: [bench.row("a", "bytes", 1, "p", 2)])
    monkeypatch.setattr(bench_cli, "load_all", lambda: bench.BENCHMARKS)
    assert bench_cli.main(["toy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "toy" and out["device"] == "cpu" and out["rows"][0]["ratio"] == 0.5


def test_out_writes_the_json_with_its_date_and_refuses_all(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(bench.BENCHMARKS, "toy", lambda quick: [bench.row("a", "bytes", 1, "p", 2)])
    monkeypatch.setattr(bench_cli, "load_all", lambda: bench.BENCHMARKS)
    out = tmp_path / "toy.json"
    assert bench_cli.main(["toy", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["ratio"] == 0.5 and len(saved["when"]) == 10 and "ratio" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_cli.main(["all", "--out", str(out)])
    assert "--out FILE takes one benchmark's result" in capsys.readouterr().err


def test_table_output(capsys, monkeypatch):
    monkeypatch.setitem(bench.BENCHMARKS, "toy", lambda quick: [bench.row("a", "bytes", 1, "p", 2)])
    monkeypatch.setattr(bench_cli, "load_all", lambda: bench.BENCHMARKS)
    bench_cli.main(["toy"])
    assert "ratio" in capsys.readouterr().out


def test_unknown_benchmark_names_the_choices(capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "load_all", lambda: bench.BENCHMARKS)
    with pytest.raises(SystemExit):
        bench_cli.main(["nope"])
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_nf4_bench_quick_runs_and_every_lorabook_result_is_bit_exact():
    from lorabook.bench.nf4 import nf4_bench
    rows = nf4_bench(quick=True)  # 512 x 512: a smoke test of the benchmark, not a timing
    dequantize = [r for r in rows if r["case"].endswith("dequantize") and r["metric"] == "seconds"]
    assert {r["peer"] for r in dequantize} >= {"lorabook pytorch path", "lorabook reference path"}
    quantize = [r for r in rows if r["case"].endswith("quantize") and not r["case"].endswith("dequantize")]
    assert {r["peer"] for r in quantize} >= {"lorabook reference path"} and all(r["exact"] for r in quantize)
    assert all(r["exact"] for r in dequantize)
    assert all(r["exact"] for r in rows if r.get("goal"))  # both goals compare bit-identical results


def test_paged_bench_quick_runs_and_pages_the_whole_state_each_step():
    from lorabook.bench.paged import paged_bench
    every = paged_bench(quick=True)  # a smoke test, not a timing
    rows = {(r["case"], r["peer"], r["metric"]): r for r in every}
    assert rows[("16 x 128^2 fp32 step", "torch AdamW foreach=False", "seconds")]["exact"]
    paging = rows[("16 x 128^2 fp32 step, budget 1/4", "state bytes", "bytes paged in per step")]
    assert paging["ratio"] == 1.0 and paging["peak_device_bytes"] <= paging["peer_value"] / 4
    eight = [r for r in every if "8-bit" in r["case"]]
    assert len(eight) == 3 and all(r.get("exact", True) for r in eight)  # AdamW8bit and PagedAdamW8bit = bnb's
    assert next(r for r in eight if r["metric"] == "bytes of state")["ratio"] == 1.0


def test_qlora_step_bench_quick_builds_the_same_model_twice():
    from lorabook.bench.qlora import qlora_step
    rows = qlora_step(quick=True)  # a smoke test of the benchmark, not a timing
    seconds, peak, params, gemm = rows
    assert peak["metric"] == "bytes" and peak["lorabook"] > 0 and peak["peer_value"] > 0  # MemTracker, one step each
    # the same activations; lorabook's 4-bit layers store their constants as buffers, bnb's in quant_state (counted
    # too): lorabook keeps no code table per layer, so its peak is not above peft's
    assert peak["ratio"] <= 1.0
    assert gemm["max_ulp_diff"] <= 1.0  # compute_linear and torch's bf16 GEMM: the same up to the sums' order
    assert params["ratio"] == 1.0 and params["lorabook"] > 0  # the same LoRA parameters on both sides
    assert seconds["loss_diff"] < 1e-3  # the same bf16 weights (bit-exact NF4): only the LoRA arithmetic's order differs


def test_qalora_bench_quick_compares_the_merged_int4_model():
    from lorabook.bench.qalora import bench_qalora
    rows = bench_qalora(quick=True)  # a smoke test of the benchmark, not a timing
    assert [r["metric"] for r in rows] == ["seconds"] * 4 + ["bytes"] * 2
    assert all(r["merge_rel_diff"] < 1e-2 for r in rows[:4:2])  # merged = unmerged QA-LoRA, up to bf16 rounding
    int4, vs_nf4 = rows[4], rows[5]
    # the tiny model's groups of 16: codes 0.5 byte a weight, an fp16 scale and an fp32 zero per 16 weights
    assert int4["ratio"] == (0.5 + 6 / 16) / 2 and vs_nf4["lorabook"] == int4["lorabook"]


def test_s2attn_bench_quick_compares_with_full_and_eager_attention():
    from lorabook.bench.s2attn import bench_s2attn
    rows = bench_s2attn(quick=True)  # 256 and 512 tokens: a smoke test of the benchmark, not a timing
    assert [(r["metric"], "grouped" in r["case"], r["peer"][:9]) for r in rows[:6]] == [
        ("seconds", False, "full caus"), ("seconds", True, "full caus"), ("bytes", False, "full caus"),
        ("bytes", True, "full caus"), ("bytes", False, "full caus"), ("seconds", False, "full caus")]
    kernel_bytes, grouped_bytes, eager_bytes = rows[2:5]
    assert eager_bytes["ratio"] < 1  # the n x n scores the math backend keeps are more than S²-Attn's pieces
    assert kernel_bytes["lorabook"] < grouped_bytes["lorabook"]   # views and the kernel's backward: no copies kept
    assert all(4 < r["flop_ratio"] < 4.5 for r in rows if "flop_ratio" in r)


def test_serving_bench_quick_gives_the_same_tokens_three_ways():
    from lorabook.bench.serving import bench_serving
    rows = bench_serving(quick=True)  # 8 requests over 8 tiny adapters: a smoke test, not a timing
    loop, mixed, padded_bytes, padded_seconds = rows
    assert (loop["peer"], mixed["peer"]) == ("per-request loop", "peft mixed batch")
    assert loop["outputs_equal"] and mixed["outputs_equal"]       # every request's tokens the same in all three
    assert loop["gemm_shrink_outputs_equal"]                      # the compiled shrink and the GEMM one agree
    assert loop["metric"] == mixed["metric"] == "tokens_per_s"
    assert 0 < loop["time_to_first_token"] < loop["seconds"]
    assert padded_bytes["ratio"] < 1                              # ranks 2-16 padded to 16 take more bytes
