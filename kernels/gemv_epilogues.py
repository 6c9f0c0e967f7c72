"""The epilogues of kernels/gemv.py's kernel: what a program does with its finished float32 tile(s) of
y = x W^T, one function per launch kind (plain / pushed, reducing, gated, qkv + RoPE)."""

import triton
import triton.language as tl

from kernels.peer_rows import _base, _sanitized


@triton.jit
def _store_y(acc, b_ptr, y_ptr, stride_ym, rows, cols, col_mask, out_mask, N,
             b0, b1, b2, b3, b4, b5, b6, b7, push_offset,
             HAS_BIAS: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
             ITYPE: tl.constexpr, SENT: tl.constexpr):
    """Store the finished [BLOCK_M, BLOCK_N] tile (plus the bias) into y; with PUSH, also into this
    rank's region of the all-reduce slot of every peer's buffer (`push_offset` bytes into it), rows N
    apart, sentinel bits sanitized: the rows the flag-free all-reduce would otherwise push itself
    (kernels/all_reduce_rms_norm.py, `pushed=True`)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=out_mask)
    if PUSH:
        y = _sanitized(y, ITYPE, SENT)
        flat = rows[:, None] * N + cols[None, :]  # < 2**31: the staging region is a few MiB
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                region = _base(peer, b0, b1, b2, b3, b4, b5, b6, b7) + push_offset
                dst = tl.multiple_of(region.to(tl.pointer_type(y_ptr.dtype.element_ty)), 16)
                tl.store(dst + flat, y, mask=out_mask)


@triton.jit
def _store_reduced(acc, y_ptr, stride_ym, res_ptr, stride_r, rows, cols, out_mask, N,
                   b0, b1, b2, b3, b4, b5, b6, b7, push_offset, region_bytes,
                   RANK: tl.constexpr, WORLD: tl.constexpr, ITYPE: tl.constexpr, SENT: tl.constexpr):
    """The all-reduce and residual add of a row-parallel matmul's finished tile, in its epilogue: push
    this rank's partial tile into its region of the slot on every peer, poll the peers' regions of this
    rank's slot for the same tile until no sentinel is left (then write the sentinel back), sum in rank
    order, add the residual, and store h = the new residual stream into y. Rounded as
    kernels/all_reduce_rms_norm.py rounds (bf16 partials, float32 sum, bf16 h, bf16 h + residual)."""
    dtype = y_ptr.dtype.element_ty
    r_in = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    own = _sanitized(acc.to(dtype), ITYPE, SENT)
    flat = rows[:, None] * N + cols[None, :]  # < 2**31: the staging region is a few MiB
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            region = _base(peer, b0, b1, b2, b3, b4, b5, b6, b7) + push_offset
            dst = tl.multiple_of(region.to(tl.pointer_type(dtype)), 16)
            tl.store(dst + flat, own, mask=out_mask)
    slot_start = _base(RANK, b0, b1, b2, b3, b4, b5, b6, b7) + push_offset - RANK * region_bytes
    empty = tl.full(acc.shape, SENT, ITYPE).to(dtype, bitcast=True)
    total = tl.zeros(acc.shape, tl.float32)
    for r in tl.static_range(WORLD):  # in rank order: every rank sums alike
        if r == RANK:
            part = own
        else:
            src = tl.multiple_of((slot_start + r * region_bytes).to(tl.pointer_type(dtype)), 16) + flat
            part = tl.load(src, mask=out_mask, other=0.0, volatile=True)
            while tl.max(tl.max((part.to(ITYPE, bitcast=True) == SENT).to(tl.int32), 1), 0) > 0:
                part = tl.load(src, mask=out_mask, other=0.0, volatile=True)
            tl.store(src, empty, mask=out_mask)  # empty again for the slot's next call
        total += part.to(tl.float32)
    h = (total.to(dtype).to(tl.float32) + r_in).to(dtype)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], h, mask=out_mask)


@triton.jit
def _store_gated(gate, up, b_ptr, y_ptr, stride_ym, rows, cols, col_mask, out_mask, N, HAS_BIAS: tl.constexpr):
    """y = silu(gate) * up for a finished pair of [BLOCK_M, BLOCK_N] tiles, rounded as the unfused path
    rounds: gate and up to y's dtype (the gate_up matmul's output), silu in float32 rounded to the
    dtype, then the product (kernels/activation.py)."""
    dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        gate += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    gate = gate.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    y = act * up.to(dtype).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(dtype), mask=out_mask)


@triton.jit
def _store_rope(x1, x2, b_ptr, q_ptr, stride_qt, rows, row_mask, cols, pos_ptr, cos_ptr, sin_ptr, stride_cos,
                slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_ch, num_heads, num_kv_heads,
                HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A finished pair of [BLOCK_M, BLOCK_N] tiles of one head (x1: features d of its first half, x2: the
    same of its second): a query head is rotated and stored into q [M, num_heads, HEAD_DIM]; a key head
    rotated and a value head as it is stored into the paged cache at each token's slot (< 0: a padding
    token, nothing stored). Rounded as the unfused path rounds: the matmul's output to the dtype, then
    kernels/rotary.py's float32 rotation rounded once."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype = q_ptr.dtype.element_ty
    head = cols // HEAD_DIM  # [BLOCK_N], every column the program's head
    d = cols % HEAD_DIM  # [BLOCK_N] features within the first half
    if HAS_BIAS:
        x1 += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        x2 += tl.load(b_ptr + cols + HALF).to(tl.float32)[None, :]
    x1 = x1.to(dtype).to(tl.float32)
    x2 = x2.to(dtype).to(tl.float32)
    rotated = (head < num_heads + num_kv_heads)[None, :]  # query and key heads; a value head is stored as it is
    pos = tl.load(pos_ptr + rows, mask=row_mask, other=0)  # [BLOCK_M]
    cs = pos.to(tl.int64)[:, None] * stride_cos + d[None, :]
    cos = tl.load(cos_ptr + cs, mask=row_mask[:, None] & rotated, other=1.0)
    sin = tl.load(sin_ptr + cs, mask=row_mask[:, None] & rotated, other=0.0)  # a value head: cos 1, sin 0
    x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    is_q = (head < num_heads)[None, :]
    q = q_ptr + rows[:, None] * stride_qt + cols[None, :]  # q's rows are [num_heads * HEAD_DIM]
    tl.store(q, x1.to(dtype), mask=row_mask[:, None] & is_q)
    tl.store(q + HALF, x2.to(dtype), mask=row_mask[:, None] & is_q)
    slot = tl.load(slot_ptr + rows, mask=row_mask, other=-1).to(tl.int64)  # [BLOCK_M]
    is_k = head < num_heads + num_kv_heads
    kv_off = (head - num_heads - tl.where(is_k, 0, num_kv_heads)) * stride_ch + d  # [BLOCK_N]
    kv_mask = (row_mask & (slot >= 0))[:, None] & ~is_q
    dst = slot[:, None] * stride_cs + kv_off[None, :]  # element offsets into either cache
    tl.store(k_cache_ptr + dst, x1.to(dtype), mask=kv_mask & is_k[None, :])
    tl.store(k_cache_ptr + dst + HALF, x2.to(dtype), mask=kv_mask & is_k[None, :])
    tl.store(v_cache_ptr + dst, x1.to(dtype), mask=kv_mask & ~is_k[None, :])
    tl.store(v_cache_ptr + dst + HALF, x2.to(dtype), mask=kv_mask & ~is_k[None, :])
