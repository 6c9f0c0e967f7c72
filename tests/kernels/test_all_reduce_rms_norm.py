"""The fused all-reduce + residual add + RMSNorm kernel against a torch reference.

On the CPU the ranks are real processes running the kernel in Triton's interpreter, their buffers
POSIX shared memory that every process maps (as symmetric memory maps peers' GPU buffers): the
barrier protocol runs between processes for real, calls back to back reuse its flags, and a rank
that never arrives is a test failure by timeout, not a hang. On GPUs the same checks run through
the engine's symmetric-memory set-up in tests/gpu_workers/test_symm_all_reduce.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from multiprocessing import shared_memory

import pytest
import torch

from kernels import all_reduce_rms_norm as fused
from tests.triton_env import INTERPRET

# The ranks here share CPU memory, which only the interpreter can run kernels on; on a CUDA machine the
# same protocol runs over real peer GPU memory in tests/gpu_workers/test_symm_all_reduce.py.
cpu_ranks = pytest.mark.skipif(not INTERPRET, reason="CPU ranks under the interpreter; the GPU run is "
                               "tests/gpu_workers/test_symm_all_reduce.py")

EMBED = "embed"
CALLS = [(5, 64, torch.float32, None), (3, 200, torch.bfloat16, 0), (3, 200, torch.bfloat16, 1),
         (4, 64, torch.bfloat16, EMBED), (1, 64, torch.float32, 0), (5, 64, torch.float16, None),
         (5, 64, torch.float16, 1), (5, 64, torch.float32, 0), (2, 64, torch.float32, 1), (5, 64, torch.float32, EMBED)]
"""(rows, hidden, dtype, slot) of the calls each rank makes back to back: slots 0 and 1 (one barrier)
never twice in a row, slot None (two barriers) anywhere; 5 rows over 2 programs loops. EMBED: an
embedding lookup in a vocab-parallel table, then the all-reduce and the norm (slot None, no residual)."""
VOCAB = 11  # the EMBED calls' vocabulary, split over the ranks (the last rank's slice padded with zero rows)
DATA_BYTES = 4096
EPS = 1e-6


def _inputs(call: int, rows: int, hidden: int, dtype: torch.dtype, world_size: int):
    """Every rank's partial sums, the residual and the weight of one call (each rank can build all).
    Some partial sums are -0.0, and in float32 some are the bits of the flag-free protocol's sentinel."""
    g = torch.Generator().manual_seed(call)
    xs = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world_size)]
    for x in xs:
        x.view(-1)[::7] = -0.0
        if dtype == torch.float32:
            x.view(-1)[3::11] = torch.tensor([fused.SENTINEL_WORD], dtype=torch.int32).view(torch.float32)
    residual = (2 * torch.randn(rows, hidden, generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return xs, residual, weight


def _embed_inputs(call: int, rows: int, hidden: int, dtype: torch.dtype, world_size: int):
    """(ids, every rank's table slice, the weight) of an EMBED call; the ids name rows of every
    rank, repeat some, and one is past the vocabulary (a zero row of the last slice). The table has
    -0.0 entries, and in float32 the sentinel's bits."""
    g = torch.Generator().manual_seed(call)
    per_rank = -(-VOCAB // world_size)
    table = torch.randn(per_rank * world_size, hidden, generator=g).to(dtype)
    table[VOCAB:] = 0
    table.view(-1)[::5] = -0.0
    if dtype == torch.float32:
        table.view(-1)[2::9] = torch.tensor([fused.SENTINEL_WORD], dtype=torch.int32).view(torch.float32)
    ids = torch.randint(0, VOCAB, (rows,), generator=g)
    ids[0] = per_rank * world_size - 1  # past VOCAB when the slices are padded
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return ids, list(table.split(per_rank)), weight


def _embed_partials(ids, tables):
    """What each rank's lookup contributes: its rows for its ids, zeros for the others'."""
    per_rank = tables[0].shape[0]
    partials = []
    for rank, table in enumerate(tables):
        local = ids - rank * per_rank
        inside = (local >= 0) & (local < per_rank)
        partials.append(torch.where(inside[:, None], table[local.clamp(0, per_rank - 1)], torch.zeros(())).to(table.dtype))
    return partials


def reference(xs, residual, weight, eps):
    """The unfused path: all-reduce (rank order, float32, rounded to the dtype), then add + RMSNorm."""
    dtype = xs[0].dtype
    acc = torch.zeros(xs[0].shape)
    for x in xs:
        acc += x.float()
    h = (acc.to(dtype).float() + residual.float()).to(dtype)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (normed.float() * weight.float()).to(dtype), h


def _check(out, new_residual, xs, residual, weight, what):
    ref_out, ref_residual = reference(xs, residual, weight, EPS)
    # The interpreter casts float32 -> bfloat16 by truncation where torch rounds: 1 ulp apart at most.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[xs[0].dtype]
    torch.testing.assert_close(new_residual, ref_residual, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _rank_main(rank: int, world_size: int, names: list[str], max_programs: int, results, lamport: bool = False) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from kernels import all_reduce_rms_norm as kernel  # noqa: F811 - imported under the interpreter

    kernel.MAX_PROGRAMS = max_programs
    segments = [shared_memory.SharedMemory(name=n) for n in names]
    buffers = [torch.frombuffer(s.buf, dtype=torch.uint8) for s in segments]
    bases = tuple(b.data_ptr() for b in buffers)
    peers = kernel.PeerBuffers(torch.tensor(bases, dtype=torch.int64), rank, world_size, DATA_BYTES, lamport, bases)
    outs = []
    for call, (rows, hidden, dtype, slot) in enumerate(CALLS):
        if slot == EMBED:
            ids, tables, weight = _embed_inputs(call, rows, hidden, dtype, world_size)
            table = tables[rank].clone()
            out, new_residual = kernel.embedding_all_reduce_rms_norm(ids, table, rank * table.shape[0], weight, EPS,
                                                                     peers)
            assert torch.equal(table, tables[rank]), "the table was modified"
            xs, residual = _embed_partials(ids, tables), torch.zeros(rows, hidden, dtype=dtype)
        else:
            xs, residual, weight = _inputs(call, rows, hidden, dtype, world_size)
            x = xs[rank].clone()
            out, new_residual = kernel.all_reduce_add_rms_norm(x, residual, weight, EPS, peers, slot)
            assert torch.equal(x, xs[rank]), "the input was modified"
        _check(out, new_residual, xs, residual, weight, f"rank {rank} call {call}")
        outs.append((out.float().numpy(), new_residual.float().numpy()))  # by value: the rank exits
    staging = kernel.staging_bytes(DATA_BYTES, world_size)
    flags = buffers[rank][staging:].view(torch.int64)
    emptied = bool((buffers[rank][:staging].view(torch.int32) == kernel.SENTINEL_WORD).all())
    results.put((rank, outs, flags[:max_programs * (world_size + 1)].tolist(), emptied))
    del buffers, flags
    for s in segments:
        s.close()


def _run_ranks(world_size: int, max_programs: int, lamport: bool, target=None) -> dict:
    """Start one process per rank over shared-memory buffers (zeroed, or readied for the flag-free
    protocol), running `target` (_rank_main), and collect what each got."""
    ctx = mp.get_context("spawn")
    size = fused.buffer_bytes(DATA_BYTES, world_size)
    segments = [shared_memory.SharedMemory(create=True, size=size) for _ in range(world_size)]
    results = ctx.Queue()
    procs = []
    try:
        for s in segments:
            buffer = torch.frombuffer(s.buf, dtype=torch.uint8)
            if lamport:
                fused.init_lamport(buffer, DATA_BYTES, world_size)
            else:
                buffer.zero_()  # the flags must start zeroed
            del buffer
        names = [s.name for s in segments]
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, names, max_programs, results, lamport))
                 if target is None else ctx.Process(target=target, args=(r, world_size, names, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got = _collect(results, procs, timeout_s=240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for s in segments:
            s.close()
            s.unlink()
    for rank in range(1, world_size):
        for (out, res), (out0, res0) in zip(got[rank][0], got[0][0]):
            assert (out == out0).all() and (res == res0).all(), "ranks got different results"
    return got


def _collect(results, procs, timeout_s: float) -> dict:
    """Each rank's result; fails as soon as a rank died, or when one is still stuck (in a barrier) at the deadline."""
    got, deadline = {}, time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            rank, *rest = results.get(timeout=1)
            got[rank] = rest
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            assert not dead, f"rank(s) {dead} failed (traceback above)"
            assert time.monotonic() < deadline, f"ranks {sorted(set(range(len(procs))) - set(got))} never finished"
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


@cpu_ranks
@pytest.mark.parametrize("world_size, max_programs", [(2, 2), (3, 1)])
def test_ranks_in_separate_processes_get_the_same_fused_sums(world_size, max_programs):
    got = _run_ranks(world_size, max_programs, lamport=False)
    # Each program counted its barriers (2 for slot None, 1 for slots 0/1, in the calls it took part
    # in), and every peer's last signal to it carries that same count.
    for p in range(max_programs):
        barriers = sum(1 if slot in (0, 1) else 2 for rows, _, _, slot in CALLS if p < min(rows, max_programs))
        for rank, (_, flags, _) in got.items():
            epochs, signals = flags[max_programs * world_size:], flags[:max_programs * world_size]
            assert epochs[p] == barriers, f"rank {rank} program {p}: {epochs[p]} barriers, expected {barriers}"
            assert [signals[p * world_size + s] for s in range(world_size) if s != rank] == [barriers] * (world_size - 1)


@cpu_ranks
@pytest.mark.parametrize("world_size, max_programs", [(2, 2), (3, 1)])
def test_the_flag_free_protocol_gets_the_same_sums_and_leaves_its_slots_empty(world_size, max_programs):
    """Sentinel-polling ranks: the same sums (-0.0 and sentinel-patterned inputs included), every program
    counted every call of slot None (only those), and every row a peer pushed was read and emptied again."""
    got = _run_ranks(world_size, max_programs, lamport=True)
    counted = sum(1 for *_, slot in CALLS if slot not in (0, 1))  # slot None and EMBED: slots 2 / 3 by count
    for rank, (_, flags, emptied) in got.items():
        assert flags[max_programs * world_size:] == [counted] * max_programs, f"rank {rank}: epochs {flags}"
        assert emptied, f"rank {rank}: a staging slot still holds pushed rows"


@cpu_ranks
def test_one_rank_reduces_to_add_and_norm(monkeypatch):
    """world_size 1: no peer to push to or wait for; the result is the plain add + RMSNorm."""
    buffer = torch.zeros(fused.buffer_bytes(DATA_BYTES, 1), dtype=torch.uint8)
    peers = fused.PeerBuffers(torch.tensor([buffer.data_ptr()], dtype=torch.int64), 0, 1, DATA_BYTES)
    monkeypatch.setattr(fused, "MAX_PROGRAMS", 2)
    xs, residual, weight = _inputs(7, 5, 96, torch.float32, 1)
    out, new_residual = fused.all_reduce_add_rms_norm(xs[0], residual, weight, EPS, peers)
    _check(out, new_residual, xs, residual, weight, "one rank")


def test_messages_that_do_not_fit_are_refused_alike_on_every_rank():
    peers = fused.PeerBuffers(torch.zeros(2, dtype=torch.int64), 0, 2, DATA_BYTES)
    assert fused.fits_rows(8, 64, torch.float32, peers)  # 2048 bytes
    assert not fused.fits_rows(8, 256, torch.float32, peers)  # 8 KiB > DATA_BYTES
    assert not fused.fits_rows(8, 64, torch.int32, peers)
    with pytest.raises(ValueError, match="slot must be 0, 1 or None"):
        fused.all_reduce_add_rms_norm(torch.zeros(8, 64), torch.zeros(8, 64), torch.ones(64), EPS, peers, 2)
    with pytest.raises(ValueError, match="does not fit the fused all-reduce"):
        fused.all_reduce_add_rms_norm(torch.zeros(8, 256), torch.zeros(8, 256), torch.ones(256), EPS, peers)


PUSH_CALLS = [(5, 200, 96, torch.float32, 0, True), (5, 200, 96, torch.float32, 1, False),
              (40, 48, 64, torch.float16, 0, True), (3, 200, 300, torch.float16, 1, True),
              (3, 200, 300, torch.float16, None, False), (1, 64, 40, torch.float32, 0, True),
              (20, 96, 300, torch.float16, 1, True)]
"""(rows, N, K, dtype, slot, pushed) of a row-parallel matmul on each rank (kernels/gemv.py) and the fused
all-reduce of its partial sums after it: pushed from the matmul's epilogue (`push`) or by the all-reduce
itself, mixed back to back in one slot alternation; N not a multiple of the 32-column tile, K not of
the 128-wide K tile, 40 rows in a 64-row tile, 1 row."""


def _matmul_inputs(call: int, rows: int, n: int, k: int, dtype: torch.dtype, world_size: int):
    """Every rank's activations and weight slice, the residual and the norm weight of one PUSH_CALLS call.
    Some weights are zero, so some partial sums are exactly 0.0 (a sentinel-adjacent bit pattern)."""
    g = torch.Generator().manual_seed(100 + call)
    xs = [torch.randn(rows, k, generator=g).to(dtype) for _ in range(world_size)]
    ws = [(torch.randn(n, k, generator=g) * k ** -0.5).to(dtype) for _ in range(world_size)]
    for w in ws:
        w[::5] = 0
    residual = (2 * torch.randn(rows, n, generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)
    return xs, ws, residual, weight


def _attach_lamport_ranks(kernel, rank: int, world_size: int, names: list[str]):
    """In a rank's process: map every rank's shared-memory buffer, as the flag-free protocol's peers
    (segments, buffers, PeerBuffers), with the fused kernel's grid shrunk to 2 programs."""
    kernel.MAX_PROGRAMS = 2
    segments = [shared_memory.SharedMemory(name=n) for n in names]
    buffers = [torch.frombuffer(s.buf, dtype=torch.uint8) for s in segments]
    bases = tuple(b.data_ptr() for b in buffers)
    return segments, buffers, kernel.PeerBuffers(torch.tensor(bases, dtype=torch.int64), rank, world_size,
                                                 DATA_BYTES, True, bases)


def _slots_empty(buffer: torch.Tensor, data_bytes: int, world_size: int) -> bool:
    """Whether every staging slot of a rank's buffer holds only the sentinel again."""
    staging = fused.staging_bytes(data_bytes, world_size)
    return bool((buffer[:staging].view(torch.int32) == fused.SENTINEL_WORD).all())


def _report_and_detach(kernel, rank: int, world_size: int, outs, segments, buffers, results) -> None:
    """Hand this rank's outputs, and whether its staging slots are all empty again, to the parent; unmap."""
    results.put((rank, outs, [], _slots_empty(buffers[rank], DATA_BYTES, world_size)))
    buffers.clear()
    for s in segments:
        s.close()


def _push_rank_main(rank: int, world_size: int, names: list[str], results) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from kernels import all_reduce_rms_norm as kernel  # noqa: F811 - imported under the interpreter
    from kernels.gemv import row_parallel_gemv

    segments, buffers, peers = _attach_lamport_ranks(kernel, rank, world_size, names)
    outs = []
    for call, (rows, n, k, dtype, slot, pushed) in enumerate(PUSH_CALLS):
        xs, ws, residual, weight = _matmul_inputs(call, rows, n, k, dtype, world_size)
        # what every rank's matmul makes: the same kernel and tile, so the same bits
        partials = [row_parallel_gemv(x, w) for x, w in zip(xs, ws)]
        y = row_parallel_gemv(xs[rank], ws[rank], push=(peers, slot) if pushed else None)
        assert torch.equal(y, partials[rank]), f"call {call}: the pushing matmul's own output differs from the plain one"
        out, new_residual = kernel.all_reduce_add_rms_norm(y, residual, weight, EPS, peers, slot, pushed=pushed)
        _check(out, new_residual, partials, residual, weight, f"rank {rank} call {call}")
        outs.append((out.float().numpy(), new_residual.float().numpy()))
    _report_and_detach(kernel, rank, world_size, outs, segments, buffers, results)


@cpu_ranks
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_matmul_that_pushes_its_rows_leaves_the_all_reduce_the_same_sums(world_size):
    """The row-parallel matmul stores its partial sums into the peers' staging slot itself and the
    fused all-reduce only polls: the same sums as the unfused path, every rank alike, slots empty after."""
    got = _run_ranks(world_size, 2, lamport=True, target=_push_rank_main)
    for rank, (_, _, emptied) in got.items():
        assert emptied, f"rank {rank}: a staging slot still holds pushed rows"


def test_pushing_is_refused_where_the_all_reduce_could_not_take_it():
    from kernels.gemv import gemv

    bases = (0, 0)
    lamport = fused.PeerBuffers(torch.zeros(2, dtype=torch.int64), 0, 2, DATA_BYTES, True, bases)
    x, w = torch.zeros(4, 32), torch.zeros(64, 32)
    with pytest.raises(ValueError, match="flag-free protocol, slot 0 or 1"):
        gemv(x, w, push=(lamport, None))
    with pytest.raises(ValueError, match="flag-free protocol, slot 0 or 1"):
        gemv(x, w, push=(lamport._replace(lamport=False), 0))
    with pytest.raises(ValueError, match="does not fit"):
        gemv(torch.zeros(40, 32), w, push=(lamport, 0))  # 40 x 64 float32 > DATA_BYTES
    with pytest.raises(ValueError, match="no bias"):
        gemv(x, w, torch.zeros(64), push=(lamport, 0))
    with pytest.raises(ValueError, match="flag-free protocol, slot 0 or 1"):
        fused.all_reduce_add_rms_norm(torch.zeros(4, 64), torch.zeros(4, 64), torch.ones(64), EPS,
                                      lamport, None, pushed=True)


REDUCE_CALLS = [(5, 200, 96, torch.float32, 0, "reduce"), (5, 200, 96, torch.float32, 1, "reduce"),
                (40, 48, 64, torch.float16, 0, "reduce"), (3, 200, 300, torch.float16, 1, "push"),
                (1, 64, 40, torch.float32, 0, "reduce"), (20, 96, 300, torch.bfloat16, 1, "reduce")]
"""(rows, N, K, dtype, slot, how) of a row-parallel matmul on each rank and the reduction of its partial
sums: in the matmul's own epilogue (`reduce_gemv`) or pushed to the fused all-reduce kernel, back to
back in one slot alternation; N not a multiple of the 32-column tile, 40 rows in a 64-row tile, 1 row."""


def _reduce_rank_main(rank: int, world_size: int, names: list[str], results) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from kernels import all_reduce_rms_norm as kernel  # noqa: F811 - imported under the interpreter
    from kernels.gemv import reduce_gemv, row_parallel_gemv

    segments, buffers, peers = _attach_lamport_ranks(kernel, rank, world_size, names)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    outs = []
    for call, (rows, n, k, dtype, slot, how) in enumerate(REDUCE_CALLS):
        xs, ws, residual, weight = _matmul_inputs(call, rows, n, k, dtype, world_size)
        partials = [row_parallel_gemv(x, w) for x, w in zip(xs, ws)]  # what every rank's matmul makes
        ref_out, ref_h = reference(partials, residual, weight, EPS)
        if how == "push":
            y = row_parallel_gemv(xs[rank], ws[rank], push=(peers, slot))
            out, h = kernel.all_reduce_add_rms_norm(y, residual, weight, EPS, peers, slot, pushed=True)
            outs.append((out.float().numpy(), h.float().numpy()))
            continue
        h = reduce_gemv(xs[rank], ws[rank], peers, slot, residual)
        torch.testing.assert_close(h, ref_h, rtol=tol[dtype], atol=tol[dtype], msg=lambda m: f"rank {rank} call {call}: {m}")
        outs.append((h.float().numpy(), h.float().numpy()))
    _report_and_detach(kernel, rank, world_size, outs, segments, buffers, results)


@cpu_ranks
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_matmul_that_reduces_its_own_rows_gets_the_sums_of_the_all_reduce(world_size):
    """The row-parallel matmul all-reduces its tiles in its epilogue and adds the residual: the new
    residual stream of the unfused path, every rank bitwise alike (checked by _run_ranks), the slots
    empty after, mixed back to back with pushed calls to the fused all-reduce."""
    got = _run_ranks(world_size, 2, lamport=True, target=_reduce_rank_main)
    for rank, (_, _, emptied) in got.items():
        assert emptied, f"rank {rank}: a staging slot still holds pushed rows"


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="a Hopper GPU (the reducing matmul runs under PDL)")
def test_two_ranks_sharing_one_gpu_reduce_their_rows_on_two_streams():
    """reduce_gemv's epilogue on real GPU memory (volatile polls, the sentinel written back) with one GPU:
    two ranks' launches on two streams, few enough column tiles that both grids are resident at once.
    Each gets the unfused path's residual stream, both bitwise alike, and every slot is empty after."""
    from kernels.gemv import reduce_gemv, row_parallel_gemv

    device, world = torch.device("cuda"), 2
    data_bytes = 64 * 1024 * 4
    buffers = [torch.empty(fused.buffer_bytes(data_bytes, world), dtype=torch.uint8, device=device)
               for _ in range(world)]
    for b in buffers:
        fused.init_lamport(b, data_bytes, world)
    bases = tuple(b.data_ptr() for b in buffers)
    peers = [fused.PeerBuffers(torch.tensor(bases, device=device), r, world, data_bytes, True, bases)
             for r in range(world)]
    streams = [torch.cuda.Stream(device) for _ in range(world)]
    calls = [(1, 256, 2048, torch.bfloat16, 0), (16, 256, 7168, torch.bfloat16, 1), (40, 200, 2048, torch.float16, 0),
             (64, 256, 4096, torch.bfloat16, 1), (7, 96, 512, torch.float32, 0), (64, 256, 2048, torch.bfloat16, 1)]
    for call, (rows, n, k, dtype, slot) in enumerate(calls):
        xs, ws, residual, _ = _matmul_inputs(call, rows, n, k, dtype, world)
        xs, ws, residual = [x.to(device) for x in xs], [w.to(device) for w in ws], residual.to(device)
        partials = [row_parallel_gemv(x, w).cpu() for x, w in zip(xs, ws)]  # every rank's own matmul
        # Each rank's launch alone first, its peer's tile already in place (zeros): Triton compiles and
        # loads each rank's kernel here, since loading a module while the other rank's grid spins on
        # the GPU would wait for that grid, which waits for this one.
        for r in range(world):
            peer = 1 - r
            buffers[r][(slot * world + peer) * data_bytes:][:rows * n * dtype.itemsize].zero_()
            reduce_gemv(xs[r], ws[r], peers[r], slot, residual)
            torch.cuda.synchronize()
            fused.init_lamport(buffers[peer], data_bytes, world)  # what rank r pushed to it
        hs = []
        for r in range(world):
            with torch.cuda.stream(streams[r]):
                hs.append(reduce_gemv(xs[r], ws[r], peers[r], slot, residual))  # reduce_config's launch: 3-8 tiles
        torch.cuda.synchronize()
        ref_h = reference(partials, residual.cpu(), torch.ones(n, dtype=dtype), EPS)[1]
        tol = 1e-5 if dtype is torch.float32 else 2e-2
        torch.testing.assert_close(hs[0].cpu(), ref_h, rtol=tol, atol=tol, msg=lambda m: f"call {call}: {m}")
        assert torch.equal(hs[0], hs[1]), f"call {call}: the ranks' sums differ"
        for r, b in enumerate(buffers):
            assert _slots_empty(b, data_bytes, world), f"call {call}: rank {r}'s slots still hold rows"
