"""Varlen causal attention over the paged KV cache: prefill, chunked prefill, prefix-cache hits, and mixed
batches (a decode is just a request with q_len 1).

    grid = (cdiv(max_query_len, BLOCK_M), num_heads, num_seqs)
    program (t, h, s): query rows t*BLOCK_M .. of request s, head h. Request s's q_len queries are the
    LAST positions of its context of seq_len tokens, so query row i sits at absolute position
    ctx + i with ctx = seq_len - q_len, and sees keys 0 .. ctx + i, all read from the paged cache
    (the step's own K/V must already be written there).

        keys:   0 ............ full_end ........ kv_end
                [ seen by every row | causal diagonal ]
                  no mask              per-row mask  pos_k <= pos_q

Online softmax (flash-attention): running row max m, row sum l and float32 accumulator, exp2 with
log2(e) folded into the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import (SUPPORTED_DTYPES, cdiv, check_int_dtype, check_kv_cache,
                              check_last_dim_contiguous, check_same_device, next_pow2, paged_kv_offsets)

LOG2E = 1.4426950408889634
_NEG_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked row never gives inf - inf


@triton.jit
def _attend_kv_range(
    q, acc, l_i, m_i, q_pos,
    k_cache_ptr, v_cache_ptr, bt_row, kv_head,
    stride_cb, stride_co, stride_ch,
    qk_scale, head_dim, block_size, kv_start, kv_end,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    for n0 in range(kv_start, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        n_mask = pos < kv_end
        kv_off = paged_kv_offsets(bt_row, pos, n_mask, d, kv_head, block_size,
                                  stride_cb, stride_co, stride_ch)  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL_MASK:
            visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_bt"])  # the table width varies per step: no variant per value
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, seq_ids_ptr,
    stride_qt, stride_qh,  # query [num_tokens, num_heads, head_dim]
    stride_ot, stride_oh,  # out, same shape
    stride_cb, stride_co, stride_ch,  # caches [num_blocks, block_size, num_kv_heads, head_dim]
    stride_bt,  # block_tables [num_seqs, max_blocks]
    qk_scale, head_dim, block_size,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SEQ_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_SEQ_IDS:  # the prefills of a mixed batch (decode_attention takes its decodes)
        seq = tl.load(seq_ids_ptr + tl.program_id(2))
    else:
        seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # this request has fewer query tiles than the longest one
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # absolute position of the request's first query
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the request
    d = tl.arange(0, BLOCK_D)
    io_mask = (rows < q_len)[:, None] & (d < head_dim)[None, :]
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :], mask=io_mask, other=0.0)
    q_pos = ctx + rows  # [BLOCK_M] absolute positions

    m_i = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = ctx + tile * BLOCK_M
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below it are visible to every row of the tile
    kv_end = ctx + tl.minimum((tile + 1) * BLOCK_M, q_len)  # one past the last row's position
    acc, l_i, m_i = _attend_kv_range(
        q, acc, l_i, m_i, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head,
        stride_cb, stride_co, stride_ch, qk_scale, head_dim, block_size, 0, full_end,
        BLOCK_N, BLOCK_D, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_kv_range(
        q, acc, l_i, m_i, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head,
        stride_cb, stride_co, stride_ch, qk_scale, head_dim, block_size, full_end, kv_end,
        BLOCK_N, BLOCK_D, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _tile_config(max_query_len: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from a sweep on an H200 (bf16, 32/8 heads, 2026-11-27).
    head_dim 128: 64x64 was best for 1k-token prompts (128x128 gained 2-8% only on 4k contexts);
    head_dim 64: 128x64 tiles gained ~9%. Short queries (decodes, small chunks) waste less with BLOCK_M 16.
    float32 keeps 64-row tiles (128x128 overflows shared memory); head_dim 256 is correct but untuned."""
    if max_query_len <= 16:
        return 16, (32 if head_dim > 128 else 64), 4, 2
    if head_dim > 128:
        return 64, 32, 8, 2
    if head_dim <= 64 and max_query_len >= 128 and dtype != torch.float32:
        return 128, 64, 8, 2
    return 64, 64, 4, 2


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's queries
    max_query_len: int,  # host-side max of the q_lens (sizes the grid without a device sync)
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], query's dtype
    seq_ids: torch.Tensor | None = None,  # [n] int32: only these requests (a mixed batch's prefills)
) -> torch.Tensor:
    """Causal attention of each request's queries (its last q_len positions) over its paged context.

    K/V of every context position, including this step's tokens, must already be in the cache.
    With seq_ids, only those requests' rows of `out` are written (decode_attention takes the decodes
    of a mixed batch). Returns `out`.
    """
    check_kv_cache(k_cache, v_cache)
    check_last_dim_contiguous("query", query, 3)
    check_last_dim_contiguous("block_tables", block_tables, 2)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if query.dtype not in SUPPORTED_DTYPES or query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} must match the cache dtype {k_cache.dtype}")
    if head_dim != cache_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query (num_heads, head_dim)=({num_heads}, {head_dim}) does not fit a cache of "
                         f"{num_kv_heads} KV heads of size {cache_dim}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    if num_seqs < 0 or query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(f"need seq_lens [num_seqs], query_start_loc [num_seqs + 1], block_tables "
                         f"[num_seqs, max_blocks]; got {tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}, "
                         f"{tuple(block_tables.shape)}")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        check_int_dtype(name, t, (torch.int32, torch.int64))
    if seq_ids is not None:
        if seq_ids.dim() != 1:
            raise ValueError(f"seq_ids must be [n], got {tuple(seq_ids.shape)}")
        check_int_dtype("seq_ids", seq_ids, (torch.int32, torch.int64))
        check_same_device(k_cache.device, seq_ids=seq_ids)
    if out is None:
        out = torch.empty_like(query)
    check_last_dim_contiguous("out", out, 3)
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_same_device(k_cache.device, query=query, block_tables=block_tables, query_start_loc=query_start_loc,
                      seq_lens=seq_lens, out=out)
    num_programs = num_seqs if seq_ids is None else seq_ids.shape[0]
    if num_programs == 0 or num_tokens == 0 or max_query_len <= 0:
        return out

    block_m, block_n, num_warps, num_stages = _tile_config(max_query_len, head_dim, query.dtype)
    grid = (cdiv(max_query_len, block_m), num_heads, num_programs)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out,
        query_start_loc.contiguous(), seq_lens.contiguous(), block_tables,
        seq_lens if seq_ids is None else seq_ids,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        scale * LOG2E, head_dim, block_size,
        GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(head_dim)), HAS_SEQ_IDS=seq_ids is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
