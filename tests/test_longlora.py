"""LongLoRA: S²-Attn against its definition (a dense mask) and full attention, causality (no roll leak), the
transformers hook, position interpolation, LoRA+ trainable counts, FLOP counts, bad input."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import assert_same, snapshot
from lorabook.longlora_kernel import head_runs, pieces
from lorabook.longlora import (attention_flops, disable_s2attn, enable_s2attn, group_ids, interpolate_positions,
                               interpolation_factor, longlora_trainable, s2_attention, s2_attention_masked, s2_mask)
from lorabook.lora import add_lora
from lorabook.models import tiny_llama


def qkv(n, heads=9, kv_heads=3, d=8, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, n, d, generator=g, dtype=dtype).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def loop_reference(q, k, v, group_size, shift=True):
    """S²-Attn the slow, obvious way: for every head and every group of positions, causal softmax attention over
    that group alone (the groups from the rule written out, not from lorabook's code)."""
    heads, n, half = q.shape[1], q.shape[2], group_size // 2
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    out = torch.zeros_like(q)
    for h in range(heads):
        if shift and h >= heads // 2:
            bounds = [0] + list(range(half, n, group_size)) + [n]
        else:
            bounds = list(range(0, n, group_size)) + [n]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                s = q[:, h, lo:hi] @ k[:, h, lo:hi].transpose(-1, -2) / math.sqrt(q.shape[-1])
                s = s.masked_fill(torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1), float("-inf"))
                out[:, h, lo:hi] = s.softmax(-1) @ v[:, h, lo:hi]
    return out


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("path", ["kernel", "grouped"])
@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 4), half=st.integers(1, 4), extra=st.integers(0, 7), heads_per_kv=st.integers(1, 3),
       kv_heads=st.integers(1, 3), batch=st.integers(1, 2))
def test_fast_paths_equal_the_loop_and_the_mask_forward_and_backward(path, groups, half, extra, heads_per_kv,
                                                                     kv_heads, batch):
    g = 2 * half
    n = groups * g + (extra % g)                      # sometimes not a multiple: the padded path
    q, k, v = qkv(n, heads=heads_per_kv * kv_heads, kv_heads=kv_heads, batch=batch)
    fast, masked, loop = (s2_attention(q, k, v, g, path=path), s2_attention_masked(q, k, v, g),
                          loop_reference(q, k, v, g))
    torch.testing.assert_close(fast, loop, rtol=0, atol=1e-12)
    torch.testing.assert_close(masked, loop, rtol=0, atol=1e-12)
    for a, b in zip(grads(fast, (q, k, v)), grads(loop, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fp32_fast_and_masked_paths_agree_to_rounding():
    q, k, v = qkv(64, dtype=torch.float32)
    diff = (s2_attention(q, k, v, 16) - s2_attention(q, k, v, 16, path="masked")).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_is_the_grouped_path_bit_for_bit(dtype):
    q, k, v = qkv(96, dtype=dtype)                     # 9 heads on 3: runs cut key/value head 1 (heads 3 | 4, 5)
    kernel, grouped = s2_attention(q, k, v, 32, path="kernel"), s2_attention(q, k, v, 32, path="grouped")
    assert torch.equal(kernel, grouped)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]                  # the same inputs, float64
    exact = grads(loop_reference(*wide, 32), wide)
    for a, b, c in zip(grads(kernel, (q, k, v)), grads(grouped, (q, k, v)), exact):
        # the gradients round differently (the kernel sums GQA's key/value gradients in fp32 inside): both as close
        # to the float64 gradient as the dtype allows
        err_kernel, err_grouped = ((x.double() - c).abs().max().item() for x in (a, b))
        assert err_kernel <= max(2 * err_grouped, 1e-5)


def test_kernel_path_reads_transformers_layout_and_broadcast_gradients():
    """transformers hands (b, H, n, d) views of (b, n, H, d) projections; ``.sum()`` sends a stride-0 gradient."""
    leaves = [t.transpose(1, 2).detach().contiguous().requires_grad_() for t in qkv(40, d=4)]  # (b, n, heads, d)
    q, k, v = (t.transpose(1, 2) for t in leaves)                                               # strided views
    assert not q.is_contiguous()
    torch.testing.assert_close(s2_attention(q, k, v, 8, path="kernel"), loop_reference(q, k, v, 8), rtol=0, atol=1e-12)
    kernel = torch.autograd.grad(s2_attention(q, k, v, 8, path="kernel").sum(), leaves)
    loop = torch.autograd.grad(loop_reference(q, k, v, 8).sum(), leaves)
    for a, b in zip(kernel, loop):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_auto_takes_the_kernel_where_it_runs_and_grouped_with_dropout():
    q, k, v = qkv(32, dtype=torch.float32)
    torch.manual_seed(0)
    with_dropout = s2_attention(q, k, v, 8, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(with_dropout, s2_attention(q, k, v, 8, dropout_p=0.5, path="grouped"))
    assert torch.equal(s2_attention(q, k, v, 8), s2_attention(q, k, v, 8, path="kernel"))
    with pytest.raises(ValueError, match="path='kernel' needs .* dropout_p=0"):
        s2_attention(q, k, v, 8, dropout_p=0.5, path="kernel")


def test_kernel_pieces_cover_every_query_once_and_keep_gqa_groups_whole():
    assert head_runs(0, 4, 3) == [(slice(0, 3), slice(0, 1)), (slice(3, 4), slice(1, 2))]
    assert head_runs(4, 9, 3) == [(slice(4, 6), slice(1, 2)), (slice(6, 9), slice(2, 3))]
    assert head_runs(0, 16, 4) == [(slice(0, 16), slice(0, 4))]   # Llama-style: one call for all aligned heads
    batch, heads, n, g = 2, 9, 32, 8
    covered = torch.zeros(batch, heads, n, dtype=torch.long)
    for b, q_heads, kv, start, stop in pieces(batch, heads, 3, n, g, shift=True):
        assert (q_heads.stop - q_heads.start) % (kv.stop - kv.start) == 0
        assert stop - start == (g // 2 if q_heads.start >= heads // 2 and start in (0, n - g // 2) else g)
        covered[b, q_heads, start:stop] += 1
    assert (covered == 1).all()


def test_one_group_without_shift_is_full_causal_attention():
    q, k, v = qkv(32)
    full = F.scaled_dot_product_attention(q, *(t.repeat_interleave(3, dim=1) for t in (k, v)), is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, 32, shift=False), full, rtol=0, atol=1e-12)
    # with the shift on, the unshifted heads (h < 9 // 2) still see the whole sequence
    torch.testing.assert_close(s2_attention(q, k, v, 32)[:, :4], full[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(s2_attention(q, k, v, 32)[:, 4:], full[:, 4:])


def test_shift_off_is_block_local_attention():
    q, k, v = qkv(24, heads=2, kv_heads=1)
    kk, vv = (t.expand(-1, 2, -1, -1) for t in (k, v))
    blocks = [F.scaled_dot_product_attention(q[:, :, i:i + 8], kk[:, :, i:i + 8], vv[:, :, i:i + 8], is_causal=True)
              for i in range(0, 24, 8)]
    torch.testing.assert_close(s2_attention(q, k, v, 8, shift=False), torch.cat(blocks, dim=2), rtol=0, atol=1e-12)


def test_smollm2_shapes_shift_five_of_nine_heads():
    mask = s2_mask(16, 4, 9)
    unshifted = [h for h in range(9) if torch.equal(mask[h], s2_mask(16, 4, 1, shift=False)[0])]
    assert unshifted == [0, 1, 2, 3]                 # heads 4..8 (five of nine) are shifted
    assert mask[8, 1, 0] and not mask[8, 2, 1]         # shifted: [0, 2) then [2, 6)
    assert group_ids(10, 4, shifted=True)[0].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def depends_on_later(fn, n=16, group_size=4):
    """Pairs (i, j > i) where output position i has a non-zero gradient with respect to input position j."""
    q, k, v = qkv(n, heads=2, kv_heads=1, batch=1)
    out = fn(q, k, v, group_size)
    leaks = []
    for i in range(n):
        gq, gk, gv = torch.autograd.grad(out[:, :, i].sum(), (q, k, v), retain_graph=True)
        later = (gq.abs() + gk.abs() + gv.abs()).sum(dim=(0, 1, 3))[i + 1:]  # (n - i - 1,) per later position
        leaks += [(i, i + 1 + j) for j in torch.nonzero(later).flatten().tolist()]
    return leaks


def rolled(q, k, v, group_size):
    """The reference code's rolled shift, as a mask (s2_mask(wrap=True)): what this module does not do."""
    mask = s2_mask(q.shape[2], group_size, q.shape[1], wrap=True)
    kk, vv = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def test_no_output_depends_on_a_later_input():
    assert depends_on_later(s2_attention) == []
    assert depends_on_later(lambda *a: s2_attention(*a, path="masked")) == []
    assert depends_on_later(lambda q, k, v, g: s2_attention(q, k, v, g, shift=False)) == []


def test_the_roll_leaks_the_last_tokens_into_the_first_half_group():
    leaks = depends_on_later(rolled)
    assert leaks and {i for i, _ in leaks} == {0, 1} and {j for _, j in leaks} == {14, 15}


def test_flops_limit_is_about_four_at_a_quarter():
    full, s2 = attention_flops(8192, 64, 9), attention_flops(8192, 64, 9, 2048)
    assert full == 9 * (8192 * 8193 // 2) * 4 * 64 * 3
    assert 4 < full / s2 < 4.5                       # above 4: the shifted heads' half-groups score fewer pairs
    assert attention_flops(64, 8, 2, 64, backward=False) * 3 == attention_flops(64, 8, 2, 64)


def test_hook_gives_s2_attention_in_training_and_full_attention_after():
    model = tiny_llama(n_heads=4, n_kv_heads=2)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        enable_s2attn(model, group_size=8)
        s2 = model(ids).logits
    torch.testing.assert_close(s2[:, :4], full[:, :4])   # the first half-group is one group for every head
    assert (s2[:, 4:] - full[:, 4:]).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="disable_s2attn"):
        model.generate(ids, max_new_tokens=2)  # the second token: 1 query against 33 keys
    padded = torch.ones_like(ids)
    padded[:, :3] = 0
    with pytest.raises(RuntimeError, match="unpadded"):
        model(ids, attention_mask=padded)
    disable_s2attn(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full)
    assert model.config._attn_implementation == "sdpa"


def test_hook_pads_a_length_that_does_not_divide_and_stays_causal():
    model = tiny_llama(n_heads=4, n_kv_heads=2)
    enable_s2attn(model)                               # a quarter of each batch's length: 30 -> 8 (even)
    embeds = model.get_input_embeddings()(torch.randint(0, 256, (1, 30))).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    g, = torch.autograd.grad(logits[0, 9].sum(), embeds)
    assert g[0, 10:].abs().sum() == 0 and g[0, :10].abs().sum() > 0


def test_position_interpolation_rotates_p_times_factor_like_p_before():
    model = tiny_llama(max_seq_len=64)
    x = torch.zeros(1, 1, 16)
    before = model.model.rotary_emb(x, torch.arange(32)[None])
    assert interpolate_positions(model, target_len=150) == 3.0 and interpolation_factor(150, 64) == 3
    assert model.config.max_position_embeddings == 192
    after = model.model.rotary_emb(x, (3 * torch.arange(32))[None])
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)
    interpolate_positions(model, factor=1)           # back to plain RoPE
    assert model.config.rope_parameters["rope_type"] == "default" and model.config.max_position_embeddings == 64
    torch.testing.assert_close(model.model.rotary_emb(x, torch.arange(32)[None])[0], before[0], rtol=0, atol=0)


def test_lora_plus_trains_lora_embeddings_and_norms():
    model = add_lora(tiny_llama(), target_modules=("q_proj", "v_proj"), r=4)
    counts = longlora_trainable(model)
    d, vocab, layers = 64, 256, 2
    assert counts["embeddings"] == vocab * d                     # tied head: counted once
    assert counts["norms"] == (2 * layers + 1) * d
    assert counts["lora"] == layers * (4 * (d + d) + 4 * (d + 32))  # q (64 -> 64), v (64 -> 32 with 2 KV heads)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    assert counts["trainable"] == trainable == counts["lora"] + counts["embeddings"] + counts["norms"]
    plain = longlora_trainable(model, embeddings=False, norms=False)
    assert plain["trainable"] == plain["lora"] == counts["lora"]


# -- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size, match", [(0, "group_size"), (-4, "group_size"), (5, "even"),
                                               (64, "group_size .* sequence length"), (True, "group_size")])
def test_bad_group_size(group_size, match):
    q, k, v = qkv(16)
    with pytest.raises(ValueError, match=match):
        s2_attention(q, k, v, group_size)


def test_heads_that_do_not_divide_and_bad_shapes():
    q, k, v = qkv(16, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiple of k's kv_heads"):
        s2_attention(q, k, v, 4)
    q, k, v = qkv(16)
    with pytest.raises(ValueError, match="4-D"):
        s2_attention(q[0], k, v, 4)
    with pytest.raises(ValueError, match="same shape"):
        s2_attention(q, k, v[:, :1], 4)
    with pytest.raises(ValueError, match="like q"):
        s2_attention(q, k[:, :, :8], v[:, :, :8], 4)
    with pytest.raises(ValueError, match="without causal"):
        s2_attention(*qkv(18), 4, causal=False)
    with pytest.raises(ValueError, match="path"):
        s2_attention(q, k, v, 4, path="flash")


def test_bad_interpolation_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = snapshot(model), dict(model.config.rope_parameters)
    for kwargs, match in [(dict(factor=0.5), "factor"), (dict(factor=float("nan")), "factor"),
                          (dict(), "exactly one"), (dict(factor=2, target_len=512), "exactly one"),
                          (dict(target_len=0), "target_len")]:
        with pytest.raises(ValueError, match=match):
            interpolate_positions(model, **kwargs)
        assert_same(snapshot(model), before[0])
        assert model.config.rope_parameters == before[1]
    with pytest.raises(ValueError, match="no RoPE"):
        interpolate_positions(nn.Linear(2, 2), factor=2)


def test_s2attn_needs_the_registry_hook():
    with pytest.raises(ValueError, match="registry hook"):
        enable_s2attn(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model"):
        enable_s2attn("smollm2")
    model = tiny_llama()
    with pytest.raises(ValueError, match="even"):
        enable_s2attn(model, group_size=7)
    with pytest.raises(ValueError, match="fraction"):
        enable_s2attn(model, fraction=0)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not use S²-Attn"):
        disable_s2attn(model)


def test_lora_plus_needs_lora():
    with pytest.raises(ValueError, match="add_lora"):
        longlora_trainable(tiny_llama())
