"""Paged decode attention (one query token per sequence), GQA-aware, with split-KV (flash-decoding).

    grid = (num_seqs, num_kv_heads, max_splits)
    program (s, kvh, p): the G = num_heads // num_kv_heads query heads of KV head kvh (padded to >= 16
    rows for tl.dot) attend to split p of sequence s's context, so each K/V tile is loaded once per
    group, not once per query head.

    context of seq s:  [ split 0 | split 1 | split 2 ]   each split: running (max, sum, acc) to a
                            │         │         │        float32 scratch row, then counts itself in
                            └─────────┴────┬────┘        (an atomic per (seq, KV head)); the LAST to
                              the last split to arrive   arrive rescales and adds them, every query
                                                         head and split in one set of loads:
                                                         out = Σ acc_p e^(m_p - M) / Σ l_p e^(m_p - M)
                                                         and resets the counter for the next launch.

Each sequence picks its own split count on the device, from its real length: min(max_splits,
ceil(len / min_partition)). A CUDA graph is captured with max_splits for max_model_len, yet a
250-token context at batch 64 still runs as one split (no scratch, no atomic, no combine), and the
programs past a sequence's splits exit at once. One split normalises and writes `out` directly.

One launch whatever the split count (a separate reduce kernel cost ~3 us per layer at batch 1). Scores
use exp2 with log2(e) folded into the scale; accumulation is float32 whatever the cache dtype.

Mixed batches: with `seq_ids` (and `query_start_loc`), program s serves sequence seq_ids[s], whose query
row is query_start_loc[seq_ids[s]], so the decodes of a batch that also holds prefills run here (K/V
read once per KV head) while prefill_attention takes the rest.

The step's own token (`rope=NewTokens(...)`, decode-only steps small enough that `rope_inside_pays`):
every program rotates its query group (after Qwen3's q/k norm) and its KV head's new key itself, the
splits attend to the cached positions < seq_len - 1, and the split holding position seq_len - 1 folds
that token's key and value in from registers and stores them in the caches (kernels/rotary.py's job,
one launch fewer a layer).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import prefetch
from kernels.kv_cache import (SUPPORTED_DTYPES, cdiv, check_int_dtype, check_kv_cache,
                              check_last_dim_contiguous, check_same_device, next_pow2, paged_kv_offsets)
from kernels.new_tokens import NewTokens, check_new_tokens, rope_rows
from kernels.pdl import pdl_prologue, use_pdl
from kernels.prefetch import prefetch_rows

LOG2E = 1.4426950408889634
_NEG_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity": an empty split never produces inf - inf = nan
_MIN_PARTITION = 128  # tokens a split takes at least, when the batch fills under a quarter of the SMs
_MIN_PARTITION_BUSY = 1024  # ... and when it fills a quarter or more (a split costs ~3-4 us of combine)
_MAX_SPLITS = 64


# Arguments that vary from step to step are not specialized (Triton would otherwise compile a variant
# for each "divisible by 16" / "equals 1" combination it meets, a second each, mid-run).
@triton.jit(do_not_specialize=["stride_bt", "stride_ps", "stride_ph", "max_splits", "min_partition", "pf_rows",
                               "pf_row_bytes", "pf_prefix_lines"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, seq_ids_ptr, query_start_loc_ptr,
    out_ptr, part_ptr, counter_ptr,
    # ROPE: q is the token's raw query; its key and value are rows of k_ptr / v_ptr; this kernel norms
    # (HAS_NORM) and rotates q and k, writes k and v to the caches at slot_mapping (< 0: not stored) and
    # attends to the cached context plus that token from registers
    k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, eps,
    stride_qt, stride_qh,  # query [num_tokens, num_heads, head_dim]
    stride_cb, stride_co, stride_ch,  # caches [num_blocks, block_size, num_kv_heads, head_dim]
    stride_bt,  # block_tables [num_seqs, max_blocks]
    stride_ot, stride_oh,  # out [num_tokens, num_heads, head_dim]
    stride_ps, stride_ph, stride_pp,  # part [num_programs, num_heads, max_splits, head_dim + 2]: the
    # accumulator in [:head_dim], the running max at head_dim, the running sum at head_dim + 1
    qk_scale,  # softmax scale * log2(e)
    head_dim, block_size, max_splits, min_partition, num_kv_heads,
    pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines,  # o_proj's weight (kernels/prefetch.py)
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_GC: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SEQ_IDS: tl.constexpr, MAY_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, PF_CHUNK: tl.constexpr,
    ROPE: tl.constexpr, HAS_NORM: tl.constexpr,
):
    prog = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if PREFETCH:  # before waiting for the kernel before: o_proj's weight into L2 (it reads it next)
        flat = (prog * tl.num_programs(1) + kv_head) * tl.num_programs(2) + split
        total = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        prefetch_rows(pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines, flat, total, PF_CHUNK)
    pdl_prologue(USE_PDL)
    if HAS_SEQ_IDS:  # a decode inside a mixed batch: its sequence, and its row among all the tokens
        seq = tl.load(seq_ids_ptr + prog)
        row = tl.load(query_start_loc_ptr + seq)
    else:
        seq = prog
        row = prog
    seq_len = tl.load(seq_lens_ptr + seq)
    # This sequence's own split count, from its real length: whole BLOCK_N tiles per split, and no
    # split shorter than min_partition tokens (a padding row of a CUDA graph, 1 token, is one split).
    num_splits = 1
    partition = seq_len
    if MAY_SPLIT:
        num_splits = tl.maximum(tl.minimum(tl.cdiv(seq_len, min_partition), max_splits), 1)
        partition = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        num_splits = tl.cdiv(seq_len, partition)
    if split < num_splits:  # the programs past this sequence's splits have nothing to do
        start = split * partition
        end = tl.minimum(start + partition, seq_len)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        d_mask = d < head_dim
        gd_mask = g_mask[:, None] & d_mask[None, :]
        heads = kv_head * GROUP + g  # [BLOCK_G] query heads of this KV head
        if ROPE:
            # the token's position, cos / sin, then q's group and its own k rotated, v as it is
            pos = tl.load(positions_ptr + row).to(tl.int64)
            half = head_dim // 2
            first = d < half
            partner = tl.where(first, d + half, d - half)
            sign = tl.where(first, -1.0, 1.0)
            cs = tl.where(first, d, d - half)
            cos = tl.load(cos_ptr + pos * stride_cos + cs, mask=d_mask, other=0.0)
            sin = tl.load(sin_ptr + pos * stride_cos + cs, mask=d_mask, other=0.0)
            q = rope_rows(q_ptr + row.to(tl.int64) * stride_qt, tl.where(g_mask, heads, -1), stride_qh, d, partner,
                           d_mask, cos, sin, sign, q_w_ptr, head_dim, eps, HAS_NORM)  # [BLOCK_G, BLOCK_D]
            one = tl.full([1], 0, tl.int32) + kv_head
            k_new = rope_rows(k_ptr + row.to(tl.int64) * stride_kt, one, stride_kh, d, partner, d_mask, cos, sin,
                               sign, k_w_ptr, head_dim, eps, HAS_NORM)  # [1, BLOCK_D]
            v_new = tl.load(v_ptr + row.to(tl.int64) * stride_vt + kv_head * stride_vh + d[None, :],
                            mask=d_mask[None, :], other=0.0)  # [1, BLOCK_D]
            end_cached = tl.minimum(end, seq_len - 1)  # the token's own key is not in the cache yet
        else:
            q_off = row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :]
            q = tl.load(q_ptr + q_off, mask=gd_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
            end_cached = end

        m_i = tl.full([BLOCK_G], _NEG_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for n0 in range(start, end_cached, BLOCK_N):
            ctx = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions in the context
            n_mask = ctx < end_cached
            kv_off = paged_kv_offsets(bt_row, ctx, n_mask, d, kv_head, block_size,
                                      stride_cb, stride_co, stride_ch)  # [BLOCK_N, BLOCK_D]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            # K and V loads both go out before the first dot: one memory round trip per tile, not two
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        if ROPE:
            if split == num_splits - 1:  # the split holding the token's own position: its key and value
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * qk_scale  # [BLOCK_G]
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                acc = acc * alpha[:, None] + p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
                m_i = m_new
                slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
                c_off = (tl.maximum(slot, 0) // block_size) * stride_cb + (tl.maximum(slot, 0) % block_size) * stride_co
                c_off += kv_head * stride_ch + d[None, :]
                store = d_mask[None, :] & (slot >= 0)
                tl.store(k_cache_ptr + c_off, k_new, mask=store)
                tl.store(v_cache_ptr + c_off, v_new.to(v_cache_ptr.dtype.element_ty), mask=store)

        if num_splits == 1:
            o_off = row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
            tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            base = part_ptr + prog.to(tl.int64) * stride_ps + heads * stride_ph  # [BLOCK_G]
            tl.store(base[:, None] + split * stride_pp + d[None, :], acc, mask=gd_mask)
            tl.store(base + split * stride_pp + head_dim, m_i, mask=g_mask)
            tl.store(base + split * stride_pp + head_dim + 1, l_i, mask=g_mask)
            # Count this split in; the last of the (seq, KV head)'s splits combines them. The barrier
            # orders every thread's stores before the atomic, whose release makes them visible to the
            # program that acquires after it (the pattern of Triton's stream-K tutorial).
            tl.debug_barrier()
            counter = counter_ptr + prog * num_kv_heads + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                tl.store(counter, 0)  # ready for the next launch (the kernel boundary orders it)
                # Every head of the group and BLOCK_S splits per load: the loads go out together, so
                # the combine costs about one L2 round trip, not one per head.
                gc = tl.arange(0, BLOCK_GC)
                sp = tl.arange(0, BLOCK_S)
                gc_mask = gc < GROUP
                h_base = part_ptr + prog.to(tl.int64) * stride_ps + (kv_head * GROUP + gc) * stride_ph
                m_run = tl.full([BLOCK_GC], _NEG_INIT, tl.float32)
                l_run = tl.zeros([BLOCK_GC], tl.float32)
                acc_run = tl.zeros([BLOCK_GC, BLOCK_D], tl.float32)
                for s0 in range(0, num_splits, BLOCK_S):
                    s_idx = s0 + sp
                    gs_mask = gc_mask[:, None] & (s_idx < num_splits)[None, :]  # [BLOCK_GC, BLOCK_S]
                    gs_off = h_base[:, None] + s_idx[None, :] * stride_pp
                    # .cg: read through L2, past this SM's L1 (other SMs wrote these rows)
                    m = tl.load(gs_off + head_dim, mask=gs_mask, other=_NEG_INIT, cache_modifier=".cg")
                    l = tl.load(gs_off + head_dim + 1, mask=gs_mask, other=0.0, cache_modifier=".cg")
                    a = tl.load(gs_off[:, :, None] + d[None, None, :],
                                mask=gs_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                                cache_modifier=".cg")  # [BLOCK_GC, BLOCK_S, BLOCK_D]
                    m_new = tl.maximum(m_run, tl.max(m, 1))  # empty splits: m = -1e30 -> weight 0
                    w = tl.where(gs_mask, tl.exp2(m - m_new[:, None]), 0.0)  # [BLOCK_GC, BLOCK_S]
                    scale_old = tl.exp2(m_run - m_new)
                    l_run = l_run * scale_old + tl.sum(l * w, 1)
                    acc_run = acc_run * scale_old[:, None] + tl.sum(a * w[:, :, None], 1)
                    m_run = m_new
                o_off = (row.to(tl.int64) * stride_ot + (kv_head * GROUP + gc)[:, None] * stride_oh
                         + d[None, :])
                tl.store(out_ptr + o_off, (acc_run / l_run[:, None]).to(out_ptr.dtype.element_ty),
                         mask=gc_mask[:, None] & d_mask[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H200's count, so CPU tests take the GPU's split decisions


def _split_policy(num_seqs: int, num_kv_heads: int, device: torch.device) -> tuple[int, int]:
    """(max splits, min tokens a split takes) for a batch: split until the (seq, KV head, split)
    programs make about 2 waves, but only when the batch alone leaves the SMs idle. H200 sweep of this
    kernel (bf16, head_dim 128): 8 programs at 512 tokens, 4 splits 7.8 us vs 1 split 11.1; 64 and 128
    programs at 256 tokens, 1 split was best (8.3 vs 9.4, 9.7 vs 13.8); 256+ programs, 1 split always."""
    programs = max(num_seqs * num_kv_heads, 1)
    sms = _num_sms(device)
    if programs >= sms:
        return 1, _MIN_PARTITION
    return min(cdiv(2 * sms, programs), _MAX_SPLITS), (_MIN_PARTITION if 4 * programs < sms else _MIN_PARTITION_BUSY)


def rope_inside_pays(num_seqs: int, num_kv_heads: int, device: torch.device) -> bool:
    """Whether a decode step of this many sequences should take its RoPE and K/V write inside the
    attention launch (`rope=`): while its (sequence, KV head) programs fit one wave of the SMs.
    Llama-8B on H200s (gpu_bench.sh rope-ab, rope-small; ms a step, rotary launch -> inside): TP=1
    batch 1 4.667 -> 4.625 and 4.629 -> 4.635 (two machines), batch 16 4.998 -> 4.938; but batch 64
    lost a little (TP=1 5.492 -> 5.503, TP=2 3.590 -> 3.606): with hundreds of programs the extra
    registers and the dependent cos / sin loads cost more than the rotary launch they replace."""
    return num_seqs * num_kv_heads <= _num_sms(device)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """The split count of a sequence of max_seq_len tokens in this batch (each sequence takes its own,
    from its own length, on the device)."""
    max_splits, min_partition = _split_policy(num_seqs, num_kv_heads, device)
    return max(1, min(max_splits, cdiv(max_seq_len, min_partition)))


def _launch_config(head_dim: int, few_programs: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel. Up to 2 programs an SM, 128-token tiles keep
    more loads in flight (256 programs at 1024 tokens: 37.6 us vs 44.3 with 64); at 4+ an SM, 64 was
    best (512 programs at 1024 tokens: 68.7 vs 70.3). H200 sweep, bf16, head_dim 128."""
    if head_dim > 128:
        return 32, 4, 2
    return (128 if few_programs else 64), 4, 2


class _SplitCounters:
    """Per-device int32 arrival counters, one per (program, KV head), all zero between launches (the
    last split of each resets its own). Allocated once, outside any CUDA graph capture: `reserve`
    sizes them at start-up; a launch needing more grows them, which is refused while capturing."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def reserve(self, device: torch.device, n: int) -> torch.Tensor:
        device = torch.device(device)
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < n:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"decode attention needs {n} split counters but {0 if buf is None else buf.numel()}"
                                   " were reserved before CUDA graph capture (call reserve_split_counters)")
            buf = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
            self.buffers[device] = buf
        return buf


_COUNTERS = _SplitCounters()


def reserve_split_counters(device: torch.device, max_num_seqs: int, num_kv_heads: int) -> None:
    """Allocate the split counters for batches up to max_num_seqs (before CUDA graph capture)."""
    _COUNTERS.reserve(device, max_num_seqs * num_kv_heads)


def _check_inputs(query, k_cache, v_cache, block_tables, seq_lens, seq_ids, query_start_loc) -> None:
    """decode_attention's argument checks (shapes, dtypes, strides, devices), before any launch."""
    check_kv_cache(k_cache, v_cache)
    check_last_dim_contiguous("query", query, 3)
    check_last_dim_contiguous("block_tables", block_tables, 2)
    num_rows, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _, _, num_kv_heads, cache_dim = k_cache.shape
    if query.dtype not in SUPPORTED_DTYPES or query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} must match the cache dtype {k_cache.dtype}")
    if head_dim != cache_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query (num_heads, head_dim)=({num_heads}, {head_dim}) does not fit a cache of "
                         f"{num_kv_heads} KV heads of size {cache_dim}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    if block_tables.shape[0] != num_seqs or (seq_ids is None and num_seqs != num_rows):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} "
                         f"must have one row per sequence ({num_rows} query rows)")
    check_int_dtype("block_tables", block_tables, (torch.int32, torch.int64))
    check_int_dtype("seq_lens", seq_lens, (torch.int32, torch.int64))
    if (seq_ids is None) != (query_start_loc is None):
        raise ValueError("seq_ids and query_start_loc come together (the decodes of a mixed batch)")
    if seq_ids is not None:
        if seq_ids.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
            raise ValueError(f"need seq_ids [num_decodes] and query_start_loc [{num_seqs + 1}], got "
                             f"{tuple(seq_ids.shape)} and {tuple(query_start_loc.shape)}")
        check_int_dtype("seq_ids", seq_ids, (torch.int32, torch.int64))
        check_int_dtype("query_start_loc", query_start_loc, (torch.int32, torch.int64))
        check_same_device(k_cache.device, seq_ids=seq_ids, query_start_loc=query_start_loc)
    check_same_device(k_cache.device, query=query, block_tables=block_tables, seq_lens=seq_lens)


def decode_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; one token per sequence unless seq_ids
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the query token (>= 1)
    max_seq_len: int,  # host-side max of seq_lens (sizes the splits without a device sync)
    scale: float,
    out: torch.Tensor | None = None,  # query's shape and dtype
    num_splits: int | None = None,  # None: chosen from batch size and context length
    seq_ids: torch.Tensor | None = None,  # [num_decodes] int32: attend only for these sequences ...
    query_start_loc: torch.Tensor | None = None,  # [num_seqs + 1] int32: ... whose query row is here
    launch_config: tuple[int, int, int] | None = None,  # (BLOCK_N, num_warps, num_stages): tuning sweeps only
    prefetch_weight: torch.Tensor | None = None,  # the next matmul's (o_proj's), prefetched into L2
    rope: NewTokens | None = None,  # query is raw: rotate it and the step's keys, store them (NewTokens)
) -> torch.Tensor:
    """Attention of each sequence's single query token over its whole paged context. Returns `out`.

    Without seq_ids, query row i belongs to sequence i. With seq_ids (a mixed batch), only those
    sequences are computed, each from its row query_start_loc[seq]; other rows of `out` are left as
    they are. With `rope` (no seq_ids), the context's last position is the query's own token, whose
    key and value come from `rope`, not the cache (which this launch fills in)."""
    _check_inputs(query, k_cache, v_cache, block_tables, seq_lens, seq_ids, query_start_loc)
    if rope is not None:
        if seq_ids is not None:
            raise ValueError("rope= takes a decode-only batch (no seq_ids)")
        check_new_tokens(rope, query, k_cache)
    if out is None:
        out = torch.empty_like(query)
    check_last_dim_contiguous("out", out, 3)
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_same_device(k_cache.device, out=out)
    num_seqs, (_, num_heads, head_dim) = seq_lens.shape[0], query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_programs = num_seqs if seq_ids is None else seq_ids.shape[0]
    if num_programs == 0:
        return out
    seq_lens = seq_lens.contiguous()

    if num_splits is None:  # a cap: each sequence takes min(cap, ceil(len / min_partition)) on the device
        max_splits, min_partition = _split_policy(num_programs, num_kv_heads, query.device)
    else:  # forced (tests, tuning sweeps): every sequence long enough gets exactly num_splits
        max_splits, min_partition = num_splits, 1
    few_programs = num_programs * num_kv_heads <= 2 * _num_sms(query.device)
    block_n, num_warps, num_stages = launch_config or _launch_config(head_dim, few_programs)
    # Splits are whole BLOCK_N tiles of at least min_partition tokens, so no sequence takes more than
    # ceil(max_seq_len / either): past that the programs would all be empty, and with one split left the
    # launch needs no split-capable variant (which cost 1.8-3.3 us more at 16-32 sequences of 256
    # tokens, H200: BENCHMARKS.md, session 14). A CUDA graph passes max_model_len, so it keeps them.
    longest = max(max_seq_len, 1)
    max_splits = max(1, min(max_splits, cdiv(longest, block_n), cdiv(longest, min_partition)))
    group = num_heads // num_kv_heads
    block_d = max(16, next_pow2(head_dim))
    block_gc = next_pow2(group)
    may_split = max_splits > 1
    pdl = use_pdl(query.device)
    if may_split:
        part = torch.empty((num_programs, num_heads, max_splits, head_dim + 2), dtype=torch.float32,
                           device=query.device)
        counters = _COUNTERS.reserve(query.device, num_programs * num_kv_heads)
    else:  # the kernel writes `out` directly; scratch and counters are unused
        part = counters = out
    pf = prefetch.plan(prefetch_weight, num_programs * num_kv_heads * max_splits, query)
    if rope is not None:
        has_norm = rope.q_norm_weight is not None
        new = (rope.key, rope.value, rope.positions, rope.cos_cache, rope.sin_cache,
               rope.q_norm_weight if has_norm else rope.cos_cache, rope.k_norm_weight if has_norm else rope.cos_cache,
               rope.slot_mapping.contiguous(), rope.key.stride(0), rope.key.stride(1), rope.value.stride(0),
               rope.value.stride(1), rope.cos_cache.stride(0), float(rope.eps))
    else:  # unused
        has_norm = False
        new = (query, query, seq_lens, query, query, query, query, seq_lens, 0, 0, 0, 0, 0, 0.0)
    _decode_split_kernel[(num_programs, num_kv_heads, max_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        seq_lens if seq_ids is None else seq_ids, seq_lens if seq_ids is None else query_start_loc,
        out, part, counters, *new,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        scale * LOG2E, head_dim, block_size, max_splits, min_partition, num_kv_heads, *pf.args(),
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        # the combine holds BLOCK_GC x BLOCK_S x BLOCK_D float32 partials: 32 registers a thread (64 spilled)
        BLOCK_GC=block_gc, BLOCK_S=max(2, min(16, 4096 // (block_gc * block_d))),
        HAS_SEQ_IDS=seq_ids is not None, MAY_SPLIT=may_split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        USE_PDL=pdl, PREFETCH=pf.enabled, PF_CHUNK=prefetch.CHUNK, ROPE=rope is not None, HAS_NORM=has_norm,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    return out
