"""What the fused all-reduce kernels (kernels/all_reduce_rms_norm.py) and the matmuls that push into
them (kernels/gemv.py, `push`) share: the ranks' buffers and their staging slots, the flag-free
protocol's sentinel and pushing arguments, and the per-row device functions of the reduction.

    one rank's buffer:  | slot 0: region 0 | region 1 | ... | slot 1 | slot 2 | slot 3 | flags, epochs |
    region r of slot s: rank r's rows [num_rows, hidden] for the call in slot s, row-major

The protocols themselves, and why a slot is empty again before a peer pushes into it, are described
in kernels/all_reduce_rms_norm.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.kv_cache import SUPPORTED_DTYPES

MAX_HIDDEN = 16384  # one row per loop iteration in registers


class PeerBuffers(NamedTuple):
    """The buffers of all ranks, as this process addresses them."""

    ptrs: torch.Tensor
    """int64 [world_size] on the kernel's device: the base address of each rank's buffer."""
    rank: int
    world_size: int
    data_bytes: int
    """Bytes of each source rank's region of each of the NUM_SLOTS staging slots (a multiple of 16): the
    largest message the kernel takes."""
    lamport: bool = False
    """The flag-free protocol (kernels/all_reduce_rms_norm.py): the buffers were readied by `init_lamport`."""
    bases: tuple[int, ...] = ()
    """`ptrs` as host integers (the flag-free kernel takes them as arguments, so no program loads an
    address before it can push); empty: read from `ptrs` at each call (CPU tests only: a device sync)."""


NUM_SLOTS = 4  # flags: 0 and 1 alternate without a second barrier, 2 (slot=None) has one; flag-free:
# 0 and 1 as the caller alternates them, 2 and 3 (slot=None) by the programs' own count of such calls
MAX_WORLD = 8  # the flag-free kernel's buffer-address arguments


def staging_bytes(data_bytes: int, world_size: int) -> int:
    return NUM_SLOTS * world_size * data_bytes


@triton.jit
def _x_row(x_ptr, stride_x, row, ids_ptr, vocab_start, vocab_rows, cols, mask, GATHER: tl.constexpr):
    """Row `row` of this rank's partial sums: x's row; or (GATHER, x the rank's slice of a vocab-parallel
    embedding table) the table row of token `row`'s id, zeros where the id is another rank's."""
    if GATHER:
        local = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
        inside = (local >= 0) & (local < vocab_rows)
        src = x_ptr + tl.where(inside, local, 0) * stride_x
        return tl.load(src + cols, mask=mask & inside, other=0.0)
    else:
        return tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)


@triton.jit
def _residual_row(residual_ptr, stride_r, row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """Row `row` of the residual as float32 (zeros without one). Loaded before the wait for the peers,
    so its latency hides behind theirs."""
    if HAS_RESIDUAL:
        return tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.zeros(cols.shape, dtype=tl.float32)


@triton.jit
def _add_norm_store(acc, r_in, weight, out_ptr, residual_out_ptr, offset, cols, mask, hidden,
                    eps, HAS_RESIDUAL: tl.constexpr):
    """The tail of both kernels for one row: the float32 sum `acc` rounded as an all-reduce's output
    would be, plus the residual row `r_in` (HAS_RESIDUAL) is the new residual; its RMSNorm times
    `weight` the output."""
    dtype = out_ptr.dtype.element_ty
    h = acc.to(dtype)  # what an all-reduce would have returned
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + r_in).to(dtype)
    tl.store(residual_out_ptr + offset + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
    normed = (hf * inv_rms).to(dtype).to(tl.float32)  # rounded before scaling, like kernels.rms_norm
    tl.store(out_ptr + offset + cols, (normed * weight).to(dtype), mask=mask)


SENTINEL_WORD = -2147450880  # 0x80008000 as int32: two bf16/fp16 -0.0, or one float32 denormal
"""What an empty staging row holds, whatever the dtype: every 2-byte element reads 0x8000 (-0.0) and
every 4-byte one 0x80008000. Rows are pushed with those bit patterns replaced by +0.0 (-0.0 for 2-byte
types: the same number; the float32 denormal -4.6e-41: a change far below any rounding step of a sum
with a residual), so a sentinel element in a slot means "not arrived yet"."""


def init_lamport(buffer: torch.Tensor, data_bytes: int, world_size: int) -> None:
    """Ready a rank's buffer (uint8, `buffer_bytes` long) for the flag-free protocol: the staging slots
    full of sentinels, the epochs zero. Every rank before any rank's first call."""
    staging = staging_bytes(data_bytes, world_size)
    buffer[:staging].view(torch.int32).fill_(SENTINEL_WORD)
    buffer[staging:].zero_()


@triton.jit
def _sanitized(x, ITYPE: tl.constexpr, SENT: tl.constexpr):
    """x with every element whose bits are the sentinel's replaced by +0.0."""
    return tl.where(x.to(ITYPE, bitcast=True) == SENT, tl.zeros_like(x), x)


@triton.jit
def _base(r: tl.constexpr, b0, b1, b2, b3, b4, b5, b6, b7):
    """Rank r's buffer address, from the kernel's arguments (no load)."""
    if r == 0:
        base = b0
    elif r == 1:
        base = b1
    elif r == 2:
        base = b2
    elif r == 3:
        base = b3
    elif r == 4:
        base = b4
    elif r == 5:
        base = b5
    elif r == 6:
        base = b6
    else:
        base = b7
    return base.to(tl.int64)  # an unused argument's 0 arrives as an int32


def fits_rows(num_rows: int, hidden: int, dtype: torch.dtype, peers: PeerBuffers) -> bool:
    """Whether a message of [num_rows, hidden] `dtype` can go through the fused kernel with these
    buffers. Looks only at shape and dtype, which every rank shares: all ranks decide alike."""
    return (dtype in SUPPORTED_DTYPES and 0 < hidden <= MAX_HIDDEN
            and num_rows * hidden * dtype.itemsize <= peers.data_bytes)


def _sentinel_meta(dtype: torch.dtype) -> dict:
    """The flag-free kernels' integer view of `dtype` and its sentinel in that view."""
    wide = dtype.itemsize == 4
    return dict(ITYPE=tl.int32 if wide else tl.int16, SENT=SENTINEL_WORD if wide else -32768)  # 0x8000: -0.0


def check_pushable(rows: int, hidden: int, dtype: torch.dtype, peers: PeerBuffers, slot: int) -> None:
    """Raise unless a producer (kernels/gemv.py) can push [rows, hidden] `dtype` into staging slot
    `slot` of `peers` for a later `all_reduce_add_rms_norm(..., pushed=True)`."""
    if not peers.lamport or slot not in (0, 1) or len(peers.bases) != peers.world_size:
        raise ValueError(f"pushing takes the flag-free protocol, slot 0 or 1 and the ranks' base addresses "
                         f"(lamport {peers.lamport}, slot {slot!r}, {len(peers.bases)} bases)")
    if peers.world_size > MAX_WORLD or not fits_rows(rows, hidden, dtype, peers):
        raise ValueError(f"[{rows}, {hidden}] {dtype} over {peers.world_size} ranks does not fit the fused all-reduce "
                         f"({peers.data_bytes} staging bytes, at most {MAX_WORLD} ranks)")


def push_args(peers: PeerBuffers, slot: int, dtype: torch.dtype) -> tuple[tuple[int, ...], dict]:
    """A pushing producer's kernel arguments: (the 8 buffer addresses and the byte offset of this rank's
    region of `slot`), and its constexprs (PUSH, RANK, WORLD, ITYPE, SENT)."""
    bases = (*peers.bases, *([0] * (MAX_WORLD - len(peers.bases))))
    offset = (slot * peers.world_size + peers.rank) * peers.data_bytes
    return (*bases, offset), dict(PUSH=True, RANK=peers.rank, WORLD=peers.world_size, **_sentinel_meta(dtype))
