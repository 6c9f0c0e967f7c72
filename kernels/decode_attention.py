"""Paged decode attention (one query token per sequence), GQA-aware, with split-KV (flash-decoding).

    grid = (num_seqs, num_kv_heads, num_splits)
    program (s, kvh, p): the G = num_heads // num_kv_heads query heads of KV head kvh (padded to >= 16
    rows for tl.dot) attend to the tokens [p * partition_size, (p+1) * partition_size) of sequence s,
    so each K/V tile is loaded once per group, not once per query head.

    context of seq s:  [ split 0 | split 1 | split 2 ]   each split: running (max, sum, acc), then
                            │         │         │        a reduce kernel rescales and adds them:
                            └─────────┴────┬────┘        out = Σ acc_p e^(m_p - M) / Σ l_p e^(m_p - M)
                                        reduce

With one split the first kernel normalises and writes the output itself (no reduce launch). Scores use
exp2 with log2(e) folded into the scale; accumulation is float32 whatever the cache dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.kv_cache import (SUPPORTED_DTYPES, cdiv, check_int_dtype, check_kv_cache,
                              check_last_dim_contiguous, check_same_device, next_pow2)

LOG2E = 1.4426950408889634
_NEG_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity": an empty split never produces inf - inf = nan
_MIN_PARTITION = 128  # tokens: below this, splitting costs more (reduce traffic) than it gains
_MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qt, stride_qh,  # query [num_seqs, num_heads, head_dim]
    stride_cb, stride_co, stride_ch,  # caches [num_blocks, block_size, num_kv_heads, head_dim]
    stride_bt,  # block_tables [num_seqs, max_blocks]
    stride_ot, stride_oh,  # out [num_seqs, num_heads, head_dim]
    stride_as, stride_ah, stride_ap,  # part_acc [num_seqs, num_heads, num_splits, head_dim + 2]; part_m and
    # part_l are its columns head_dim and head_dim + 1, so they share its strides
    qk_scale,  # softmax scale * log2(e)
    head_dim, block_size, partition_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < head_dim
    heads = kv_head * GROUP + g  # [BLOCK_G] query heads of this KV head
    q_off = seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], _NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions in the context
        n_mask = pos < end
        block_ids = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        kv_off = (block_ids[:, None] * stride_cb + (pos % block_size)[:, None] * stride_co
                  + kv_head * stride_ch + d[None, :])  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        o_off = seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        ml_off = seq.to(tl.int64) * stride_as + heads * stride_ah + split * stride_ap  # [BLOCK_G]
        tl.store(part_m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(part_l_ptr + ml_off, l_i, mask=g_mask)
        a_off = (seq.to(tl.int64) * stride_as + heads[:, None] * stride_ah + split * stride_ap + d[None, :])
        tl.store(part_acc_ptr + a_off, acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_ot, stride_oh,
    stride_as, stride_ah, stride_ap,  # as in _decode_split_kernel
    num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = sp < num_splits
    d_mask = d < head_dim
    ml_off = seq * stride_as + head * stride_ah + sp * stride_ap
    m = tl.load(part_m_ptr + ml_off, mask=s_mask, other=_NEG_INIT)  # [BLOCK_S]
    l = tl.load(part_l_ptr + ml_off, mask=s_mask, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits: m = -1e30 -> weight 0
    w = tl.where(s_mask, w, 0.0)
    a_off = seq * stride_as + head * stride_ah + sp[:, None] * stride_ap + d[None, :]
    acc = tl.load(part_acc_ptr + a_off, mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a token number, so CPU tests still exercise splits


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split the context until (seq, kv head, split) programs fill the GPU: about 4 waves when the batch
    alone fills less than one, else 2; never a split under 128 tokens. On an H200 (bf16, 8 KV heads,
    head_dim 128) this was within ~10% of the best count from 1 x 4k to 128 x 1k contexts."""
    programs = max(num_seqs * num_kv_heads, 1)
    sms = _num_sms(device)
    wanted = cdiv((4 if programs < sms else 2) * sms, programs)
    return max(1, min(wanted, cdiv(max_seq_len, _MIN_PARTITION), _MAX_SPLITS))


def _launch_config(head_dim: int, few_programs: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel. When (seq, kv head) pairs are fewer than the
    SMs, each program is long and 128-token tiles keep more loads in flight (-10% time at 1 x 32k);
    otherwise 64 was best (+15% at 32 x 1k with 128). H200 sweep, bf16, head_dim 128."""
    if head_dim > 128:
        return 32, 4, 2
    return (128 if few_programs else 64), 4, 2


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the query token (>= 1)
    max_seq_len: int,  # host-side max of seq_lens (sizes the splits without a device sync)
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], query's dtype
    num_splits: int | None = None,  # None: chosen from batch size and context length
) -> torch.Tensor:
    """Attention of each sequence's single query token over its whole paged context. Returns `out`."""
    check_kv_cache(k_cache, v_cache)
    check_last_dim_contiguous("query", query, 3)
    check_last_dim_contiguous("block_tables", block_tables, 2)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if query.dtype not in SUPPORTED_DTYPES or query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} must match the cache dtype {k_cache.dtype}")
    if head_dim != cache_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query (num_heads, head_dim)=({num_heads}, {head_dim}) does not fit a cache of "
                         f"{num_kv_heads} KV heads of size {cache_dim}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    if seq_lens.shape != (num_seqs,) or block_tables.shape[0] != num_seqs:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} "
                         f"must have {num_seqs} rows (one per query token)")
    check_int_dtype("block_tables", block_tables, (torch.int32, torch.int64))
    check_int_dtype("seq_lens", seq_lens, (torch.int32, torch.int64))
    if out is None:
        out = torch.empty_like(query)
    check_last_dim_contiguous("out", out, 3)
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_same_device(k_cache.device, query=query, block_tables=block_tables, seq_lens=seq_lens, out=out)
    if num_seqs == 0:
        return out
    seq_lens = seq_lens.contiguous()

    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    few_programs = num_seqs * num_kv_heads < _num_sms(query.device)
    block_n, num_warps, num_stages = _launch_config(head_dim, few_programs)
    # Partitions are whole BLOCK_N tiles; recompute the count so no split starts past max_seq_len.
    partition_size = cdiv(cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    num_splits = cdiv(max(max_seq_len, 1), partition_size)
    group = num_heads // num_kv_heads
    block_d = max(16, next_pow2(head_dim))
    single = num_splits == 1
    if single:  # the kernel writes `out` directly; the partial pointers are unused
        part_m = part_l = part_acc = out
    else:  # one allocation: [..., :head_dim] the accumulators, [..., head_dim] max, [..., head_dim + 1] sum
        part = torch.empty((num_seqs, num_heads, num_splits, head_dim + 2), dtype=torch.float32,
                           device=query.device)
        part_acc, part_m, part_l = part, part[..., head_dim], part[..., head_dim + 1]
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        out, part_m, part_l, part_acc,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        scale * LOG2E, head_dim, block_size, partition_size,
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        SINGLE_SPLIT=single, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_m, part_l, part_acc,
            out.stride(0), out.stride(1),
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            num_splits, head_dim,
            BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 2,
        )
    return out
