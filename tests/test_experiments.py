"""The sweep behind notebook 03's tables: the grid matches the paper's, shared runs run once, finished runs are
skipped, results merge safely, and one real (tiny) train_cli result summarises. Seconds in all."""
import json
import threading

import torch

import pytest

from lorabook import experiments as E
from lorabook.experiments import __main__ as experiments_cli
from lorabook.train.__main__ import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table5_keeps_the_papers_budget_split():
    table = E.tables()["table5"]
    assert list(table) == list(E.PAPER["table5"])  # the paper's seven columns, in order
    ranks = {label: int(args[args.index("--rank") + 1]) for label, (_, args) in table.items()}
    assert ranks == {"W_q": 8, "W_k": 8, "W_v": 8, "W_o": 8, "W_q, W_k": 4, "W_q, W_v": 4, "W_q, W_k, W_v, W_o": 2}
    targets = table["W_q, W_k, W_v, W_o"][1]
    assert targets[targets.index("--targets") + 1] == "q_proj,k_proj,v_proj,o_proj"


def test_table6_is_ranks_by_weight_sets_like_the_paper():
    table = E.tables()["table6"]
    assert len(table) == len(E.RANKS) * len(E.PAPER["table6"]) == 15
    assert all(len(acc) == len(E.RANKS) for acc in E.PAPER["table6"].values())
    assert table["W_q, W_v, r=64"][0] == "lora-qv-r64"


def test_qlora_table_pairs_each_adapter_on_both_bases():
    table = E.tables()["qlora"]
    pairs = {}
    for label, (run, args) in table.items():
        base_free = [a for a in args if a not in ("lora", "qlora", "--optimizer", "paged_adamw")]
        pairs.setdefault(tuple(base_free), []).append(run)
    assert sorted(pairs.values()) == [["lora-all-r8", "qlora-all-r8"], ["lora-qv-r8", "qlora-qv-r8"]]
    assert table["QLoRA, NF4 base (all linear, r=8)"][1][-2:] == ["--optimizer", "paged_adamw"]
    assert E.tables()["table2"]["LoRA (all linear, r=8)"] == table["LoRA, fp32 base (all linear, r=8)"]  # shared


def test_qalora_table_pairs_ptq_and_qalora_at_each_bit_width_and_group():
    from lorabook.train.__main__ import parse_args

    table = E.tables()["qalora"]
    assert len(table) == 4 + 2 * len(E.QALORA_BITS) * len(E.QALORA_GROUPS)
    assert parse_args(table["QLoRA merged -> NF4 again"][1]).ptq_nf4
    assert not parse_args(table["QLoRA unmerged (NF4 + LoRA branch)"][1]).merge
    mean = parse_args(table["QA-LoRA INT4 g32, merged, mean pooling"][1] + E.COMMON)
    assert (mean.pool, mean.bits, mean.group_size) == ("mean", 4, 32)
    for bits in E.QALORA_BITS:
        for group in E.QALORA_GROUPS:
            ptq = parse_args(table[f"QLoRA merged -> INT{bits} g{group} (PTQ)"][1] + E.COMMON)
            qa = parse_args(table[f"QA-LoRA INT{bits} g{group}, merged"][1] + E.COMMON)
            assert (ptq.method, ptq.ptq_bits, ptq.ptq_group_size, ptq.merge) == ("qlora", bits, group, True)
            assert (qa.method, qa.bits, qa.group_size, qa.merge) == ("qalora", bits, group, True)
            assert (ptq.rank, ptq.lr, ptq.steps, ptq.targets) == (qa.rank, qa.lr, qa.steps, qa.targets)
    with pytest.raises(ValueError, match="run the qalora table on its own"):
        experiments_cli.main(["qalora", "table5", "--dry-run"])


def test_the_qalora_table_has_its_own_file_and_stays_out_of_the_guide():
    assert E.table_file("qalora") == E.QALORA_OUT and E.table_file("table5") == E.OUT
    from lorabook.experiments import guide
    sql = {"accuracy_before": 0.5, "eval_n": 100}  # the base row's fields
    rows = guide.accuracy_rows(E.load(E.OUT), sql)
    assert "qalora" not in rows and {"table2", "table5", "table6", "qlora"} <= set(rows)


def test_runs_shared_by_tables_run_once_and_finished_runs_are_skipped():
    todo = E.pending_runs(["table5", "table6"], done={})
    ids = [run for run, _ in todo]
    assert len(ids) == len(set(ids)) == 7 + 15 - 3  # W_q r8, (W_q, W_v) r4, all four r2 are in both tables
    run, args = todo[0]
    done = {run: {"args": args + E.COMMON}}
    assert run not in [r for r, _ in E.pending_runs(["table5", "table6"], done)]
    changed = {run: {"args": args + ["--steps", "5"]}}  # another command: run again
    assert run in [r for r, _ in E.pending_runs(["table5", "table6"], changed)]


def test_unknown_table_and_bad_shard_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['table9'\]"):
        E.pending_runs(["table9"], {})
    with pytest.raises(ValueError, match="--shard must be k/n"):
        experiments_cli.main(["table5", "--shard", "2/2", "--out", str(tmp_path / "r.json"), "--dry-run"])


def test_dry_run_lists_every_nth_pending_run(tmp_path, capsys):
    experiments_cli.main(["table5", "--shard", "1/3", "--out", str(tmp_path / "r.json"), "--dry-run"])
    ids = [run for run, _ in E.pending_runs(["table5"], {})][1::3]
    assert capsys.readouterr().out.startswith(f"{len(ids)} run(s) to do in shard 1/3: {ids}")
    assert not (tmp_path / "r.json").exists()


def test_concurrent_records_all_land(tmp_path):
    path = tmp_path / "runs.json"
    threads = [threading.Thread(target=E.record, args=(path, f"run{i}", {"accuracy_after": i / 10}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = E.load(path)
    assert sorted(runs) == [f"run{i}" for i in range(8)] and runs["run3"] == {"accuracy_after": 0.3}
    assert json.loads(path.read_text())["about"].startswith("python -m lorabook.experiments")


def test_table_rows_mark_missing_runs():
    rows = E.table_rows("table2", {"full": {"trainable_params": 10, "accuracy_after": 0.5}})
    full = next(r for r in rows if r["run"] == "full")
    assert (full["params"], full["accuracy"]) == (10, 0.5)
    assert all(r["accuracy"] is None for r in rows if r["run"] != "full")


def test_a_real_tiny_run_summarises(tmp_path):
    args = ["--model", "tiny", "--method", "lora", "--targets", "all-linear", "--steps", "2", "--batch-size", "2",
            "--max-len", "300", "--eval-n", "2", "--max-new-tokens", "4", "--no-before", "--no-progress"]
    summary = E.summarise(args, train_main(args))
    assert summary["args"] == args and summary["eval_n"] == 2 and len(summary["loss_curve"]) == 2
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert len(summary["errors"]) <= 2 and "predictions" not in summary
    E.record(tmp_path / "r.json", "tiny", summary)
    assert E.load(tmp_path / "r.json")["tiny"]["accuracy_after"] == summary["accuracy_after"]


# ---- the paper's §7: subspace similarity and the spectrum of an update ------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from lorabook.experiments import subspace as S  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), d=st.integers(12, 20), seed=st.integers(0, 10_000))
def test_phi_is_in_0_1_and_one_for_a_subspace_and_its_own_reparametrisation(r1, r2, d, seed):
    g = torch.Generator().manual_seed(seed)
    A1, A2 = torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g)
    phi = S.subspace_similarity(A1, A2)
    assert phi.shape == (r1, r2) and bool(((phi >= -1e-12) & (phi <= 1 + 1e-12)).all())
    M = torch.randn(r1, r1, generator=g) + 3 * torch.eye(r1)  # invertible: same row space, other basis
    assert S.subspace_similarity(A1, M @ A1, r1, r1) == pytest.approx(1.0)
    stacked = torch.cat([A1, A2])  # A1's row space lies inside the stacked one
    assert S.subspace_similarity(A1, stacked, r1, r1 + r2) == pytest.approx(1.0)
    assert S.subspace_similarity(A1, A2, 1, 1) == pytest.approx(float(phi[0, 0]))


def test_phi_of_orthogonal_subspaces_is_zero_and_of_random_ones_near_the_expectation():
    eye = torch.eye(10)
    assert S.subspace_similarity(eye[:3], eye[3:7]).abs().max() < 1e-12
    g = torch.Generator().manual_seed(0)
    phis = [S.subspace_similarity(torch.randn(8, 576, generator=g), torch.randn(64, 576, generator=g), 1, 64)
            for _ in range(200)]
    assert sum(phis) / len(phis) == pytest.approx(S.expected_random_overlap(576, 1, 64), rel=0.15)
    assert S.expected_random_overlap(576, 1, 64) == 64 / 576 and S.expected_random_overlap(10, 4, 2) == 0.4


def test_energy_fraction_and_spectrum_summary():
    assert S.energy_fraction(torch.tensor([1.0, 3.0]), 1) == pytest.approx(0.9)
    assert S.energy_fraction(torch.tensor([2.0, 1.0]), 5) == 1.0
    u, v = torch.randn(6, 1), torch.randn(1, 4)
    summary = S.spectrum_summary(u @ v + 0.0, top=3)  # rank 1: all the energy in one direction
    assert summary["shape"] == [6, 4] and len(summary["sv"]) == 3 and summary["energy"]["1"] == pytest.approx(1.0)
    assert summary["sq_total"] == pytest.approx(float((u @ v).square().sum()), rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: S.subspace_similarity(torch.ones(2, 3), torch.ones(2, 4)), "same input width"),
    (lambda: S.subspace_similarity(torch.ones(3), torch.ones(2, 3)), "2-D tensors"),
    (lambda: S.subspace_similarity(torch.eye(3)[:2], torch.eye(3), 3, 1), "i must be"),
    (lambda: S.subspace_similarity(torch.eye(3)[:2], torch.eye(3), 1), "both i and j"),
    (lambda: S.expected_random_overlap(0, 1, 1), "d must be"),
    (lambda: S.expected_random_overlap(5, 6, 1), "i must be"),
    (lambda: S.energy_fraction(torch.tensor([1.0, float("nan")]), 1), "singular_values"),
    (lambda: S.energy_fraction(torch.zeros(3), 1), "all 0"),
    (lambda: S.energy_fraction(torch.ones(3), 0), "k must be"),
    (lambda: S.train_weights("no-such-run"), "run must be one of"),
])
def test_subspace_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_subspace_cli_dry_run_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(S, "subspace", lambda: pytest.fail("a dry run must not train"))
    experiments_cli.main(["subspace", "--dry-run"])
    assert capsys.readouterr().out == ""


def test_scaling_dry_run_and_its_data_file(capsys):
    """``python -m lorabook.experiments scaling`` (notebook 07 §5): the committed data/scaling_out.json holds what
    DDP and FSDP2 must give -- DDP sends 2 · (N-1)/N of the fp32 trainable gradients and stores a whole replica,
    FSDP stores half of everything per rank and sends more (it gathers the frozen base)."""
    from lorabook.experiments import scaling
    experiments_cli.main(["scaling", "--dry-run"])
    assert "scaling: 3 methods x (1 process, ddp, fsdp) -> scaling_out.json" in capsys.readouterr().out
    runs = json.loads(scaling.SCALING_OUT.read_text())["runs"]
    assert set(runs) == {f"{m}/{s}" for m in scaling.METHODS for s in ("one", "ddp", "fsdp")}
    for m in scaling.METHODS:
        one, ddp, fsdp = (runs[f"{m}/{s}"] for s in ("one", "ddp", "fsdp"))
        assert one["wire_bytes_per_step"] == [0] * scaling.STEPS
        assert ddp["wire_bytes_per_step"] == [4 * ddp["trainable_params"]] * scaling.STEPS  # 2 · 1/2 · 4 bytes
        assert ddp["stored_bytes"] == one["stored_bytes"]
        assert fsdp["wire_bytes_per_step"][0] > ddp["wire_bytes_per_step"][0]
        mine, whole = fsdp["stored_bytes"][0], one["stored_bytes"][0]
        for part in ("grads", "optimizer"):
            assert 0.5 <= mine[part] / whole[part] <= 0.501, (m, part)
        # the parameters, and QLoRA's NF4 codes (buffers in one process, sharded parameters under FSDP)
        assert 0.5 <= (mine["params"] + mine["buffers"]) / (whole["params"] + whole["buffers"]) <= 0.501, m


def test_peft_dry_run_and_its_data_file(capsys):
    """``python -m lorabook.experiments peft`` (notebook 07 §3): three QLoRA fine-tunes of one recipe -- the same
    number of trainable parameters, and peft started from lorabook's adapter tracks lorabook's curve more closely
    than peft from its own."""
    from lorabook.experiments import qlora_peft
    experiments_cli.main(["peft", "--dry-run"])
    assert "peft: 3 QLoRA fine-tunes -> qlora_peft.json" in capsys.readouterr().out
    runs = json.loads(qlora_peft.PEFT_OUT.read_text())["runs"]
    assert set(runs) == set(qlora_peft.VARIANTS)
    assert len({r["trainable_params"] for r in runs.values()}) == 1
    ours = runs["lorabook"]["loss_curve"]
    gap = {name: max(abs(a - b) for a, b in zip(r["loss_curve"], ours)) for name, r in runs.items()}
    assert gap["lorabook"] == 0 and gap["peft+bnb, lorabook init"] < gap["peft+bnb"] < 0.1
    assert all(len(r["predictions"]) == 100 and r["same_answers_as_lorabook"] >= 80 for r in runs.values())
