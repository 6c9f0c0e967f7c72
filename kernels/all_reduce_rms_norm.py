"""One-shot all-reduce fused with the residual add and RMSNorm, for tensor-parallel ranks that can
load and store each other's memory (torch symmetric memory over NVLink; shared memory in the CPU test).

A row-parallel layer (o_proj, down_proj) leaves each rank a partial sum; the next thing the model does
is the sum's residual add and RMSNorm. Unfused that is an all-reduce launch and a norm launch, with the
reduced rows written to memory and read back between them. Here it is one launch:

    rank r, program p (rows p, p + G, p + 2G, ...; G programs on every rank, the same rows everywhere):
      1. push       store its rows of x into region r of the staging slot of every peer's buffer
      2. barrier    signal program p of every peer ("my rows are in your buffer"); prefetch part of
                    the next matmul's weight into L2, if given (kernels/prefetch.py); wait for each
                    peer's signal
      3. reduce     s = x_0 + x_1 + ... (float32, in rank order: rank r's own rows from x, the others
                    from this rank's own buffer, where the peers pushed them), rounded to x's dtype as
                    an all-reduce's output would be; h = s + residual (the new residual);
                    out = weight * rmsnorm(h)
      4. barrier    (slot 2 only) signal again ("done reading my slot"), wait for each peer: when the
                    kernel ends, no peer will push into a slot that this rank still reads

The same launch also starts a forward pass (`embedding_all_reduce_rms_norm`, GATHER): with a
vocab-parallel embedding each rank's partial sums are the rows of its table slice for the ids it holds
and zeros for the others', so the kernel reads those rows itself (x is the table slice, row i that of
ids[i]) and norms the sum with no residual (HAS_RESIDUAL off): lookup, all-reduce and the first layer's
input norm in one launch (unfused: ~7 small torch ops for the masked lookup, then an all-reduce and a norm).

Pushing (remote stores, then one release) rather than pulling (local stores, a barrier, then remote
loads) takes one NVLink round trip out of the critical path: the loads of step 3 are local.

Staging slots: each buffer holds four (the flags protocol uses three), each a region of `data_bytes`
per source rank, then the flags and this rank's epoch counters.

    | slot 0: region 0 | region 1 | ... | slot 1: ... | slot 2: ... | slot 3: ... | flags | epochs |

Slot 2 (slot=None) is safe in any order of calls: its second barrier frees it before the kernel ends.
Slots 0 and 1 skip that barrier, which is sound when the caller never uses the same slot in two
consecutive calls. A rank pushes into a peer's slot again only after the barrier of a later call, which
that peer does not signal before its earlier kernels, and so its reads of that slot, have ended (a
stream runs its kernels in order). The model alternates them: 0 after attention, 1 after the MLP, so a
forward pass ends on 1 and the next begins on 0.

Every rank computes the same sums in the same order: ranks get bitwise identical outputs, as the
tensor-parallel design requires.

Barrier flags are epochs: program p of each rank counts the barriers it has taken (epochs[p], int64,
in its own buffer, read and written only by it). Its k-th signal stores k in flag[p * world_size + r] of
every peer (an exchange, release, system scope: its pushes before the flag); its k-th wait spins until
its own flag[p * world_size + s] >= k for every peer s (acquire, system scope). A peer can be at most
one barrier ahead (it needs this rank's signal to pass the next one), so ">=" never misses a signal,
nothing is ever reset, and the same flags serve every call and every CUDA graph replay. One thread of
the program signals and waits, after a CTA-wide barrier, and a second CTA-wide barrier orders every
thread's later loads after the wait.

Invariants for callers: every rank calls with the same shapes (and so the same grid), in the same
order; flags and epochs start zeroed on every rank before any rank's first call.

The flag-free protocol (the engine's default, `PeerBuffers.lamport`, `_lamport_kernel`) drops steps 2
and 4: the rows are their own flags, so no release fence waits for the pushes to be acknowledged and
no flag crosses NVLink after them (2 x H200, 512 KiB: 5.3 us a call against 6.4).

    every element of a slot that holds no pushed row is the sentinel (SENTINEL_WORD's bits); pushed
    rows never contain it (those bit patterns are pushed as +0.0)
    rank r, program p (one per row up to MAX_PROGRAMS; with slot None always MAX_PROGRAMS):
      1. push       store its rows of x into region r of the slot of every peer's buffer
      2. poll       load its own row and the residual row, then re-load (volatile) each peer's row from
                    its own slot until no element is the sentinel
      3. reduce     as above, then store the sentinel back where the peers' rows were

Slots: 0 and 1 as the caller passes them (the model's alternation, as for the flags), and for slot None
2 + (count of slot-None calls) % 2, where every program of the fixed grid counts every such call in
its epoch, so all agree. Only slot None reads a counter: with 0 / 1, and the ranks' buffer addresses
passed as arguments (`PeerBuffers.bases`), nothing is loaded before the push but the rows themselves.

Why a slot is empty again before a peer pushes into it: two consecutive calls never share a slot, so
the slot of call k is next used by a call m >= k + 2. A peer's call m starts after its call m - 1
ended, which needed this rank's call m - 1 pushes, which this rank makes after its call k (and its
emptying stores) ended. Every element is loaded and compared whole (2 or 4 bytes, written by one
store), so a row that is still arriving is never taken early.

Pushed by the matmul (`pushed=True`, slots 0 / 1): the row-parallel matmul that makes x stores its
finished tiles into region r of the slot of every peer itself (kernels/gemv.py, `push`), so step 1 is
skipped here. The argument above holds with "call m" starting at that matmul: it runs after this
rank's call m - 1 in stream order, and under PDL its stores come after its wait for the kernel before.

The buffers, the sentinel and the row helpers both protocols use are in kernels/peer_rows.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import prefetch
from kernels.kv_cache import SUPPORTED_DTYPES, check_last_dim_contiguous, next_pow2
from kernels.pdl import pdl_prologue, use_pdl
from kernels.peer_rows import SENTINEL_WORD, init_lamport  # noqa: F401 (this module's API: set-up and tests)
from kernels.peer_rows import (MAX_HIDDEN, MAX_WORLD, PeerBuffers, _add_norm_store, _base, _residual_row, _sanitized,
                               _sentinel_meta, _x_row, check_pushable, fits_rows, staging_bytes)
from kernels.prefetch import prefetch_rows
from kernels.rms_norm import _num_warps

MAX_PROGRAMS = 128
"""Programs per launch (rows beyond this are looped over): no more than an H100/H200 has SMs, so all
are resident together (a program waits only for its namesakes on other GPUs, never for another of its
own launch), and the flag area stays small."""


def flag_bytes(world_size: int) -> int:
    """The peers' flags, then this rank's epochs (int64)."""
    return MAX_PROGRAMS * (world_size + 1) * 8


def buffer_bytes(data_bytes: int, world_size: int) -> int:
    """Size of each rank's buffer: staging slots, then the flags and epochs (which must start zeroed)."""
    return staging_bytes(data_bytes, world_size) + flag_bytes(world_size)


@triton.jit
def _signal(ptrs, flag_offset, pid, epoch, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Signal `epoch` to program `pid` of every peer."""
    tl.debug_barrier()  # every thread's stores / loads so far come before the release below
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            flags = (tl.load(ptrs + peer) + flag_offset).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")


@triton.jit
def _wait(ptrs, flag_offset, pid, epoch, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Wait until every peer has signalled `epoch` (or later) to this program."""
    mine = (tl.load(ptrs + RANK) + flag_offset).to(tl.pointer_type(tl.int64))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            flag = mine + pid * WORLD + peer
            seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            while seen < epoch:
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # ... and every thread's later loads come after the acquire


@triton.jit
def _push_row(x, ptrs, slot_offset, region_bytes, offset, cols, mask, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Store row x (elements `offset` on, of this rank's region) into the slot at `slot_offset` of every
    peer's buffer. Buffers are 16-byte aligned, and so are their regions."""
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            region = tl.load(ptrs + peer) + slot_offset + RANK * region_bytes
            dst = tl.multiple_of(region.to(tl.pointer_type(x.dtype)), 16)
            tl.store(dst + offset + cols, x, mask=mask)


@triton.jit(do_not_specialize=["pf_rows", "pf_row_bytes", "pf_prefix_lines"])  # one build whatever the weight
def _all_reduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, ptrs,
    stride_x, stride_r, num_rows, hidden, slot_offset, region_bytes, flag_offset, epoch_offset, eps,
    ids_ptr, vocab_start, vocab_rows,  # GATHER: x is an embedding table slice, the rows are ids' (_x_row)
    pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines,  # the next matmul's weight (kernels/prefetch.py)
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, END_BARRIER: tl.constexpr, USE_PDL: tl.constexpr,
    GATHER: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PREFETCH: tl.constexpr, PF_CHUNK: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    my_base = tl.load(ptrs + RANK)
    epoch_ptr = (my_base + epoch_offset).to(tl.pointer_type(tl.int64)) + pid
    epoch = tl.load(epoch_ptr) + 1
    for row in range(pid, num_rows, num_programs):  # 1. push this program's rows to every peer
        x = _x_row(x_ptr, stride_x, row, ids_ptr, vocab_start, vocab_rows, cols, mask, GATHER)
        _push_row(x, ptrs, slot_offset, region_bytes, row * hidden, cols, mask, RANK, WORLD)
    _signal(ptrs, flag_offset, pid, epoch, RANK, WORLD)  # 2.
    if PREFETCH:  # while the peers' rows travel: the next matmul's weight into L2
        prefetch_rows(pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines, pid, num_programs, PF_CHUNK)
    _wait(ptrs, flag_offset, pid, epoch, RANK, WORLD)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):  # 3.
        offset = row * hidden  # < 2**31: the staging space is at most a few MiB
        r_in = _residual_row(residual_ptr, stride_r, row, cols, mask, HAS_RESIDUAL)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                part = _x_row(x_ptr, stride_x, row, ids_ptr, vocab_start, vocab_rows, cols, mask, GATHER)
            else:  # .cg: through L2, past this SM's L1 (a peer wrote these rows)
                src = tl.multiple_of((my_base + slot_offset + r * region_bytes).to(tl.pointer_type(dtype)), 16)
                part = tl.load(src + offset + cols, mask=mask, other=0.0, cache_modifier=".cg")
            acc += part.to(tl.float32)
        _add_norm_store(acc, r_in, w, out_ptr, residual_out_ptr, offset, cols, mask, hidden, eps, HAS_RESIDUAL)
    if END_BARRIER:
        epoch += 1
        _signal(ptrs, flag_offset, pid, epoch, RANK, WORLD)  # 4.
        _wait(ptrs, flag_offset, pid, epoch, RANK, WORLD)
    tl.store(epoch_ptr, epoch)  # read again only by this program's next launch (stream order)


@triton.jit(do_not_specialize=["pf_rows", "pf_row_bytes", "pf_prefix_lines"])
def _lamport_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    b0, b1, b2, b3, b4, b5, b6, b7,  # every rank's buffer address (rank r's is b<r>; the rest unused)
    stride_x, stride_r, num_rows, hidden, region_bytes, slot, epoch_offset, eps,
    ids_ptr, vocab_start, vocab_rows,
    pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, ITYPE: tl.constexpr, SENT: tl.constexpr,
    USE_PDL: tl.constexpr, GATHER: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PREFETCH: tl.constexpr,
    PF_CHUNK: tl.constexpr, COUNTED: tl.constexpr, PUSHED: tl.constexpr,
):
    """The flag-free protocol: push the (sanitized) rows into the slot of every peer; poll this rank's
    own slot until no element is a sentinel (the data is its own flag); sum, add, norm; then write the
    sentinel back where the peers' rows were. The slot is `slot` (0 or 1, the caller's alternation),
    or with COUNTED 2 + (this program's count of COUNTED calls) % 2, where every program of a grid of
    MAX_PROGRAMS counts every such call, so all agree. PUSHED: the matmul that made x pushed its rows
    already (kernels/gemv.py, `push`), so step 1 is skipped."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    my_base = _base(RANK, b0, b1, b2, b3, b4, b5, b6, b7)
    if COUNTED:
        epoch_ptr = (my_base + epoch_offset).to(tl.pointer_type(tl.int64)) + pid
        epoch = tl.load(epoch_ptr)
        slot = 2 + epoch % 2
    slot_offset = slot * WORLD * region_bytes
    if not PUSHED:  # 1. push (PUSHED: the matmul before did)
        for row in range(pid, num_rows, num_programs):
            x = _sanitized(_x_row(x_ptr, stride_x, row, ids_ptr, vocab_start, vocab_rows, cols, mask, GATHER),
                           ITYPE, SENT)
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    region = _base(peer, b0, b1, b2, b3, b4, b5, b6, b7) + slot_offset + RANK * region_bytes
                    dst = tl.multiple_of(region.to(tl.pointer_type(dtype)), 16)
                    tl.store(dst + row * hidden + cols, x, mask=mask)
    if PREFETCH:  # while the peers' rows travel: the next matmul's weight into L2
        prefetch_rows(pf_ptr, pf_rows, pf_row_bytes, pf_prefix_lines, pid, num_programs, PF_CHUNK)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    empty = tl.full([BLOCK], SENT, ITYPE).to(dtype, bitcast=True)
    for row in range(pid, num_rows, num_programs):  # 2. poll, reduce, norm
        offset = row * hidden
        # This rank's own row and the residual first: their loads overlap the wait for the peers.
        own = _sanitized(_x_row(x_ptr, stride_x, row, ids_ptr, vocab_start, vocab_rows, cols, mask, GATHER), ITYPE, SENT)
        r_in = _residual_row(residual_ptr, stride_r, row, cols, mask, HAS_RESIDUAL)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # in rank order: every rank sums alike
            if r == RANK:
                part = own
            else:
                src = tl.multiple_of((my_base + slot_offset + r * region_bytes).to(tl.pointer_type(dtype)), 16)
                part = tl.load(src + offset + cols, mask=mask, other=0.0, volatile=True)
                while tl.max((part.to(ITYPE, bitcast=True) == SENT).to(tl.int32), axis=0) > 0:
                    part = tl.load(src + offset + cols, mask=mask, other=0.0, volatile=True)
                tl.store(src + offset + cols, empty, mask=mask)  # 3. empty again for the slot's next call
            acc += part.to(tl.float32)
        _add_norm_store(acc, r_in, w, out_ptr, residual_out_ptr, offset, cols, mask, hidden, eps, HAS_RESIDUAL)
    if COUNTED:
        tl.store(epoch_ptr, epoch + 1)


def _check_peers(x: torch.Tensor, peers: PeerBuffers, rows: int, hidden: int, slot: int | None) -> None:
    if slot not in (None, 0, 1):
        raise ValueError(f"slot must be 0, 1 or None, not {slot!r}")
    if not fits_rows(rows, hidden, x.dtype, peers):
        raise ValueError(f"[{rows}, {hidden}] {x.dtype} does not fit the fused all-reduce "
                         f"({peers.data_bytes} staging bytes, hidden <= {MAX_HIDDEN}, dtypes {SUPPORTED_DTYPES})")
    if peers.data_bytes % 16:
        raise ValueError(f"data_bytes {peers.data_bytes} must be a multiple of 16")
    if peers.ptrs.shape != (peers.world_size,) or peers.ptrs.dtype != torch.int64 or peers.ptrs.device != x.device:
        raise ValueError(f"peer pointers must be int64 [{peers.world_size}] on {x.device}")
    if peers.lamport and (peers.world_size > MAX_WORLD or len(peers.bases) not in (0, peers.world_size)):
        raise ValueError(f"the flag-free protocol takes at most {MAX_WORLD} ranks and one base address per rank "
                         f"(world_size {peers.world_size}, {len(peers.bases)} bases)")


def _check_weight(weight: torch.Tensor, x: torch.Tensor, hidden: int) -> None:
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{hidden}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")


def all_reduce_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]: this rank's partial sums
    residual: torch.Tensor,  # [num_tokens, hidden], x's dtype
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    peers: PeerBuffers,
    slot: int | None = None,
    prefetch_weight: torch.Tensor | None = None,
    pushed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s + residual) * weight, s + residual) where s is the sum of every rank's x. Collective:
    every rank must call it with the same shapes and slot. `slot` 0 or 1, for callers that never pass
    the same slot twice in a row (see the module docstring): one barrier instead of two (flags), no
    counter read (flag-free); None: any order (slot 2 with two barriers; slots 2 / 3 by count). Inputs are not
    written; outputs are new contiguous tensors in x's dtype. `prefetch_weight`: the next matmul's
    weight, partly prefetched into L2 while the kernel waits for its peers (kernels/prefetch.py).
    `pushed`: the matmul that made x already pushed it into `slot` of every peer (kernels/gemv.py's
    `push`, with the same slot), so this launch only polls, sums and norms."""
    check_last_dim_contiguous("x", x, 2)
    check_last_dim_contiguous("residual", residual, 2)
    _check_peers(x, peers, *x.shape, slot)
    if pushed:
        check_pushable(*x.shape, x.dtype, peers, slot)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    _check_weight(weight, x, x.shape[1])
    return _launch(x, residual, weight, eps, peers, slot, prefetch_weight, x.shape[0], None, 0, pushed)


def embedding_all_reduce_rms_norm(
    input_ids: torch.Tensor,  # [num_tokens] int32 / int64
    table: torch.Tensor,  # [rows, hidden]: this rank's rows [vocab_start, vocab_start + rows) of the embedding
    vocab_start: int,
    weight: torch.Tensor,  # [hidden], the table's dtype
    eps: float,
    peers: PeerBuffers,
    prefetch_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(e) * weight, e) where e is the embedding of input_ids summed over the ranks' slices of a
    vocab-parallel table (each id's row from the rank that holds it, zeros elsewhere): the lookup, its
    all-reduce and the first layer's input norm in one launch. Collective like all_reduce_add_rms_norm
    (slot None); ids outside every rank's rows embed as zeros."""
    check_last_dim_contiguous("table", table, 2)
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.device != table.device:
        raise ValueError(f"input_ids must be int32 / int64 [num_tokens] on {table.device}, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype} on {input_ids.device}")
    hidden = table.shape[1]
    _check_peers(table, peers, input_ids.shape[0], hidden, None)
    _check_weight(weight, table, hidden)
    return _launch(table, None, weight, eps, peers, None, prefetch_weight, input_ids.shape[0], input_ids.contiguous(),
                   vocab_start)


def _launch(x, residual, weight, eps, peers, slot, prefetch_weight, num_rows, ids, vocab_start, pushed=False):
    """One launch of the fused kernel of `peers`' protocol: x's rows (ids None), else the rows of x (a
    table slice) that `ids` name; residual None: nothing added."""
    hidden = x.shape[1]
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out)
    if num_rows == 0:
        return out, new_residual
    block = next_pow2(hidden)
    pdl = use_pdl(x.device)
    flag_offset = staging_bytes(peers.data_bytes, peers.world_size)  # flags, then epochs (buffer_bytes)
    epoch_offset = flag_offset + MAX_PROGRAMS * peers.world_size * 8
    rows_args = (x.stride(0), x.stride(0) if residual is None else residual.stride(0), num_rows, hidden)
    gather_args = (x if ids is None else ids, vocab_start, x.shape[0])
    common = dict(RANK=peers.rank, WORLD=peers.world_size, BLOCK=block, num_warps=_num_warps(block), USE_PDL=pdl,
                  GATHER=ids is not None, HAS_RESIDUAL=residual is not None, PF_CHUNK=prefetch.CHUNK, launch_pdl=pdl)
    residual = x if residual is None else residual  # unread without HAS_RESIDUAL
    if peers.lamport:  # slot None: every program, every call (they count those calls to pick slot 2 or 3)
        programs = MAX_PROGRAMS if slot is None else min(num_rows, MAX_PROGRAMS)
        pf = prefetch.plan(prefetch_weight, programs, x)
        bases = peers.bases or tuple(peers.ptrs.tolist())
        _lamport_kernel[(programs,)](
            x, residual, weight, out, new_residual, *bases, *([0] * (MAX_WORLD - len(bases))), *rows_args,
            peers.data_bytes, 0 if slot is None else slot, epoch_offset, float(eps), *gather_args, *pf.args(),
            PREFETCH=pf.enabled, COUNTED=slot is None, PUSHED=pushed, **_sentinel_meta(x.dtype), **common)
        return out, new_residual
    num_programs = min(num_rows, MAX_PROGRAMS)
    pf = prefetch.plan(prefetch_weight, num_programs, x)
    _all_reduce_add_rms_norm_kernel[(num_programs,)](
        x, residual, weight, out, new_residual, peers.ptrs, *rows_args,
        (2 if slot is None else slot) * peers.world_size * peers.data_bytes, peers.data_bytes,
        flag_offset, epoch_offset, float(eps), *gather_args, *pf.args(),
        END_BARRIER=slot is None, PREFETCH=pf.enabled, **common)
    return out, new_residual
