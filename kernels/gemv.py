"""y = x W^T (+ b) for a handful of rows (decode steps of 1-64 token rows), streaming W, with its first
weight tiles prefetched before the previous kernel has finished.

At decode sizes a linear layer is a read of W: its time is W's bytes over the bandwidth sustained, plus
the bubble at each kernel boundary (the previous kernel drains, this one launches and starts its loads).
Launched with programmatic dependent launch (kernels/pdl.py), this kernel starts while the kernel
before it still runs, issues L2 prefetches for its first weight tiles (W never depends on that kernel),
and only then waits for it, before reading x:

    previous kernel  ██████████░░
    this kernel            [prefetch W tiles][wait]████████████   (x is read after the wait)

    grid = (cdiv(N, BLOCK_N), SPLIT_K)
    program (n, s):  acc[BLOCK_M, BLOCK_N] = Σ_k x[:, k:k+BLOCK_K] · W[n*BLOCK_N:(n+1)*BLOCK_N, k:k+BLOCK_K]^T
                     over split s's K range; x padded to BLOCK_M = 16, 32 or 64 rows for tl.dot,
                     float32 accumulation
    SPLIT_K = 1: one store of the M real rows. SPLIT_K > 1: partials to float32 scratch, and the column
    tile's last program to arrive sums them in split order and stores y, in the same launch (the
    pattern of decode_attention's splits).

Who takes which launch (each measured against cuBLAS on H200s; BENCHMARKS.md, sessions 3-16):

  - every projection of models of hidden size <= 2048 under PDL, at up to 16 rows
    (elementwise.small_gemv_default; $PAGEDSERVE_SMALL_GEMV, $PAGEDSERVE_SMALL_GEMV_ROWS): `_config`'s
    launch, Triton-autotuned over 16 rows. Qwen3-0.6B batch 1: 1.44 -> 1.19 ms a token; on Llama-8B
    cuBLAS matched or beat it, and split K ($PAGEDSERVE_GEMV_SPLIT_K) lost on every projection.
  - the row-parallel projections (o_proj, down_proj) of wider models at 32-64 rows, and at 1-64 with
    tensor parallelism, where the epilogue also pushes each tile into the fused all-reduce's staging
    slot on every peer (`row_parallel_gemv`, `takes_row_parallel`, `push`; kernels/all_reduce_rms_norm.py
    then only polls): one fixed launch from sweeps over rotating weights (scripts/sweep_gemv.py), not
    Triton's autotuner, which times each config on one weight that then sits in L2.

        program of column tile c:  K loop ──► y[:, c] ──► this rank's y
                                                    └──► region `rank` of slot s on every peer

  - a gated MLP's gate_up projection at 17-64 rows (`gated_gemv`, `takes_gated`, GATED): the merged
    weight is [gate | up]; program c computes column tile c of both halves and stores silu(gate) * up,
    so the [M, 2 D] gate_up output and the SiLU-and-mul launch go away (Llama-8B batch 64 on 2 x H200:
    TP=1 -0.45%, TP=2 -1.5% a step).

        program of column tile c:  K loop ──► gate[:, c], up[:, c] ──► y[:, c] = silu(gate) * up

  - an attention layer's qkv projection at 17-64 rows where decode attention does not rotate inside
    itself (kernels/qkv_rope.py: `qkv_rope_gemv`, `takes_qkv_rope`; ROPE here): program p computes
    the same features of both halves of one head (RoPE's pairs), rotates query and key heads and
    stores q, k and v (k and v at the tokens' cache slots), so the rotary + K/V write launch goes
    away (Llama-8B batch 64 on an H200: TP=1 -1.0%, b32 -1.7%; a TP=2 rank's work unchanged).

        program of head h, features d:  K loop ──► y[:, h, d], y[:, h, D/2 + d] ──► RoPE ──► q, or k / v

  - with tensor parallelism, o_proj and down_proj at REDUCE_MIN_ROWS-64 rows (`reduce_gemv`,
    `takes_reduce`, REDUCE): the epilogue is the all-reduce itself, over the fused all-reduce's
    flag-free slots, and adds the residual; the norm after it is a plain RMSNorm launch, and the
    fused all-reduce + RMSNorm launch goes away. Every program must be resident at once, since each
    waits for its peers' programs (`reduce_config`: no more programs than SMs).

        program of column tile c:  K loop ──► partial[:, c] ──► region `rank` of slot s on every peer
                                   poll this rank's slot s for the peers' [:, c] (then empty it)
                                   h[:, c] = Σ_rank partial (rank order) + residual[:, c]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ipc import envs
from kernels.decode_attention import _num_sms, _SplitCounters
from kernels.gemv_epilogues import _store_gated, _store_reduced, _store_rope, _store_y
from kernels.kv_cache import SUPPORTED_DTYPES, cdiv, check_same_device, next_pow2
from kernels.pdl import pdl_prologue, use_pdl
from kernels.peer_rows import PeerBuffers, check_pushable, push_args
from kernels.prefetch import LINE, l2_prefetch

MAX_ROWS = 64  # x rows one launch takes (the tl.dot tile's M: 16, 32 or 64)
_WIDE_PREFETCH_COLS = 2048  # over 16 rows: the first 2048 columns of each W row are prefetched (see gemv)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counter_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym,
    b0, b1, b2, b3, b4, b5, b6, b7, push_offset,  # PUSH / REDUCE: the ranks' all-reduce buffers (_store_y)
    region_bytes, res_ptr, stride_r,  # REDUCE (_store_reduced)
    # ROPE (_store_rope): the tokens' positions and cache slots, RoPE's cos / sin [max_position, HEAD_DIM / 2]
    # float32, the paged K / V caches (a slot a row) and this rank's head counts
    pos_ptr, cos_ptr, sin_ptr, stride_cos, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_ch,
    num_heads, num_kv_heads,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
    LINE_ELEMS: tl.constexpr,
    PUSH: tl.constexpr = False, RANK: tl.constexpr = 0, WORLD: tl.constexpr = 1, ITYPE: tl.constexpr = tl.int16,
    SENT: tl.constexpr = 0, GATED: tl.constexpr = False, REDUCE: tl.constexpr = False,
    ROPE: tl.constexpr = False, HEAD_DIM: tl.constexpr = 128,
):
    pid = tl.program_id(0)
    PAIRED: tl.constexpr = GATED or ROPE  # two blocks of W rows a program, summed into acc and acc_up
    if SPLIT_K == 1:  # all of K: the bound stays K itself, whose divisibility Triton knows (vector loads)
        k_start = 0
        k_end = K
    else:  # this program's K range, whole BLOCK_K tiles
        k_start = tl.program_id(1) * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
    if ROPE:  # head pid // QUARTERS, features [j, j + BLOCK_N) of its first half and the same of its second
        QUARTERS: tl.constexpr = HEAD_DIM // 2 // BLOCK_N
        cols = (pid // QUARTERS) * HEAD_DIM + (pid % QUARTERS) * BLOCK_N + tl.arange(0, BLOCK_N)
        pair_rows = HEAD_DIM // 2
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features of this program
        pair_rows = N  # GATED: W is [gate | up], N rows each
    col_mask = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    if USE_PDL:
        # W does not depend on the previous kernel: start streaming this program's first tiles into L2
        # now; pdl_prologue then waits for that kernel (x is its output) and lets the next one queue.
        lines = tl.minimum(k_start + tl.arange(0, PREFETCH_K // LINE_ELEMS) * LINE_ELEMS, k_end - 1)  # in bounds
        safe_rows = w_ptr + tl.where(col_mask, cols, 0).to(tl.int64)[:, None] * stride_wn  # in-bounds rows
        l2_prefetch(safe_rows + lines[None, :])  # [BLOCK_N, PREFETCH_K / LINE_ELEMS] cache lines
        if PAIRED:  # ... and the same lines of the paired rows
            l2_prefetch(safe_rows + pair_rows * stride_wn + lines[None, :])
    pdl_prologue(USE_PDL)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    w_ptrs = w_rows + ks[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PAIRED:  # this program's paired rows are pair_rows further on (GATED: up; ROPE: the head's second half)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + ks) < k_end
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if PAIRED:
            u = tl.load(w_ptrs + pair_rows * stride_wn + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if PAIRED:
            acc_up += tl.dot(x, tl.trans(u), input_precision=DOT_PRECISION)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if REDUCE:  # SPLIT_K 1, no bias (the wrapper's checks)
        _store_reduced(acc, y_ptr, stride_ym, res_ptr, stride_r, rows, cols, out_mask, N,
                       b0, b1, b2, b3, b4, b5, b6, b7, push_offset, region_bytes, RANK, WORLD, ITYPE, SENT)
    elif GATED:  # SPLIT_K 1, no PUSH (the wrapper's checks)
        _store_gated(acc, acc_up, b_ptr, y_ptr, stride_ym, rows, cols, col_mask, out_mask, N, HAS_BIAS)
    elif ROPE:  # SPLIT_K 1, no PUSH (the wrapper's checks)
        _store_rope(acc, acc_up, b_ptr, y_ptr, stride_ym, rows, row_mask, cols, pos_ptr, cos_ptr, sin_ptr,
                    stride_cos, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_ch, num_heads, num_kv_heads,
                    HAS_BIAS, HEAD_DIM)
    elif SPLIT_K > 1:
        # Partial sums to scratch; the last of the column tile's SPLIT_K programs to arrive adds them in
        # split order (the same sum whoever arrives last) and writes y. The barrier orders every thread's
        # stores before the atomic, whose release makes them visible to the program that acquires.
        part = part_ptr + rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] of split 0; split s at + s*M*N
        tl.store(part + tl.program_id(1) * M * N, acc, mask=out_mask)
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.store(counter_ptr + pid, 0)  # ready for the next launch (the kernel boundary orders it)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_y(acc, b_ptr, y_ptr, stride_ym, rows, cols, col_mask, out_mask, N,
                     b0, b1, b2, b3, b4, b5, b6, b7, push_offset, HAS_BIAS, PUSH, RANK, WORLD, ITYPE, SENT)
    else:
        _store_y(acc, b_ptr, y_ptr, stride_ym, rows, cols, col_mask, out_mask, N,
                 b0, b1, b2, b3, b4, b5, b6, b7, push_offset, HAS_BIAS, PUSH, RANK, WORLD, ITYPE, SENT)


Config = tuple[int, int, int, int] | tuple[int, int, int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]); SPLIT_K defaults to 1."""
_COUNTERS = _SplitCounters()
"""Per-device arrival counters of split-K launches, one per column tile, zero between launches."""


def reserve_split_k_counters(device: torch.device, n: int = 1 << 14) -> None:
    """Allocate the split-K counters for up to n column tiles (before CUDA graph capture)."""
    _COUNTERS.reserve(device, n)


def _config(n: int, device: torch.device) -> Config:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): the widest BLOCK_N (16..64) that still gives
    every SM at least two programs, 256-wide K tiles, 4 stages in flight (session 3's H200 sweep); 8
    warps for 64-wide tiles, which spill registers with 4 (ptxas, sm_90). Where even 16-wide tiles
    leave an SM under two programs, K is split $PAGEDSERVE_GEMV_SPLIT_K ways (default 1: no split)."""
    sms = _num_sms(device)
    block_n = 64
    while block_n > 16 and cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    split_k = envs.gemv_split_k() if cdiv(n, block_n) < 2 * sms else 1
    return block_n, 256, 8 if block_n == 64 else 4, 4, split_k


def prev_pow2(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [M, K] and [N, K]")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight dtypes ({x.dtype}, {weight.dtype}) must match and be one of {SUPPORTED_DTYPES}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x and weight must be contiguous in their last dim, got strides {x.stride()}, "
                         f"{weight.stride()}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_same_device(weight.device, x=x, **({} if bias is None else {"bias": bias}))


def row_parallel_config(rows: int, dtype: torch.dtype) -> tuple[Config, int | None]:
    """(config, block_m) of a row-parallel matmul's launch (o_proj, down_proj; `row_parallel_gemv`):
    32 output columns a program, 128-wide K tiles, 6 stages; at 32-64 rows the dot tile padded to 64
    rows, at 17-31 K split 2 ways, at 1-16 a 16-row tile. Swept with rotating weights on an H200
    (scripts/sweep_gemv.py, BENCHMARKS.md session 15), us with the RMSNorm before it, Llama-8B, this /
    cuBLAS: TP=2 o_proj at 64 rows 7.6 / 8.5, at 32 rows 7.5 / 8.6; down_proj 20.3 / 20.3 and 19.5 /
    20.8; TP=1 o_proj at 64 rows 12.1 / 13.3, down_proj 36.1 / 38.7. float32 takes 64-wide K tiles
    (128-wide ones need 240 KiB of shared memory in 6 stages; Hopper has 227)."""
    block_k = 128 if dtype.itemsize <= 2 else 64
    if 16 < rows < 32:
        return (32, block_k, 4, 6, 2), None
    return (32, block_k, 4, 6, 1), (64 if rows > 16 else None)


def row_parallel_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      push: tuple[PeerBuffers, int] | None = None) -> torch.Tensor:
    """`gemv` with `row_parallel_config`'s launch (where `takes_row_parallel`), `push` as in gemv."""
    config, block_m = row_parallel_config(x.shape[0], x.dtype)
    return gemv(x, weight, bias, config=config, push=push, block_m=block_m)


ROW_PARALLEL_MIN_N = 2048
"""Row-parallel matmuls narrower than this stay on cuBLAS: under 64 programs of 32 columns."""


def takes_row_parallel(rows: int, n: int, dtype: torch.dtype, device: torch.device, push: bool = False) -> bool:
    """Whether a row-parallel matmul (o_proj, down_proj) of `rows` token rows into `n` features runs on
    `row_parallel_gemv`: 32-64 rows, or 1-64 where it also pushes its rows to the peers (`push`, TP > 1:
    gpu_workers/symm_all_reduce.py); n >= ROW_PARALLEL_MIN_N; a CUDA device under PDL (its weight
    prefetch); unless $PAGEDSERVE_ROW_PARALLEL_GEMV=0. Shape, dtype and device kind only: every rank
    decides alike. Measured on 2 x H200, Llama-8B, ms a step (BENCHMARKS.md session 15): TP=1 batch 64
    5.485 -> 5.339 (and 5.340 -> 5.182); TP=2 batch 1, pushing, 3.056 -> 2.921; but TP=1 batch 16
    4.893 -> 5.278 and batch 1 4.668 -> 4.872 in one call (4.596 -> 4.577 in another), hence no
    unpushed launch under 32 rows."""
    return (0 < rows <= MAX_ROWS and (push or rows >= 32) and n >= ROW_PARALLEL_MIN_N and dtype in SUPPORTED_DTYPES
            and device.type == "cuda" and use_pdl(device) and envs.row_parallel_gemv())


def gated_config(rows: int, dtype: torch.dtype) -> tuple[Config, int | None]:
    """(config, block_m) of a gated MLP's fused gate_up matmul and activation (`gated_gemv`), 128-wide K
    tiles (64 in float32, for shared memory) in 4 stages: up to 16 rows, 32 columns of each half a
    program (80 KiB of shared memory: two programs an SM, so a TP=2 rank of Llama-8B's 224 run in one
    wave); over 16, 64 columns, 8 warps, the dot tile padded to 64 rows. H200 sweep (sweep_gemv.py
    --gated, BENCHMARKS.md session 16), us with the RMSNorm before it, this / cuBLAS + silu_and_mul:
    the 64-column launch TP=2 64 rows 35.7 / 37.3, 32 rows 33.2 / 34.4, TP=1 64 rows 64.9 / 66.7; the
    32-column one TP=2 16 rows 32.6 / 35.3, 1 row 31.9 / 33.6 (in the engine, under 17 rows, it did
    not win: GATED_MIN_ROWS)."""
    block_k = 128 if dtype.itemsize <= 2 else 64
    if rows > 16:
        return (64, block_k, 8, 4, 1), 64
    return (32, block_k, 4, 4, 1), None


GATED_MIN_ROWS = 17
"""Unless $PAGEDSERVE_GATED_GEMV says otherwise, the fewest token rows a decode step needs for its gated
MLP to take `gated_gemv`. 2 x H200, Llama-8B, ms a step, on / off (BENCHMARKS.md, session 16): at batch
64 it won in every pair (TP=1 5.330 / 5.354, 5.326 / 5.350; TP=2 3.403 / 3.501, 3.427 / 3.455, 3.392 /
3.424); at 1-16 rows it lost or varied (TP=2 batch 1 3.25 / 2.90 and batch 16 3.50 / 3.32 with 6
stages; TP=1 batch 1 4.57 / 4.65 with 6 stages, 4.82 / 4.70 with the 4 of gated_config)."""


def takes_gated(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a gated MLP's gate_up projection of `rows` token rows into `n` features a half runs as
    `gated_gemv`: GATED_MIN_ROWS-64 rows ($PAGEDSERVE_GATED_GEMV=1: 1-64; =0: never), n >= 2048, a CUDA
    device under PDL. Shape, dtype and device kind only: every tensor-parallel rank decides alike."""
    forced = envs.gated_gemv()
    if forced is False or not (0 < rows <= MAX_ROWS and n >= ROW_PARALLEL_MIN_N and dtype in SUPPORTED_DTYPES):
        return False
    return device.type == "cuda" and use_pdl(device) and (forced or rows >= GATED_MIN_ROWS)


def gated_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for weight = [gate | up] ([2 D, K]): `gemv(..., gated=True)`."""
    return gemv(x, weight, bias, gated=True)


_WIDE_CONFIGS = [(16, 128, 4, 4), (16, 256, 4, 4), (32, 64, 4, 6), (32, 128, 4, 4), (32, 256, 4, 3),
                 (64, 64, 4, 6), (64, 128, 4, 4), (64, 128, 8, 4)]
"""(BLOCK_N, BLOCK_K, num_warps, num_stages) tried for 17-64 rows, K unsplit: Triton times each once per
(N, K, BLOCK_M) on first use (the engine's warm-up, before CUDA graph capture) and keeps the fastest."""
_gemv_wide = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in _WIDE_CONFIGS],
    key=["N", "K", "BLOCK_M"],
)(_gemv_kernel)


def reduce_config(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Config, int] | None:
    """(config, block_m) of `reduce_gemv`'s launch, or None where it has none. Its programs wait for
    their peers' tiles, so all of them must be resident at once on every rank: no more programs than
    SMs (the narrowest tile of 32, 64 or 128 columns whose count fits), K unsplit. The rest as
    row_parallel_config's: 128-wide K tiles (64, on 8 warps, in float32) in 6 stages (fewer for wider
    tiles, within Hopper's shared memory), the dot tile 64 rows over 16."""
    sms = _num_sms(device)
    half = dtype.itemsize <= 2
    block_k, warps = (128, 4) if half else (64, 8)  # float32's epilogue tiles spill with 4 warps (ptxas, sm_90)
    for block_n, stages in ((32, 6), (64, 6 if half else 4), (128, 4 if half else 3)):
        if cdiv(n, block_n) <= sms:
            return (block_n, block_k, warps, stages, 1), (64 if rows > 16 else 16)
    return None


REDUCE_BY_DEFAULT = False
"""Whether `reduce_gemv` is taken without $PAGEDSERVE_REDUCE_IN_MATMUL: off until measured in the engine
on two GPUs (BENCHMARKS.md, session 17)."""
REDUCE_MIN_ROWS = 17
"""Where REDUCE_BY_DEFAULT, the fewest token rows a tensor-parallel decode step needs for its
row-parallel matmuls to all-reduce their own rows (`reduce_gemv`)."""


def takes_reduce(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a row-parallel matmul of `rows` token rows into `n` features all-reduces its own rows
    (`reduce_gemv`): REDUCE_MIN_ROWS-64 rows where REDUCE_BY_DEFAULT ($PAGEDSERVE_REDUCE_IN_MATMUL=1:
    1-64; =0: never), a launch whose programs all fit the SMs at once (`reduce_config`), a CUDA device
    under PDL. Shape, dtype and device kind only: every rank decides alike, so no rank waits for a
    tile that is never pushed."""
    forced = envs.reduce_in_matmul()
    if forced is False or not (0 < rows <= MAX_ROWS and dtype in SUPPORTED_DTYPES):
        return False
    return (device.type == "cuda" and use_pdl(device) and (forced or (REDUCE_BY_DEFAULT and rows >= REDUCE_MIN_ROWS))
            and reduce_config(rows, n, dtype, device) is not None)


def reduce_gemv(x: torch.Tensor, weight: torch.Tensor, peers: PeerBuffers, slot: int, residual: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """A row-parallel matmul (o_proj, down_proj) whose epilogue also all-reduces over the ranks and adds
    the residual: h = the sum of every rank's x W^T, plus residual (the new residual stream), as a new
    tensor; the RMSNorm after it is a plain one of h. Collective like kernels/all_reduce_rms_norm.py's
    calls, over the same flag-free buffers and slots 0 / 1: every rank calls with the same shapes and
    slot, and the slot is empty again after."""
    m, n = x.shape[0], weight.shape[0]
    if residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual must be a [{m}, {n}] {x.dtype} with a contiguous last dim, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    check_same_device(weight.device, residual=residual)
    return _launch(x, weight, None, config, 2, None, None, False, (peers, slot, residual))


def gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS, last dim contiguous
    weight: torch.Tensor,  # [N, K], last dim contiguous
    bias: torch.Tensor | None = None,  # [N]
    config: Config | None = None,  # None: a default from the shape (autotuned over 16 rows)
    prefetch_tiles: int = 2,  # up to 16 rows: K tiles of W prefetched before the PDL wait
    push: tuple[PeerBuffers, int] | None = None,  # (peers, slot): also push y to them (see below)
    block_m: int | None = None,  # the dot tile's rows (16, 32 or 64, >= M); None: the smallest that holds M
    gated: bool = False,  # weight (and bias) are [gate | up]: return silu(x gate^T) * (x up^T), [M, N / 2]
) -> torch.Tensor:
    """x @ weight.T (+ bias) as a new [M, N] tensor in x's dtype, for M <= 64 rows.

    Up to 16 rows the launch takes `config` or `_config`'s; over 16 (a decode batch of 17-64), the
    autotuned one of _WIDE_CONFIGS, with K unsplit, and W's first 2048 columns prefetched before the PDL
    wait (slower than cuBLAS on every Llama-8B projection at 16-64 rows: BENCHMARKS.md, session 7).

    `push` (a row-parallel layer's partial sums, tensor-parallel, flag-free all-reduce buffers): each
    finished tile also goes into this rank's region of staging slot `slot` (0 or 1) of every peer,
    where `all_reduce_add_rms_norm(y, ..., slot=slot, pushed=True)` then finds it: the all-reduce's
    push leaves its own launch and overlaps the matmul's last tiles. Collective like that call: every
    rank pushes, with the same shapes and slot. Takes `config` or row_parallel_config's, never the
    autotuned launch.

    `gated` (a gated MLP's merged gate_up projection, `gated_gemv`): each program computes the same
    columns of the gate and the up half and stores silu(gate) * up, rounded as the unfused matmul and
    kernels/activation.py's silu_and_mul round: one launch and no [M, N] intermediate. K is unsplit
    and it takes `config` or gated_config's."""
    return _launch(x, weight, bias, config, prefetch_tiles, push, block_m, gated)


def _launch(x, weight, bias, config, prefetch_tiles, push, block_m, gated, reduce=None, rope=None):
    """gemv's launch; with `reduce` = (peers, slot, residual), reduce_gemv's (y is then h); with `rope`,
    kernels/qkv_rope.py's (its Rope operands; y is then q)."""
    _check_inputs(x, weight, bias)
    m, k = x.shape
    n = weight.shape[0]
    if rope is not None:  # (kernels/qkv_rope.py sets config and block_m)
        if gated or push is not None or reduce is not None:
            raise ValueError("a qkv + RoPE matmul takes no gate, no push and no reduction")
        if config[4:] not in ((), (1,)) or (rope.head_dim // 2) % config[0]:
            raise ValueError(f"a qkv + RoPE launch must leave K unsplit and tile half a head ({rope.head_dim // 2}) "
                             f"with its BLOCK_N, not {config}")
    if reduce is not None:
        if gated or push is not None or bias is not None:
            raise ValueError("a reducing matmul takes no bias (it would be summed once per rank), no gate and no push")
        check_pushable(m, n, x.dtype, *reduce[:2])
        if config is None:
            launch = reduce_config(m, n, x.dtype, x.device)
            if launch is None:
                raise ValueError(f"{cdiv(n, 128)} column tiles of {n} features cannot all be resident at once")
            config, block_m = launch
        if config[4:] not in ((), (1,)) or cdiv(n, config[0]) > _num_sms(x.device):
            raise ValueError(f"a reducing matmul's launch must leave K unsplit and fit the SMs, not {config}")
    if gated:
        if n % 2 or push is not None:
            raise ValueError(f"a gated matmul takes [gate | up] weights (an even row count, not {n}) and no push")
        n //= 2
        if config is None:
            config, block_m = gated_config(m, x.dtype)
        config = (*config[:4], 1)  # K unsplit: the epilogue needs both whole sums
    if push is not None:
        check_pushable(m, n, x.dtype, *push)
        if bias is not None:
            raise ValueError("a pushed matmul has no bias (it would be summed once per rank)")
        if config is None:
            config, block_m = row_parallel_config(m, x.dtype)
    y = torch.empty((m, n if rope is None else rope.num_heads * rope.head_dim), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m = block_m or max(16, next_pow2(m))
    if block_m not in (16, 32, 64) or block_m < m:
        raise ValueError(f"block_m must be 16, 32 or 64 and hold the {m} rows, not {block_m}")
    line_elems = LINE // x.element_size()
    pdl = use_pdl(x.device)
    common = dict(HAS_BIAS=bias is not None, BLOCK_M=block_m, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  USE_PDL=pdl, LINE_ELEMS=line_elems, launch_pdl=pdl)
    operands = (x, weight, bias if bias is not None else weight, y)
    if reduce is not None:
        peers, slot, residual = reduce
        peer_args, push_meta = push_args(peers, slot, x.dtype)
        push_meta = dict(push_meta, PUSH=False, REDUCE=True)
        fused_args = (peers.data_bytes, residual, residual.stride(0))
    else:
        peer_args, push_meta = push_args(*push, x.dtype) if push is not None else ((0,) * 9, {})
        fused_args = (0, y, 0)
    if rope is None:
        rope_args = (y, y, y, 0, y, y, y, 0, 0, 0, 0)
    else:
        rope_args = (rope.positions, rope.cos_cache, rope.sin_cache, rope.cos_cache.stride(0), rope.slot_mapping,
                     rope.k_cache, rope.v_cache, rope.k_cache.stride(1), rope.k_cache.stride(2), rope.num_heads,
                     rope.num_kv_heads)
        push_meta = dict(push_meta, ROPE=True, HEAD_DIM=rope.head_dim)
    strides = (x.stride(0), weight.stride(0), y.stride(0), *peer_args, *fused_args, *rope_args)
    if block_m > 16 and config is None and not envs.triton_interpret():  # (gated, pushed, reducing: set config)
        prefetch_k = max(line_elems, min(_WIDE_PREFETCH_COLS, prev_pow2(k)))
        _gemv_wide[lambda meta: (cdiv(n, meta["BLOCK_N"]), 1)](  # K unsplit: no scratch, no counters
            *operands, y, y, m, n, k, k, *strides, SPLIT_K=1, PREFETCH_K=prefetch_k, **common)
        return y
    if config is None and block_m > 16:  # the interpreter: one config (autotuning would time it on the CPU)
        config = (32, 64, 4, 2)
    block_n, block_k, num_warps, num_stages, *rest = config or _config(n, x.device)
    split_k = max(1, min(rest[0] if rest else 1, cdiv(k, block_k)))  # no split without a K tile
    k_per_split = cdiv(cdiv(k, split_k), block_k) * block_k  # whole K tiles per split
    split_k = cdiv(k, k_per_split)
    if split_k > 1:
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _COUNTERS.reserve(x.device, cdiv(n, block_n))
    else:
        part = counters = y  # unused
    programs = cdiv(n, block_n) if rope is None else n // (2 * block_n)  # ROPE: a pair of column tiles each
    _gemv_kernel[(programs, split_k)](
        *operands, part, counters, m, n, k, k_per_split, *strides,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, PREFETCH_K=prefetch_tiles * block_k,
        num_warps=num_warps, num_stages=num_stages, GATED=gated, **common, **push_meta,
    )
    return y
