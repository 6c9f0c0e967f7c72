"""Weight prefetch into L2 from inside latency-bound decode kernels, for the matmul that follows them.

A decode step's matmuls read their weights once from HBM (cuBLAS; 25 MB for Llama-8B's qkv_proj on one
of two tensor-parallel ranks). The kernels just before them are latency-bound: the tensor-parallel
all-reduce + RMSNorm waits on a peer's flag for most of its ~6 us, decode attention at ~250-token
contexts uses about half the memory bandwidth. So they also issue `prefetch.global.L2` for the next
matmul's weight, which the matmul then reads from L2:

    all-reduce + norm    [push rows][signal][prefetch qkv_proj W ... ][wait][reduce + norm]
    qkv_proj (cuBLAS)                                                                    [W from L2]

    decode attention     [prefetch o_proj W][wait for rotary][attend ...........]
    o_proj (cuBLAS)                                                              [W from L2]

The first is on by default. The second is off ($PAGEDSERVE_PREFETCH_ATTENTION=1): on 2 x H100 its
prefetch competed with the attention's own K/V reads and slowed TP=1 batch-64 decode (7.27 -> 7.40 ms a
step), while the first took TP=2 from 4.75 to 4.43 (BENCHMARKS.md, session 7).

What is prefetched is a prefix of every weight row (the first `prefix_lines` 128-byte lines), not the
first rows: a GEMM's thread blocks each sweep their rows along K together, so a prefix is what they
all read first. The amount is capped ($PAGEDSERVE_PREFETCH_MB, default 32 of the H100/H200's 50 MB L2;
0 turns prefetch off) and so is each program's share (4096 lines, 512 KiB), so a launch of few
programs (batch 1) issues little and is not slowed. Prefetches are hints: they change no result, and
run only where PDL does (NVIDIA sm_90+, not interpreted).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ipc import envs
from kernels.pdl import use_pdl

LINE = 128  # bytes per prefetch: one L2 cache line
MAX_LINES_PER_PROGRAM = 4096
CHUNK = 1024  # lines a program's threads issue per loop iteration


@triton.jit
def l2_prefetch(ptrs):
    """prefetch.global.L2 of each address (the result is a dummy: inline asm must return something)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows(ptr, num_rows, row_bytes, prefix_lines, pid, num_programs, CHUNK: tl.constexpr):
    """Program `pid` of `num_programs` prefetches its share of the first `prefix_lines` lines of each of
    the `num_rows` rows (`row_bytes` apart) at `ptr`."""
    base = ptr.to(tl.pointer_type(tl.uint8))
    total = num_rows * prefix_lines
    per = tl.cdiv(total, num_programs)
    start = pid * per
    end = tl.minimum(start + per, total)
    for s in range(start, end, CHUNK):
        idx = s + tl.arange(0, CHUNK)
        idx = tl.where(idx < end, idx, start)  # past the share: the share's first line again (a no-op)
        row = idx // prefix_lines
        line = idx - row * prefix_lines
        l2_prefetch(base + row.to(tl.int64) * row_bytes + line * 128)  # 128: LINE


class Prefetch(NamedTuple):
    """What a kernel prefetches: kernel arguments (tensor, num_rows, row_bytes, prefix_lines) and
    whether to at all (a constexpr: off, the kernel compiles without it)."""

    tensor: torch.Tensor
    num_rows: int
    row_bytes: int
    prefix_lines: int
    enabled: bool

    def args(self) -> tuple:
        return self.tensor, self.num_rows, self.row_bytes, self.prefix_lines


def plan(weight: torch.Tensor | None, num_programs: int, like: torch.Tensor) -> Prefetch:
    """The prefetch of `weight` ([rows, cols], rows contiguous) by a launch of `num_programs` programs
    on `like`'s device; disabled when there is none, off ($PAGEDSERVE_PREFETCH_MB=0), or without PDL.
    Cheap: eager decode steps call it for ~3 launches a layer."""
    if weight is None or weight.dim() != 2 or weight.stride(1) != 1 or not use_pdl(like.device):
        return Prefetch(like, 0, 0, 0, False)
    rows, size = weight.shape[0], weight.element_size()
    prefix = _prefix_lines(rows, triton.cdiv(weight.shape[1] * size, LINE), num_programs, envs.prefetch_mb())
    if prefix == 0 or weight.device != like.device:
        return Prefetch(like, 0, 0, 0, False)
    return Prefetch(weight, rows, weight.stride(0) * size, prefix, True)


@functools.lru_cache(maxsize=1024)
def _prefix_lines(rows: int, row_lines: int, num_programs: int, cap_mb: int) -> int:
    """Lines of each row to prefetch: all of them if the cap and the programs' shares allow, else
    as many as they do (0: not even one line a row)."""
    budget = min(cap_mb * (1 << 20) // LINE, max(1, num_programs) * MAX_LINES_PER_PROGRAM)
    return min(row_lines, budget // rows) if rows else 0
