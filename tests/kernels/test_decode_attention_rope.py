"""decode_attention with `rope=`: the step's RoPE (and Qwen3's q/k norm), its K/V cache write and the
attention in one launch, against the two launches it replaces (apply_rotary_and_write_kv, then
decode_attention) and against a float64 torch reference."""

import pytest
import torch

from kernels import apply_rotary_and_write_kv, decode_attention
from kernels.decode_attention import NewTokens
from tests.triton_env import DEVICE, paged_cache

HEAD_DIM = 32


def _rope_tables(max_pos: int, head_dim: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


def _step(seq_lens, num_heads, num_kv_heads, block_size=4, norm=False, pad_last=False, seed=0):
    """A decode step: paged caches holding every sequence's context but its last position, the step's
    raw q / k / v as strided views of one qkv tensor, slots for the last positions (the last sequence's
    -1 with pad_last: a CUDA graph's padding row, never stored)."""
    torch.manual_seed(seed)
    k_cache, v_cache, block_tables, _ = paged_cache(seq_lens, block_size, num_kv_heads, HEAD_DIM, torch.float32)
    n = len(seq_lens)
    qkv = torch.randn(n, num_heads + 2 * num_kv_heads, HEAD_DIM, device=DEVICE)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    positions = torch.tensor([s - 1 for s in seq_lens], dtype=torch.int64, device=DEVICE)
    slots = []
    for i, s in enumerate(seq_lens):
        block = block_tables[i, (s - 1) // block_size].item()
        slots.append(block * block_size + (s - 1) % block_size)
    if pad_last:
        slots[-1] = -1
    cos, sin = _rope_tables(max(seq_lens) + 8, HEAD_DIM)
    weights = {}
    if norm:
        weights = dict(q_norm_weight=(1 + 0.2 * torch.randn(HEAD_DIM)).to(DEVICE),
                       k_norm_weight=(1 + 0.2 * torch.randn(HEAD_DIM)).to(DEVICE), eps=1e-6)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, q, k, v, positions, cos, sin, slot_mapping, seq_lens_t, weights


def _unfused(step, num_splits):
    k_cache, v_cache, block_tables, q, k, v, positions, cos, sin, slots, seq_lens, weights = step
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q_rot = apply_rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slots, **weights)
    out = decode_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, int(seq_lens.max()), HEAD_DIM ** -0.5,
                           num_splits=num_splits)
    return out, k_cache, v_cache


def _fused(step, num_splits):
    k_cache, v_cache, block_tables, q, k, v, positions, cos, sin, slots, seq_lens, weights = step
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    rope = NewTokens(k, v, positions, cos, sin, slots, **weights)
    out = decode_attention(q, k_cache, v_cache, block_tables, seq_lens, int(seq_lens.max()), HEAD_DIM ** -0.5,
                           num_splits=num_splits, rope=rope)
    return out, k_cache, v_cache


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_one_launch_equals_rotary_write_then_attention(num_heads, num_kv_heads, norm, num_splits):
    """Same outputs and the same caches afterwards; contexts of 1 token (only the new one), a block
    boundary, and splits whose last holds only the new token (9 = 3 + 3 + 3 with 3 splits)."""
    step = _step([1, 9, 13, 30], num_heads, num_kv_heads, norm=norm)
    out, k_cache, v_cache = _fused(step, num_splits)
    ref_out, ref_k, ref_v = _unfused(step, num_splits)
    torch.testing.assert_close(k_cache, ref_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_padding_rows_store_nothing_and_leave_the_others_alone():
    step = _step([5, 17, 6], 4, 2, pad_last=True, seed=1)
    before_k, before_v = step[0].clone(), step[1].clone()
    out, k_cache, v_cache = _fused(step, None)
    ref_out, ref_k, _ = _unfused(step, None)
    changed = (k_cache != before_k).any(-1).any(-1).flatten()  # [num_blocks * block_size] rows written
    assert changed.sum().item() == 2, "exactly the two real tokens' slots are written"
    assert torch.equal(v_cache.flatten(0, 1)[~changed], before_v.flatten(0, 1)[~changed])
    torch.testing.assert_close(k_cache, ref_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:2], ref_out[:2], rtol=1e-5, atol=1e-5)


def test_matches_a_float64_reference():
    """Independent of the kernels above: torch's rotate_half RoPE, then softmax attention in float64
    over the cached context and the new token."""
    seq_lens = [7, 20]
    step = _step(seq_lens, 4, 2, seed=2)
    k_cache, v_cache, block_tables, q, k, v, positions, cos, sin, *_ = step
    out, _, _ = _fused(step, None)

    def rope(x, pos):  # [heads, dim]
        c, s = cos[pos].double(), sin[pos].double()
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    for i, n in enumerate(seq_lens):
        ids = block_tables[i, : -(-n // 4)].long()
        ks = torch.cat([k_cache[ids].flatten(0, 1)[: n - 1].double(), rope(k[i], n - 1)[None]])  # [n, kvh, d]
        vs = torch.cat([v_cache[ids].flatten(0, 1)[: n - 1].double(), v[i].double()[None]])
        qi = rope(q[i], n - 1)  # [heads, d]
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        p = (torch.einsum("hd,nhd->hn", qi, ks) * HEAD_DIM ** -0.5).softmax(-1)
        ref = torch.einsum("hn,nhd->hd", p, vs)
        assert ((out[i].double() - ref).norm() / ref.norm()).item() < 1e-5


def test_rejects_a_mixed_batch_and_mismatched_keys():
    step = _step([5, 6], 4, 2)
    k_cache, v_cache, block_tables, q, k, v, positions, cos, sin, slots, seq_lens, _ = step
    rope = NewTokens(k, v, positions, cos, sin, slots)
    with pytest.raises(ValueError, match="decode-only"):
        decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 6, 0.1, rope=rope,
                         seq_ids=torch.arange(2, dtype=torch.int32, device=DEVICE),
                         query_start_loc=torch.arange(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="value"):
        decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 6, 0.1, rope=rope._replace(value=v[:, :1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 6, 0.1, rope=rope._replace(slot_mapping=slots[:1]))
