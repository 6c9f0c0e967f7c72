"""One-shot all-reduce fused with the residual add and RMSNorm, for tensor-parallel ranks that can
load and store each other's memory (torch symmetric memory over NVLink; shared memory in the CPU test).

A row-parallel layer (o_proj, down_proj) leaves each rank a partial sum; the next thing the model does
is the sum's residual add and RMSNorm. Unfused that is an all-reduce launch and a norm launch, with the
reduced rows written to memory and read back between them. Here it is one launch:

    rank r, program p (rows p, p + G, p + 2G, ...; G programs on every rank, the same rows everywhere):
      1. stage      copy its rows of x into a staging slot of rank r's peer buffer
      2. barrier    signal program p of every peer ("my rows are there"), wait for each peer's signal
      3. reduce     s = slot_0 + slot_1 + ... (float32, read from every peer, in rank order), rounded
                    to x's dtype as an all-reduce's output would be; h = s + residual (the new
                    residual); out = weight * rmsnorm(h)
      4. barrier    (slot 2 only) signal again ("done reading your rows"), wait for each peer: when
                    the kernel ends, no peer still reads this rank's slot

Staging slots: each buffer holds three, `data_bytes` each, then the flags.

    | slot 0 | slot 1 | slot 2 | flags |

Slot 2 (slot=None) is safe in any order of calls: its second barrier frees it before the kernel ends.
Slots 0 and 1 skip that barrier, which is sound when the caller never uses the same slot in two
consecutive calls. A rank stages into a slot again only after the barrier of a later call, which no
peer signals before its earlier kernels, and so its reads of that slot, have ended (a stream runs its
kernels in order). The model alternates them: 0 after attention, 1 after the MLP, so a forward pass
ends on 1 and the next begins on 0.

Every rank computes the same sums in the same order: ranks get bitwise identical outputs, as the
tensor-parallel design requires.

Barrier flags: each peer buffer holds, after its staging slots, an int32 flag per (program, source rank): flag[p * world_size + s] of rank r is set by rank s's program p. A signal is
a compare-and-swap 0 -> 1 (retried while the slot still holds the previous signal, i.e. the peer is a
barrier behind), a wait a compare-and-swap 1 -> 0: flags return to zero after every barrier, so the
same slots serve every call and every CUDA graph replay with nothing reset from the host. Signals are
release and waits acquire, at system scope (the peers are other GPUs), after a CTA-wide barrier: the
program's stores (step 1), or its loads (step 3), are ordered before the peer sees the flag.

Invariants for callers: every rank calls with the same shapes (and so the same grid), in the same
order; flags start zeroed on every rank before any rank's first call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.kv_cache import SUPPORTED_DTYPES, check_last_dim_contiguous, next_pow2
from kernels.pdl import pdl_prologue, use_pdl
from kernels.rms_norm import _num_warps

MAX_PROGRAMS = 128
"""Programs per launch (rows beyond this are looped over): no more than an H100/H200 has SMs, so all
are resident together (a program waits only for its namesakes on other GPUs, never for another of its
own launch), and the flag area stays small."""
MAX_HIDDEN = 16384  # one row per loop iteration in registers


class PeerBuffers(NamedTuple):
    """The buffers of all ranks, as this process addresses them."""

    ptrs: torch.Tensor
    """int64 [world_size] on the kernel's device: the base address of each rank's buffer."""
    rank: int
    world_size: int
    data_bytes: int
    """Bytes of each of the 3 staging slots at the start of each buffer (a multiple of 16); the flags
    follow them."""


NUM_SLOTS = 3  # 0 and 1 alternate without a second barrier; 2 (slot=None) has one


def flag_bytes(world_size: int) -> int:
    return MAX_PROGRAMS * world_size * 4


def buffer_bytes(data_bytes: int, world_size: int) -> int:
    """Size of each rank's buffer: staging slots, then the barrier flags (which must start zeroed)."""
    return NUM_SLOTS * data_bytes + flag_bytes(world_size)


@triton.jit
def _barrier(ptrs, flag_offset, pid, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Signal program `pid` of every peer, then wait until each has signalled this program."""
    tl.debug_barrier()  # every thread's stores / loads so far come before the release below
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            flags = (tl.load(ptrs + peer) + flag_offset).to(tl.pointer_type(tl.int32))
            slot = flags + pid * WORLD + RANK
            old = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
            while old != 0:  # the peer has not yet taken the previous barrier's signal
                old = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
    mine = (tl.load(ptrs + RANK) + flag_offset).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            slot = mine + pid * WORLD + peer
            old = tl.atomic_cas(slot, 1, 0, sem="acquire", scope="sys")
            while old != 1:
                old = tl.atomic_cas(slot, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # ... and every thread's later loads come after the acquire


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, ptrs,
    stride_x, stride_r, num_rows, hidden, slot_offset, flag_offset, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, END_BARRIER: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    # buffers are 16-byte aligned, and so are their slots
    staging = tl.multiple_of((tl.load(ptrs + RANK) + slot_offset).to(tl.pointer_type(dtype)), 16)
    for row in range(pid, num_rows, num_programs):  # 1. stage this program's rows
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask)
        tl.store(staging + row * hidden + cols, x, mask=mask)
    _barrier(ptrs, flag_offset, pid, RANK, WORLD)  # 2.
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):  # 3.
        offset = row * hidden  # < 2**31: the staging space is at most a few MiB
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            buf = tl.multiple_of((tl.load(ptrs + r) + slot_offset).to(tl.pointer_type(dtype)), 16)
            acc += tl.load(buf + offset + cols, mask=mask, other=0.0).to(tl.float32)
        reduced = acc.to(dtype).to(tl.float32)  # what an all-reduce would have returned
        r_in = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (reduced + r_in).to(dtype)
        tl.store(residual_out_ptr + offset + cols, h, mask=mask)
        hf = h.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
        normed = (hf * inv_rms).to(dtype).to(tl.float32)  # rounded before scaling, like kernels.rms_norm
        tl.store(out_ptr + offset + cols, (normed * w).to(dtype), mask=mask)
    if END_BARRIER:
        _barrier(ptrs, flag_offset, pid, RANK, WORLD)  # 4.


def fits(x: torch.Tensor, peers: PeerBuffers) -> bool:
    """Whether `x` [num_tokens, hidden] can go through the fused kernel with these buffers. Looks only
    at shape and dtype, which every rank shares: all ranks decide alike."""
    return (x.dim() == 2 and x.dtype in SUPPORTED_DTYPES and 0 < x.shape[1] <= MAX_HIDDEN
            and x.numel() * x.element_size() <= peers.data_bytes)


def all_reduce_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]: this rank's partial sums
    residual: torch.Tensor,  # [num_tokens, hidden], x's dtype
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    peers: PeerBuffers,
    slot: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s + residual) * weight, s + residual) where s is the sum of every rank's x. Collective:
    every rank must call it with the same shapes and slot. `slot` 0 or 1: one barrier instead of two,
    for callers that never pass the same slot twice in a row (see the module docstring); None: slot 2,
    any order. Inputs are not written; outputs are new contiguous tensors in x's dtype."""
    if slot not in (None, 0, 1):
        raise ValueError(f"slot must be 0, 1 or None, not {slot!r}")
    check_last_dim_contiguous("x", x, 2)
    check_last_dim_contiguous("residual", residual, 2)
    if not fits(x, peers):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit the fused all-reduce "
                         f"({peers.data_bytes} staging bytes, hidden <= {MAX_HIDDEN}, dtypes {SUPPORTED_DTYPES})")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{x.shape[1]}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if peers.data_bytes % 16:
        raise ValueError(f"data_bytes {peers.data_bytes} must be a multiple of 16")
    if peers.ptrs.shape != (peers.world_size,) or peers.ptrs.dtype != torch.int64 or peers.ptrs.device != x.device:
        raise ValueError(f"peer pointers must be int64 [{peers.world_size}] on {x.device}")
    num_rows, hidden = x.shape
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out)
    if num_rows == 0:
        return out, new_residual
    block = next_pow2(hidden)
    pdl = use_pdl(x.device)
    _all_reduce_add_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
        x, residual, weight, out, new_residual, peers.ptrs,
        x.stride(0), residual.stride(0), num_rows, hidden, (2 if slot is None else slot) * peers.data_bytes,
        NUM_SLOTS * peers.data_bytes, float(eps),
        RANK=peers.rank, WORLD=peers.world_size, BLOCK=block, END_BARRIER=slot is None, num_warps=_num_warps(block),
        USE_PDL=pdl, launch_pdl=pdl,
    )
    return out, new_residual
