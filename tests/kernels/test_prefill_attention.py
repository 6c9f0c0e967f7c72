"""prefill_attention against a dense float64 causal reference: full prefills, chunks over cached prefixes,
and mixed batches with decodes, over shuffled paged caches."""

import os

import pytest
import torch


from kernels import prefill_attention  # noqa: E402

from tests.triton_env import DEVICE, paged_cache  # noqa: E402
# triton 3.6's interpreter computes bf16 tl.dot on the raw bits (garbage); bf16 is checked on the GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="bf16 tl.dot is wrong in the triton 3.6 interpreter"))


def _reference(query, q_lens, dense, scale):
    """Request i's q_len queries are the last positions of its context; causal over the whole context."""
    out, start = [], 0
    for q_len, (k, v) in zip(q_lens, dense):
        n = k.shape[0]
        q = query[start:start + q_len].double()  # [q_len, num_heads, head_dim]
        start += q_len
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q, k) * scale
        q_pos = torch.arange(n - q_len, n, device=q.device)
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        out.append(torch.einsum("hqn,nhd->qhd", scores.softmax(-1), v))
    return torch.cat(out)


def _run(q_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim, dtype=torch.float32):
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=DEVICE).to(dtype)
    query = qkv[:, :num_heads]  # a strided view, as split from a fused qkv projection
    query_start_loc = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens_t,
                            max(q_lens), scale)
    ref = _reference(query, q_lens, dense, scale)
    return ((out.double() - ref).norm() / ref.norm()).item(), out


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_full_prefill(block_size, num_heads, num_kv_heads, head_dim):
    seq_lens = [1, 23, 70]  # 70 > BLOCK_M: several query tiles, and a diagonal spanning key tiles
    err, _ = _run(seq_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim)
    assert err < 1e-4


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_chunked_prefill_over_cached_prefix(block_size, num_heads, num_kv_heads):
    # (q_len, seq_len): a chunk after 100 cached tokens, a prefix-cache hit of 64, a long chunk over 9.
    q_lens, seq_lens = [13, 5, 67], [113, 69, 76]
    err, _ = _run(q_lens, seq_lens, block_size, num_heads, num_kv_heads, 16)
    assert err < 1e-4


@pytest.mark.parametrize("head_dim", [16, 64])
def test_mixed_batch_with_decodes(head_dim):
    # Decodes (q_len 1) next to a prefill chunk: one launch serves them all, with BLOCK_M 64.
    q_lens, seq_lens = [1, 40, 1, 1], [130, 52, 7, 1]
    err, _ = _run(q_lens, seq_lens, 16, 8, 2, head_dim)
    assert err < 1e-4


def test_prefills_of_a_mixed_batch_only():
    """seq_ids: only the listed requests' rows are computed (decode_attention takes the others)."""
    q_lens, seq_lens = [1, 40, 1, 9], [130, 52, 7, 20]
    k_cache, v_cache, block_tables, dense = paged_cache(seq_lens, 16, 2, 16, torch.float32)
    query = torch.randn(sum(q_lens), 8, 16, device=DEVICE)
    qsl = torch.tensor([0, 1, 41, 42, 51], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(query, 7.0)
    prefill_attention(query, k_cache, v_cache, block_tables, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                      40, 0.25, out=out, seq_ids=torch.tensor([1, 3], dtype=torch.int32, device=DEVICE))
    ref = _reference(query, q_lens, dense, 0.25)
    rows = list(range(1, 41)) + list(range(42, 51))
    assert ((out[rows].double() - ref[rows]).norm() / ref[rows].norm()).item() < 1e-4
    assert torch.all(out[[0, 41]] == 7.0)  # the decodes' rows: not written


def test_decodes_only_short_queries():
    # max_query_len <= 16 takes the BLOCK_M 16 path; GQA group of 3 and head_dim 80 need masks.
    err, _ = _run([1, 3, 16], [50, 3, 33], 4, 6, 2, 80)
    assert err < 1e-4


@pytest.mark.parametrize("dtype,tol", [BF16_ON_GPU, (torch.float16, 5e-3)])
def test_half_precision(dtype, tol):
    err, out = _run([9, 30], [40, 30], 16, 4, 2, 32, dtype)
    assert out.dtype == dtype
    assert err < tol


def test_prefill_rejects_bad_inputs():
    k_cache, v_cache, block_tables, _ = paged_cache([5, 9], 4, 2, 16, torch.float32)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
    query = torch.randn(14, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(query.double(), k_cache, v_cache, block_tables, qsl, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="last dim"):
        prefill_attention(query.transpose(0, 2).contiguous().transpose(0, 2), k_cache, v_cache,
                          block_tables, qsl, seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill_attention(query, k_cache, v_cache, block_tables, qsl[:2], seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill_attention(query, k_cache, v_cache, block_tables, qsl.float(), seq_lens, 9, 1.0)
    with pytest.raises(ValueError, match="out"):
        prefill_attention(query, k_cache, v_cache, block_tables, qsl, seq_lens, 9, 1.0, out=query[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_large_shapes_gpu(dtype, tol, head_dim):
    q_lens, seq_lens = [1, 1000, 512, 77, 1], [4000, 1000, 2560, 1100, 1]
    err, _ = _run(q_lens, seq_lens, 16, 32, 8, head_dim, dtype)
    assert err < tol
