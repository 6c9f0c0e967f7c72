"""TorchAttentionBackend against dense causal attention on fresh random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_workers.attention import get_attention_backend
from gpu_workers.attention.torch_backend import TorchAttentionBackend
from tests.checkpoints import build_metadata

HEAD_DIM = 16


def dense_causal_attention(q, k, v, scale):
    """q [q_len, H, D] are the last q_len positions of k/v [seq_len, Hkv, D]."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1).double()  # [seq_len, H, D]
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)  # [q_len, H, D]


def run_case(requests, num_heads, num_kv_heads, block_size, dtype=torch.float32, seed=None):
    """requests: (num_computed, num_new). Fills each request's cached prefix with random K/V in
    shuffled blocks, runs the backend on random new tokens, returns (out, reference, caches, ...)."""
    rng = random.Random(seed)
    blocks_needed = [-(-(c + n) // block_size) for c, n in requests]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM).to(dtype)
    seqs = [(c, n, [free.pop() for _ in range(b)]) for (c, n), b in zip(requests, blocks_needed)]
    meta = build_metadata(seqs, block_size)
    num_tokens = meta.num_tokens
    q = torch.randn(num_tokens, num_heads, HEAD_DIM).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, HEAD_DIM).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, HEAD_DIM).to(dtype)
    # The prefix each request already had in the cache, read before the backend writes.
    prefixes = []
    for c, _, blocks in seqs:
        slots = torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(c)], dtype=torch.long)
        prefixes.append((k_cache.view(-1, num_kv_heads, HEAD_DIM)[slots].clone(),
                         v_cache.view(-1, num_kv_heads, HEAD_DIM)[slots].clone()))
    scale = HEAD_DIM**-0.5
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
    refs = []
    for i, (pk, pv) in enumerate(prefixes):
        s, e = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        full_k = torch.cat([pk, k[s:e]])
        full_v = torch.cat([pv, v[s:e]])
        refs.append(dense_causal_attention(q[s:e], full_k, full_v, scale))
    return out, torch.cat(refs), (k, v, k_cache, v_cache, meta)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


MIXED = [(0, 7), (5, 1), (9, 4), (0, 1), (13, 1), (3, 6)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    "requests",
    [MIXED, [(0, 12), (0, 3), (0, 1)], [(4, 1), (17, 1), (0, 1), (30, 1)]],
    ids=["mixed", "prefill_only", "decode_only"],
)
def test_matches_dense_reference(requests, num_heads, num_kv_heads, block_size):
    out, ref, _ = run_case(requests, num_heads, num_kv_heads, block_size)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


def test_new_kv_written_at_slot_mapping():
    _, _, (k, v, k_cache, v_cache, meta) = run_case(MIXED, 8, 2, 4)
    slots = meta.slot_mapping
    assert torch.equal(k_cache.view(-1, 2, HEAD_DIM)[slots], k)
    assert torch.equal(v_cache.view(-1, 2, HEAD_DIM)[slots], v)


def test_bfloat16_close_to_float64_reference():
    out, ref, _ = run_case(MIXED, 8, 2, 4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_long_prefill_chunks_queries(monkeypatch):
    # Force several query-row chunks and decode chunks; the result must not change.
    import gpu_workers.attention.torch_backend as tb

    monkeypatch.setattr(tb, "_MAX_SCORE_ELEMENTS", 8 * 40)
    out, ref, _ = run_case([(10, 30), (20, 1), (3, 1), (0, 5)], 8, 2, 4)
    assert rel_err(out, ref) < 1e-5


def test_get_attention_backend():
    assert get_attention_backend("torch", torch.device("cpu")).name == "torch"
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="attention_backend.*'flash'"):
        get_attention_backend("flash", torch.device("cpu"))
