"""Top-p thresholds without sorting the vocabulary: a search over the float order of each row's
scaled logits, many programs a row. The torch sampling path on CUDA takes its top-p filter from here
instead of a full sort (on an H200, top-p 0.9 over [64, 128256] logits took 1.39 ms of GPU time a
call through the sort and 0.66 ms with this search: scripts/bench_sampling.py, BENCHMARKS.md session 11).

Row r keeps the smallest prefix of its tokens, best first, whose probability reaches top_p[r], and
every token tied with the last one kept (gpu_workers/sampling_ops.apply_top_k_top_p's rule). With
F(t) = the softmax mass of the tokens with y >= t, a token of value v is kept iff the mass strictly
above it is below top_p * F(-inf). So the kept set is {y >= t*}, t* the largest float with
F(t*) >= top_p * F(-inf): a threshold, found by narrowing a range of float keys (order-preserving
int32 images of the floats) that brackets it:

    keys      key(-inf) = lo ............................................. hi = key(max y) + 1
    pass 0    F at 16 pivots lo + j (hi - lo) / 16 (pivot 0 is lo: F(lo) is the row's total Z)
              lo <- the last pivot with F >= top_p * Z, hi <- the first pivot past it
    pass 1..  the same inside the new [lo, hi): 16x narrower each pass; 8 passes cover 2**32 keys
    result    t* = the float of lo once hi == lo + 1

Each pass is one launch over a grid (rows, CHUNK-token chunks). Every program first replays the
earlier passes' narrowing from their totals (identical on every program of the row), then adds its
chunk's masses exp(y - max y) at the 16 pivots: float32 sums within the program, added to the row's
totals as int64 fixed point (2**40 a unit), so the totals do not depend on the order the programs
finish in, and, the chunks being fixed, a row's threshold does not depend on the batch around it.
A last launch (one program a row) narrows once more and writes t*. Rows with top_p >= 1 keep every
token (t* = -inf) and cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ipc import envs
from kernels.kv_cache import cdiv, check_same_device
from kernels.sampling import _from_key, _key

PIVOTS = 16
PASSES = 8
"""16**8 = 2**32 float keys: the range is down to one key after the last pass. (Fewer pivots make
more passes over the row, more make each pass compare every token with more of them.)"""
CHUNK = 4096
"""Tokens a program sums over in each pass (fixed, so a row's sums never depend on the batch)."""
_BLOCK = 128
_INTERPRETER_BLOCK = 1024  # the same sums in 8x fewer (slow) interpreted steps
_FIXED_ONE = 1099511627776.0  # 2**40: a token's mass exp(y - max) <= 1 in int64 fixed point


@triton.jit
def _narrowed(totals_ptr, row, num_rows, top_p, y_max, passes, P: tl.constexpr):
    """(lo, hi) after `passes` passes of row's search, from their totals [PASSES, num_rows, P]."""
    j = tl.arange(0, P).to(tl.int64)
    lo = _key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    hi = _key(y_max).to(tl.int64) + 1
    target = tl.zeros((), tl.int64)
    for i in range(passes):
        if hi - lo > 1:
            f = tl.load(totals_ptr + (i * num_rows + row) * P + j)  # [P] int64: F at this pass's pivots
            if i == 0:  # pivot 0 of pass 0 is key(-inf): F there is the row's total mass
                z = tl.sum(tl.where(j == 0, f, 0), axis=0)
                target = (z.to(tl.float64) * top_p.to(tl.float64)).to(tl.int64)
            pivots = lo + (hi - lo) * j // P  # [P]
            ge = f >= target
            new_lo = tl.max(tl.where(ge, pivots, lo), axis=0)
            hi = tl.min(tl.where(ge, hi, pivots), axis=0)
            lo = new_lo
    return lo, hi


@triton.jit(do_not_specialize=["num_rows", "pass_idx"])
def _top_p_pass_kernel(
    y_ptr, stride_y, vocab, y_max_ptr, top_p_ptr, totals_ptr, num_rows, pass_idx,
    P: tl.constexpr, CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr, FIXED_ONE: tl.constexpr,
):
    row = tl.program_id(0)
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1.0:
        y_max = tl.load(y_max_ptr + row)
        lo, hi = _narrowed(totals_ptr, row, num_rows, top_p, y_max, pass_idx, P)
        if hi - lo > 1:
            j = tl.arange(0, P)
            pivots = (lo + (hi - lo) * j.to(tl.int64) // P).to(tl.int32)  # [P] float keys
            row_ptr = y_ptr + row.to(tl.int64) * stride_y
            acc = tl.zeros([BLOCK, P], tl.float32)  # reduced once, after the loop
            start = tl.program_id(1) * CHUNK_SIZE
            for off in range(0, CHUNK_SIZE, BLOCK):
                cols = start + off + tl.arange(0, BLOCK)
                y = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))  # [BLOCK]
                w = tl.exp(y - y_max)  # [BLOCK]; 0 for filtered (-inf) tokens
                acc += tl.where(_key(y)[:, None] >= pivots[None, :], w[:, None], 0.0)  # [BLOCK, P]
            sums = tl.sum(acc, axis=0)  # [P]
            tl.atomic_add(totals_ptr + (pass_idx * num_rows + row) * P + j, (sums * FIXED_ONE).to(tl.int64))


@triton.jit(do_not_specialize=["num_rows"])
def _top_p_threshold_kernel(y_max_ptr, top_p_ptr, totals_ptr, out_ptr, num_rows, passes, P: tl.constexpr):
    row = tl.program_id(0)
    top_p = tl.load(top_p_ptr + row)
    threshold = tl.full((), float("-inf"), tl.float32)
    if top_p < 1.0:
        lo, hi = _narrowed(totals_ptr, row, num_rows, top_p, tl.load(y_max_ptr + row), passes, P)
        threshold = _from_key(lo.to(tl.int32))
    tl.store(out_ptr + row, threshold)


def top_p_thresholds(y: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[S] float32: for each row of y [S, V] (float32 scaled logits, filtered tokens -inf, each row
    with a finite value), the smallest value top-p keeps: keep y >= it. -inf where top_p >= 1."""
    if y.dim() != 2 or y.dtype != torch.float32 or y.stride(1) != 1:
        raise ValueError(f"y must be [rows, vocab] float32 with contiguous rows, got {tuple(y.shape)} {y.dtype} "
                         f"strides {y.stride()}")
    if top_p.shape != (y.shape[0],) or top_p.dtype != torch.float32 or not top_p.is_contiguous():
        raise ValueError(f"top_p must be a contiguous [{y.shape[0]}] float32 tensor, got {tuple(top_p.shape)} "
                         f"{top_p.dtype}")
    check_same_device(y.device, top_p=top_p)
    num_rows, vocab = y.shape
    out = torch.empty(num_rows, dtype=torch.float32, device=y.device)
    if num_rows == 0:
        return out
    y_max = y.amax(dim=1)  # [S]
    totals = torch.zeros(PASSES, num_rows, PIVOTS, dtype=torch.int64, device=y.device)
    block = _INTERPRETER_BLOCK if envs.triton_interpret() else _BLOCK
    for i in range(PASSES):
        _top_p_pass_kernel[(num_rows, cdiv(vocab, CHUNK))](
            y, y.stride(0), vocab, y_max, top_p, totals, num_rows, i,
            P=PIVOTS, CHUNK_SIZE=CHUNK, BLOCK=block, FIXED_ONE=_FIXED_ONE, num_warps=4)
    _top_p_threshold_kernel[(num_rows,)](y_max, top_p, totals, out, num_rows, PASSES, P=PIVOTS)
    return out
