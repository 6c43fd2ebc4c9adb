"""AdamW8bit and PagedAdamW8bit: bit-exact with bitsandbytes' AdamW8bit / PagedAdamW8bit on CPU (8-bit and 32-bit
paths, fp32 and bf16, any page size and budget), 2 bytes of state per parameter (+ 8 per block) as the memory
estimate says, checkpoints both ways with bitsandbytes, resume, bad input. Most tests run for both classes."""
import io
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorabook import memory
from lorabook.adamw8bit import BLOCKSIZE, CHUNK, QUANT_STATE_KEY, SCRATCH_BYTES_PER_ELEMENT, AdamW8bit, state8_bytes
from lorabook.paged import PagedAdamW8bit, page_blocks
from lorabook.quant.double_quant import dynamic_map

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")]  # bnb on CPU: unpaged
SHAPES = [(4096,), (5000,), (100,), (64, 128), (3, 7)]  # a full block count, a partial last block, two 32-bit ones


def paged(params, **kwargs):  # pages of 3 blocks (768 elements), at most 5 pages on the "device": paging every step
    return PagedAdamW8bit(params, page_bytes=3 * (2 * BLOCKSIZE + 8), budget_bytes=5 * 3 * (2 * BLOCKSIZE + 8),
                          **kwargs)


OURS = {"AdamW8bit": AdamW8bit, "PagedAdamW8bit": paged}
BNB = {"AdamW8bit": bnb.optim.AdamW8bit, "PagedAdamW8bit": bnb.optim.PagedAdamW8bit}  # on CPU: the same, unpaged
each_class = pytest.mark.parametrize("name", list(OURS))


def held(optimizer) -> int:
    got = optimizer.state_bytes()
    return sum(got.values()) if isinstance(got, dict) else got  # the paged class reports device and host bytes


def params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run(optimizer, ps, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        optimizer.step()


def states_equal(ours, theirs, a, b) -> bool:
    return all(torch.equal(t.reshape(-1), theirs.state[q][k].reshape(-1))
               for p, q in zip(a, b) for k, t in ours.state_tensors(p).items())


def test_the_maps_are_bitsandbytes():
    assert torch.equal(dynamic_map(signed=True), bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), bnb_functional.create_dynamic_map(signed=False))
    assert dynamic_map(signed=False).min() == 0 and len(set(dynamic_map(signed=False).tolist())) == 256


@each_class
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_bit_exact_with_bitsandbytes(name, dtype, weight_decay):
    a, b = params(SHAPES, dtype), params(SHAPES, dtype)
    ours = OURS[name](a, lr=1e-2, weight_decay=weight_decay)
    theirs = BNB[name](b, lr=1e-2, weight_decay=weight_decay)
    run(ours, a, 6, dtype=dtype)
    run(theirs, b, 6, dtype=dtype)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert states_equal(ours, theirs, a, b)
    assert [ours.state[p]["step"] for p in a] == [theirs.state[q]["step"] for q in b] == [6] * len(a)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 9000), lr=st.sampled_from([1e-3, 3e-2]), betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]))
def test_bit_exact_for_any_size(n, lr, betas):
    a, b = params([(n,)]), params([(n,)])
    run(AdamW8bit(a, lr=lr, betas=betas), a, 3)
    run(bnb.optim.AdamW8bit(b, lr=lr, betas=betas), b, 3)
    assert torch.equal(a[0], b[0])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9000), blocks=st.integers(1, 20), budget_pages=st.sampled_from([None, 1, 2, 5]))
def test_paged_bit_exact_for_any_page_size_and_budget(n, blocks, budget_pages):
    page_bytes = blocks * (2 * BLOCKSIZE + 8)
    budget = None if budget_pages is None else budget_pages * max(page_bytes, 32 * 1024)  # a 32-bit page: <= 32 KiB
    a, b = params([(n,), (300,)]), params([(n,), (300,)])
    opt = PagedAdamW8bit(a, lr=1e-2, page_bytes=page_bytes, budget_bytes=budget)
    run(opt, a, 3)
    run(bnb.optim.PagedAdamW8bit(b, lr=1e-2), b, 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert budget is None or opt.state_bytes()["device"] <= budget
    assert page_blocks(page_bytes) == blocks


def test_paged_state_moves_to_the_host_and_back():
    ps = params(SHAPES)
    opt = PagedAdamW8bit(ps, lr=1e-2)
    run(opt, ps, 1)
    total = held(opt)
    opt.page_out()
    assert opt.state_bytes() == {"device": 0, "host": total}
    run(opt, ps, 1)
    assert opt.state_bytes() == {"device": total, "host": 0}  # no budget: everything comes back


@pytest.mark.parametrize("chunk", [BLOCKSIZE, 5 * BLOCKSIZE, CHUNK])
def test_any_chunk_gives_bitsandbytes_bits(chunk):
    """The update runs CHUNK elements at a time (bounded scratch); blocks are independent, so the bits do not
    depend on it -- here a tensor over two default chunks, and chunks that do not divide it."""
    shapes = [(2 * CHUNK + 300,), (5000,)]
    a, b = params(shapes), params(shapes)
    run(AdamW8bit(a, lr=1e-2, chunk=chunk), a, 3)
    run(bnb.optim.AdamW8bit(b, lr=1e-2), b, 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@each_class
def test_state_is_two_bytes_per_parameter_as_estimated(name):
    sizes = [4096, 5000, 100, 64 * 128]
    ps = params([(n,) for n in sizes])
    opt = OURS[name](ps)
    run(opt, ps, 1)
    assert held(opt) == sum(state8_bytes(n) for n in sizes) == memory.optimizer_state_bytes(sizes, "adamw8bit")
    assert memory.state_bytes_after_step(AdamW8bit, [(n,) for n in sizes]) == held(opt)
    big = 2 ** 20
    assert state8_bytes(big) == 2 * big + 8 * big // BLOCKSIZE  # 2.03 bytes per parameter, fp32 AdamW's 8


@each_class
def test_a_checkpoint_moves_both_ways_with_bitsandbytes_and_resumes_exactly(name):
    a, b, c = params(SHAPES), params(SHAPES), params(SHAPES)
    ours, theirs, straight = OURS[name](a, lr=1e-2), BNB[name](b, lr=1e-2), OURS[name](c, lr=1e-2)
    run(theirs, b, 3)
    run(straight, c, 3)
    for p, q in zip(a, b):
        p.data.copy_(q.data)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))  # bitsandbytes' checkpoint into ours
    run(ours, a, 2, seed=7)
    run(straight, c, 2, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a, c))  # resumed = uninterrupted
    back = BNB[name](params(SHAPES), lr=1e-2)
    back.load_state_dict(ours.state_dict())  # ours into bitsandbytes'
    assert states_equal(ours, back, a, back.param_groups[0]["params"])


@each_class
def test_moments_dequantize_the_state(name):
    ps = params([(5000,)])
    opt = OURS[name](ps, lr=1e-2)
    run(opt, ps, 2)
    m, v = opt.moments(ps[0])
    assert m.shape == ps[0].shape and (v >= 0).all() and m.abs().max() > 0


@pytest.mark.parametrize("kwargs,arg", [({"lr": -1.0}, "lr"), ({"eps": float("nan")}, "eps"),
                                        ({"betas": (0.9,)}, "betas"), ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
                                        ({"weight_decay": -1.0}, "weight_decay"),
                                        ({"min_8bit_size": 0}, "min_8bit_size"),
                                        ({"chunk": 100}, "chunk"), ({"chunk": 1000}, "chunk")])
def test_bad_arguments_name_themselves(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        AdamW8bit(params([(10,)]), **kwargs)


@pytest.mark.parametrize("kwargs,arg", [({"page_bytes": 519}, "page_bytes"), ({"budget_bytes": 1000}, "budget_bytes"),
                                        ({"lr": float("inf")}, "lr")])
def test_bad_paged_arguments_name_themselves(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        PagedAdamW8bit(params([(10,)]), **kwargs)


@each_class
def test_a_bad_state_dict_is_refused_and_changes_nothing(name):
    ps = params(SHAPES)
    opt = OURS[name](ps, lr=1e-2)
    run(opt, ps, 2)
    good = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state_tensors(ps[0]).items()}

    def broken(index, key, value=None, drop=False):  # a copy of the state dict with one entry changed
        sd = opt.state_dict()
        sd["state"] = {i: {"step": e["step"], QUANT_STATE_KEY: dict(e[QUANT_STATE_KEY])} for i, e in sd["state"].items()}
        where = sd["state"][index] if key == "step" else sd["state"][index][QUANT_STATE_KEY]
        if drop:
            del where[key]
        else:
            where[key] = value
        return sd

    nested = good["state"][0][QUANT_STATE_KEY]
    cases = [(broken(0, "state1", nested["state1"].float()), "state1 must be torch.uint8"),
             (broken(1, "absmax1", torch.zeros(3)), "absmax1 must be torch.float32 with 20 elements"),
             (broken(2, "state2", torch.zeros(100, dtype=torch.uint8)), "state2 must be torch.float32"),
             (broken(0, "step", -1), "step must be a non-negative whole number"),
             (broken(0, "qmap1", torch.zeros(256)), "qmap1 is not the signed dynamic map"),
             (broken(0, "absmax2", drop=True), r"lacks \['absmax2'\]"),
             ([good], "state_dict must be an optimizer state_dict"),
             ({**good, "state": {7: good["state"][0]}}, "state_dict has state for parameter 7")]
    for sd, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        assert all(torch.equal(opt.state_tensors(ps[0])[k], v) for k, v in before.items())
        assert opt.state[ps[0]]["step"] == 2


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_memory_estimate_of_the_8bit_state_matches_the_measurement(tiny, method, ckpt):
    """The state measured by MemTracker is the estimate's, and so is the peak: LoRA's in the backward, full
    fine-tuning's in the optimizer step, where the de-quantized m and v of one chunk of the largest tensor live."""
    kw = dict(method=method, optimizer="adamw8bit", batch_size=2, seq_len=16, gradient_checkpointing=ckpt)
    est, got = memory.estimate(tiny, **kw), memory.measure(tiny, **kw)
    assert est.slots["optimizer"] == got.slots["optimizer"]
    assert abs(est.total / got.total - 1) < 0.01
    assert (est.peak_moment == "optimizer step") == (method == "full")


def test_the_step_scratch_is_bounded_by_the_chunk():
    """One tensor of 16 blocks of 256, stepped whole and 4 blocks at a time: the chunked step's peak is lower by
    the scratch of the 12 blocks it does not de-quantize at once (SCRATCH_BYTES_PER_ELEMENT each)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    peaks = {}
    for chunk in (16 * BLOCKSIZE, 4 * BLOCKSIZE):
        p = torch.nn.Parameter(torch.zeros(16 * BLOCKSIZE))
        opt = AdamW8bit([p], chunk=chunk, min_8bit_size=1)
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0))
        opt.step()
        tracker = MemTracker()
        tracker.track_external(p, opt)
        with tracker:
            opt.step()
        peaks[chunk] = tracker.get_tracker_snapshot("peak")[p.device]["Total"]
    saved = peaks[16 * BLOCKSIZE] - peaks[4 * BLOCKSIZE]
    assert abs(saved / (SCRATCH_BYTES_PER_ELEMENT * 12 * BLOCKSIZE) - 1) < 0.1
