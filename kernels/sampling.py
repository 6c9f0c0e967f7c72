"""Sampling without a vocabulary sort: temperature, min-p, top-k, top-p and the draw, one launch, one
program per row.

Every filter keeps the tokens at or above one threshold of the scaled logits y = logit / temperature
(ties with it survive), so a row needs thresholds, never a sorted vocabulary:

    min_p:  y >= max(y) + log(min_p)
    top_k:  the k-th largest y                        (largest t with count(y >= t) >= k)
    top_p:  the largest t with mass(y >= t) >= top_p * mass of the tokens kept so far

The row's kept set is the strictest of them, in vLLM's order (min-p, then top-k, then top-p on the
renormalized survivors). Ties: every token equal to a threshold is kept, as in the torch path; where
top-k's threshold is tied, top-p renormalizes over all the tied tokens kept, where the torch path's
sort counts exactly k of them, so the two can keep different sets on such rows (in bfloat16 at a 152k
vocabulary ~20 tokens share each value near a top-400 cut, so such rows are common there).

Each "largest t with F(t) >= target" costs two cheap passes over the row and a search over a few
candidates:

    1. histogram   bucket each kept y by its distance below the max, 1/8 nat a bucket (32 nats, then
                   one open bucket); counts are exact, a bucket's mass lies within e^(-1/8) of its
                   bound, so the buckets that can hold the crossing form a short bracket [a, b]
    2. compact     the y in buckets a..b go to a per-row scratch list (at most MAX_CANDIDATES), and
                   the exact F of the buckets above a is summed
    3. search      over the list only: 16 pivots a pass (8 even in value, 8 even in the float's bit
                   order), [lo, hi] moving to the data values around the crossing until lo == hi

A bracket with more candidates than the scratch holds (a near-flat row) runs step 3 over the whole
row instead: the same answer, more passes.

The draw is the Gumbel race: argmax over kept tokens of y_i - log(-log(u_i)), u_i uniform, picks
token i with probability softmax(y)_i over the kept set, with no cumsum and no normalizing. u comes
from Philox (tl.randint4x, four tokens a call) keyed by the row's 64-bit seed and the token id, so a
row's draw depends on its seed alone, never on the batch. Greedy rows (temperature < greedy_eps) take
the first argmax.

Passes over a random row: 1 (max) + 2 per active top-k / top-p + 1 (draw).
gpu_workers/sampling_ops.py keeps the torch reference (apply_min_p, apply_top_k_top_p), which is the default:
on an H200 (scripts/bench_sampling.py) this kernel took 367 us for temperature alone and 3,460 for top-p
at batch 1 (torch: 120 and 556), since one program per row leaves the other SMs idle; it only draws
level at ~256 rows. $PAGEDSERVE_TRITON_SAMPLING=1 selects it. Splitting each row over many programs (a
grid-wide histogram, then the bracket search) is what it would need to be the default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_same_device, next_pow2

PIVOTS = 16
"""Pivots per search pass (half by value, half by float bit order)."""
MAX_SEARCH_PASSES = 40
"""A safety bound only: the bit-order pivots alone finish a 32-bit range in 11 passes."""
NUM_BUCKETS = 256
BUCKETS_PER_NAT = 8
"""Histogram buckets: 1/8 nat of scaled logit each, 255 of them below the max, then one open bucket."""
MAX_CANDIDATES = 4096
"""Scratch slots per row for a bracket's values."""
SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SampleOutput(NamedTuple):
    token_ids: torch.Tensor
    """[S] int64: the sampled (or, for greedy rows, argmax) token of each row."""
    thresholds: torch.Tensor
    """[S] float32: the smallest kept scaled logit y = logit / temperature of each random row (-inf
    when nothing is filtered); the row's max logit for greedy rows. For tests and diagnosis."""


@triton.jit
def _key(y):
    """Order-preserving int32 key of a float32: a < b iff key(a) < key(b)."""
    bits = y.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _from_key(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(row_ptr, cols, vocab, temperature):
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return tl.div_rn(x, temperature)  # IEEE-rounded, as torch divides: both paths see equal values


@triton.jit
def _search(ptr, n, temperature, y_max, lo, hi, target, base,
            BY_MASS: tl.constexpr, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr):
    """The largest value t among ptr[:n] / temperature with F(t) >= target, F(t) = base + the count
    (or, BY_MASS, the sum of exp(y - y_max)) of the y >= t. Needs F(lo) >= target, hi >= the answer.

    Invariant: lo <= answer <= hi. A pass evaluates F at the pivots; every pivot with F >= target
    raises lo to the smallest y at or above it (same F), every other one lowers hi to the largest y
    below it (the answer is below that pivot). hi drops or lo reaches hi each pass, so it ends."""
    half: tl.constexpr = NUM_PIVOTS // 2
    j = tl.arange(0, NUM_PIVOTS)
    step = (j % half + 1).to(tl.float32) / half  # (0, 1]
    passes = 0
    while (lo < hi) & (passes < MAX_PASSES):
        by_value = tl.where(j % half == half - 1, hi, lo + (hi - lo) * step)  # the last pivot is hi itself
        key_lo = _key(lo).to(tl.int64)
        key_hi = _key(hi).to(tl.int64)
        by_bits = _from_key((key_lo + (key_hi - key_lo) * (j % half + 1) // half).to(tl.int32))
        pivots = tl.where(j < half, by_value, by_bits)  # [P]
        f = tl.zeros([NUM_PIVOTS], tl.float32) + base
        min_ge = tl.full([NUM_PIVOTS], float("inf"), tl.float32)
        max_lt = tl.full([NUM_PIVOTS], float("-inf"), tl.float32)
        for start in range(0, n, BLOCK):
            y = _load_scaled(ptr, start + tl.arange(0, BLOCK), n, temperature)  # [BLOCK]
            ge = y[:, None] >= pivots[None, :]  # [BLOCK, P]
            if BY_MASS:
                f += tl.sum(tl.where(ge, tl.exp(y - y_max)[:, None], 0.0), axis=0)
            else:
                f += tl.sum(ge.to(tl.float32), axis=0)  # exact: counts stay below 2**24
            min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, y[:, None], float("inf")), axis=0))
            max_lt = tl.maximum(max_lt, tl.max(tl.where(ge, float("-inf"), y[:, None]), axis=0))
        reached = f >= target  # [P]
        lo = tl.maximum(lo, tl.max(tl.where(reached, min_ge, float("-inf")), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(reached, float("inf"), max_lt), axis=0))
        passes += 1
    return lo


@triton.jit
def _bucket(y, y_max, NUM_BUCKETS: tl.constexpr, PER_NAT: tl.constexpr):
    """Bucket of each y by its distance below the max: PER_NAT buckets a nat, the last one open."""
    return tl.minimum((y_max - y) * PER_NAT, NUM_BUCKETS - 1).to(tl.int32)


@triton.jit
def _weight(y, y_max, BY_MASS: tl.constexpr):
    if BY_MASS:
        return tl.exp(y - y_max)
    else:
        return tl.where(y > float("-inf"), 1.0, 0.0)


@triton.jit
def _threshold(row_ptr, vocab, temperature, y_max, y_min, floor, target_scale, scratch_ptr,
               BY_MASS: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr,
               MAX_PASSES: tl.constexpr, NUM_BUCKETS: tl.constexpr, PER_NAT: tl.constexpr,
               MAX_CANDIDATES: tl.constexpr):
    """The largest y >= floor with F(y) >= target, F = count (top-k: target_scale = k) or mass
    (top-p: target = target_scale * the mass of the y >= floor) of the finite y >= it; `floor` when
    the y >= floor number target_scale or fewer (top-k keeps them all). See the module docstring."""
    # 1. histogram of the kept y by bucket, and their total F
    counts = tl.zeros([NUM_BUCKETS], tl.int32)
    total = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _load_scaled(row_ptr, cols, vocab, temperature)
        kept = (cols < vocab) & (y >= floor) & (y > float("-inf"))
        counts += tl.histogram(_bucket(y, y_max, NUM_BUCKETS, PER_NAT), NUM_BUCKETS, mask=kept)
        total += tl.sum(tl.where(kept, _weight(y, y_max, BY_MASS), 0.0), axis=0)
    if BY_MASS:
        target = target_scale * total
    else:
        target = target_scale
    result = floor
    if target < total:
        # The buckets [a, b] that can hold the crossing: F above bucket j is at most upper[j], at
        # least lower[j] (a 1e-4 margin absorbs rounding at bucket edges and in the sums).
        idx = tl.arange(0, NUM_BUCKETS)
        c = counts.to(tl.float32)
        if BY_MASS:
            upper = tl.cumsum(c * tl.exp(-idx.to(tl.float32) / PER_NAT), 0) * (1 + 1e-4)
            lower = tl.cumsum(tl.where(idx < NUM_BUCKETS - 1, c * tl.exp(-(idx + 1).to(tl.float32) / PER_NAT),
                                       0.0), 0) * (1 - 1e-4)
        else:
            upper = tl.cumsum(c, 0)
            lower = upper
        a = tl.min(tl.where(upper >= target, idx, NUM_BUCKETS - 1), axis=0)
        b = tl.min(tl.where(lower >= target, idx, NUM_BUCKETS - 1), axis=0)
        num_candidates = tl.sum(tl.where((idx >= a) & (idx <= b), counts, 0), axis=0)
        if num_candidates <= MAX_CANDIDATES:
            # 2. compact the bracket's y into scratch; sum F over the buckets above it
            above = tl.zeros([], tl.float32)
            used = tl.zeros([], tl.int32)
            lo = tl.full([], float("inf"), tl.float32)
            hi = tl.full([], float("-inf"), tl.float32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                y = _load_scaled(row_ptr, cols, vocab, temperature)
                kept = (cols < vocab) & (y >= floor) & (y > float("-inf"))
                bucket = _bucket(y, y_max, NUM_BUCKETS, PER_NAT)
                in_bracket = kept & (bucket >= a) & (bucket <= b)
                above += tl.sum(tl.where(kept & (bucket < a), _weight(y, y_max, BY_MASS), 0.0), axis=0)
                slot = used + tl.cumsum(in_bracket.to(tl.int32), 0) - 1
                tl.store(scratch_ptr + slot, y, mask=in_bracket & (slot < MAX_CANDIDATES))  # fits: counted above
                used += tl.sum(in_bracket.to(tl.int32), axis=0)
                lo = tl.minimum(lo, tl.min(tl.where(in_bracket, y, float("inf")), axis=0))
                hi = tl.maximum(hi, tl.max(tl.where(in_bracket, y, float("-inf")), axis=0))
            tl.debug_barrier()  # the scratch writes of every thread, before any thread reads them
            # 3. search the candidates (already scaled: temperature 1)
            result = _search(scratch_ptr, tl.minimum(used, MAX_CANDIDATES), 1.0, y_max, lo, hi, target, above,
                             BY_MASS, SEARCH_BLOCK, NUM_PIVOTS, MAX_PASSES)
        else:  # a near-flat row: search the whole row
            result = _search(row_ptr, vocab, temperature, y_max, tl.maximum(floor, y_min), y_max, target, 0.0,
                             BY_MASS, SEARCH_BLOCK, NUM_PIVOTS, MAX_PASSES)
    return result


@triton.jit
def _race(row_ptr, cols, vocab, temperature, threshold, r, best, token):
    """One sub-block of the Gumbel race, r: its Philox draws. Returns the updated (best, token)."""
    y = _load_scaled(row_ptr, cols, vocab, temperature)
    u = ((r & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits, strictly inside (0, 1)
    score = tl.where(y >= threshold, y - tl.log(-tl.log(u)), float("-inf"))  # [BLOCK // 4]
    block_best = tl.max(score, axis=0)
    block_token = tl.min(tl.where(score == block_best, cols, vocab), axis=0)
    return tl.maximum(best, block_best), tl.where(block_best > best, block_token, token)


@triton.jit
def _race_block(row_ptr, start, vocab, temperature, threshold, seed, best, token, BLOCK: tl.constexpr):
    """The race over tokens [start, start + BLOCK), start a multiple of BLOCK: one Philox call per four
    tokens, keyed by (seed, start // 4 + i). kernels/gumbel.py races the same way, so both draw the
    same noise at every token. Returns the updated (best, token)."""
    QUARTER: tl.constexpr = BLOCK // 4
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, QUARTER))
    cols = start + tl.arange(0, QUARTER)
    best, token = _race(row_ptr, cols, vocab, temperature, threshold, r0, best, token)
    best, token = _race(row_ptr, cols + QUARTER, vocab, temperature, threshold, r1, best, token)
    best, token = _race(row_ptr, cols + 2 * QUARTER, vocab, temperature, threshold, r2, best, token)
    return _race(row_ptr, cols + 3 * QUARTER, vocab, temperature, threshold, r3, best, token)


@triton.jit(do_not_specialize=["stride_row", "vocab", "greedy_eps"],
            do_not_specialize_on_alignment=["logits_ptr", "temperature_ptr", "top_k_ptr", "top_p_ptr",
                                            "min_p_ptr", "seed_ptr", "scratch_ptr"])
def _sample_kernel(
    logits_ptr, stride_row, vocab,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # [S] each
    token_ptr, threshold_ptr,  # outputs, [S]
    scratch_ptr,  # [S, MAX_CANDIDATES] float32
    greedy_eps,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr,
    NUM_BUCKETS: tl.constexpr, PER_NAT: tl.constexpr, MAX_CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    scratch = scratch_ptr + row * MAX_CANDIDATES
    # Pass 1, raw logits: the max and its first index (greedy), the smallest finite logit and how many
    # are finite.
    x_max = tl.full([], float("-inf"), tl.float32)
    x_min = tl.full([], float("inf"), tl.float32)
    arg = tl.zeros([], tl.int32)
    num_finite = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)  # [BLOCK]
        block_max = tl.max(x, axis=0)
        block_arg = tl.min(tl.where(x == block_max, cols, vocab), axis=0)
        arg = tl.where(block_max > x_max, block_arg, arg)
        x_max = tl.maximum(x_max, block_max)
        finite = x > float("-inf")
        x_min = tl.minimum(x_min, tl.min(tl.where(finite, x, float("inf")), axis=0))
        num_finite += tl.sum(finite.to(tl.int32), axis=0)

    temperature = tl.load(temperature_ptr + row)
    token = arg
    threshold = x_max
    if (temperature >= greedy_eps) & (num_finite > 0):
        y_max = tl.div_rn(x_max, temperature)
        y_min = tl.div_rn(x_min, temperature)
        threshold = tl.full([], float("-inf"), tl.float32)
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0:
            threshold = y_max + tl.log(min_p)
        k = tl.load(top_k_ptr + row)
        if k > 0:
            threshold = _threshold(row_ptr, vocab, temperature, y_max, y_min, threshold, k.to(tl.float32), scratch,
                                   False, BLOCK, SEARCH_BLOCK, NUM_PIVOTS, MAX_PASSES, NUM_BUCKETS, PER_NAT,
                                   MAX_CANDIDATES)
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            threshold = _threshold(row_ptr, vocab, temperature, y_max, y_min, threshold, top_p, scratch,
                                   True, BLOCK, SEARCH_BLOCK, NUM_PIVOTS, MAX_PASSES, NUM_BUCKETS, PER_NAT,
                                   MAX_CANDIDATES)
        # The draw: the Gumbel race over the kept tokens, one Philox call per four tokens.
        seed = tl.load(seed_ptr + row)
        best = tl.full([], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            best, token = _race_block(row_ptr, start, vocab, temperature, threshold, seed, best, token, BLOCK)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(threshold_ptr + row, threshold)


def _check_inputs(logits, temperature, top_k, top_p, min_p, seeds) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [num_rows, vocab] with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported ({SUPPORTED_LOGIT_DTYPES})")
    expected = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int32),
                "top_p": (top_p, torch.float32), "min_p": (min_p, torch.float32), "seeds": (seeds, torch.int64)}
    for name, (t, dtype) in expected.items():
        if t.shape != (logits.shape[0],) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{logits.shape[0]}] {dtype} tensor, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
    check_same_device(logits.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds)


def sample(
    logits: torch.Tensor,  # [S, V] float32 / bf16 / fp16, rows contiguous
    temperature: torch.Tensor,  # [S] float32; < greedy_eps: greedy
    top_k: torch.Tensor,  # [S] int32; <= 0 disables
    top_p: torch.Tensor,  # [S] float32; >= 1 disables
    min_p: torch.Tensor,  # [S] float32; 0 disables
    seeds: torch.Tensor,  # [S] int64: each row's Philox seed
    greedy_eps: float = 1e-5,
) -> SampleOutput:
    """One token per row (see the module docstring). The logits are only read."""
    _check_inputs(logits, temperature, top_k, top_p, min_p, seeds)
    num_rows, vocab = logits.shape
    token_ids = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    thresholds = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return SampleOutput(token_ids, thresholds)
    block = min(1024, max(64, next_pow2(vocab)))  # a model's vocabulary: one size per engine
    scratch = torch.empty(num_rows, MAX_CANDIDATES, dtype=torch.float32, device=logits.device)
    _sample_kernel[(num_rows,)](
        logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, seeds, token_ids, thresholds,
        scratch, greedy_eps, BLOCK=block, SEARCH_BLOCK=min(block, 128), NUM_PIVOTS=PIVOTS,
        MAX_PASSES=MAX_SEARCH_PASSES, NUM_BUCKETS=NUM_BUCKETS, PER_NAT=BUCKETS_PER_NAT,
        MAX_CANDIDATES=MAX_CANDIDATES, num_warps=8,
    )
    return SampleOutput(token_ids, thresholds)
