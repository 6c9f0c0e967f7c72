"""The symmetric-memory all-reduce (gpu_workers/symm_all_reduce.py). On CPU: which messages take
which path (every rank must choose alike), the switch, TPGroup's fallback to NCCL/gloo, and a set-up
that ends alike on every rank whichever step fails on one (gloo ranks, faked steps). On a machine
with 2+ GPUs: real ranks (one process per GPU) against the sum of every rank's input, eagerly, back
to back, and inside a captured CUDA graph replayed with new inputs.

    python -m pytest -q tests/gpu_workers/test_symm_all_reduce.py      # GPU part: needs >= 2 GPUs
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from gpu_workers import distributed
from gpu_workers.distributed import TPGroup
from gpu_workers.symm_all_reduce import (Algorithm, SymmMemAllReduce, choose_algorithm, create_symm_all_reduce,
                                         pick_algorithm)
from ipc import envs

BF16, F32 = torch.bfloat16, torch.float32
HIDDEN = 4096  # Llama-3.1-8B: one decode all-reduce is [batch, 4096]


@pytest.mark.parametrize("batch, dtype, world_size, expected", [
    (1, BF16, 2, Algorithm.ONE_SHOT),       # 8 KiB
    (64, BF16, 2, Algorithm.ONE_SHOT),      # 512 KiB: two ranks always one-shot
    (1024, BF16, 2, Algorithm.ONE_SHOT),    # 8 MiB: the largest message taken
    (1025, BF16, 2, Algorithm.NCCL),        # above 8 MiB
    (63, BF16, 4, Algorithm.ONE_SHOT),      # 504 KiB
    (64, BF16, 4, Algorithm.TWO_SHOT),      # 512 KiB
    (256, BF16, 4, Algorithm.TWO_SHOT),     # 2 MiB
    (31, BF16, 8, Algorithm.ONE_SHOT),      # 248 KiB
    (32, BF16, 8, Algorithm.TWO_SHOT),      # 256 KiB
    (16, F32, 2, Algorithm.ONE_SHOT),
    (16, torch.float16, 2, Algorithm.NCCL),  # torch's kernels take bfloat16 and float32 only
    (16, BF16, 3, Algorithm.NCCL),          # no kernels specialized for 3 ranks
    (0, BF16, 2, Algorithm.NCCL),
])
def test_each_message_size_takes_the_path_of_its_world_size(batch, dtype, world_size, expected):
    nbytes = batch * HIDDEN * dtype.itemsize
    assert pick_algorithm(nbytes, dtype, world_size) is expected


def test_sizes_that_are_not_whole_16_byte_vectors_go_to_nccl():
    assert pick_algorithm(6, BF16, 2) is Algorithm.NCCL            # 3 elements
    assert pick_algorithm(1004 * 2, BF16, 2) is Algorithm.NCCL     # 1004 elements: 2008 bytes
    assert pick_algorithm(1024 * 2, BF16, 2) is Algorithm.ONE_SHOT


def test_cpu_tensors_never_take_the_symmetric_path():
    x = torch.zeros(64, HIDDEN, dtype=BF16)
    assert pick_algorithm(x.numel() * x.element_size(), x.dtype, 2) is Algorithm.ONE_SHOT  # on a GPU it would
    assert choose_algorithm(x, 2) is Algorithm.NCCL


@pytest.mark.parametrize("value, device, nnodes, on", [
    ("", "cuda", 1, True), ("1", "cuda", 1, True), ("0", "cuda", 1, False),
    ("", "cpu", 1, False), ("1", "cpu", 1, False), ("", "cuda", 2, False),
])
def test_the_switch_is_on_by_default_for_cuda_ranks_of_one_node_only(monkeypatch, value, device, nnodes, on):
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE", value)
    assert envs.custom_all_reduce(device, nnodes) is on


def test_the_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_CUSTOM_ALL_REDUCE must be 0 or 1"):
        envs.custom_all_reduce("cuda", 1)


@pytest.mark.parametrize("name, read, bad", [("PAGEDSERVE_FUSED_ALL_REDUCE", envs.fused_all_reduce, "on"),
                                             ("PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT", envs.fused_all_reduce_lamport, "yes")])
@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_the_fused_all_reduce_and_its_flag_free_protocol_are_on_unless_switched_off(monkeypatch, name, read, bad,
                                                                                   value, on):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert read() is on
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
        read()


class _FakeCustom:
    def __init__(self, result):
        self.result, self.calls = result, 0

    def all_reduce(self, x):
        self.calls += 1
        return self.result

    def add_rms_norm(self, x, residual, weight, eps, slot=None, prefetch=None, pushed=False):
        self.calls += 1
        self.prefetch, self.pushed = prefetch, pushed
        return self.result

    def matmul_push(self, rows, hidden, dtype, device, slot):
        return None

    def matmul_reduce(self, rows, hidden, dtype, device, slot):
        return None

    def embedding_rms_norm(self, input_ids, table, vocab_start, weight, eps, prefetch=None):
        self.calls += 1
        self.prefetch, self.vocab_start = prefetch, vocab_start
        return self.result


def test_tp_group_uses_the_custom_result_or_falls_back_to_the_collective(monkeypatch):
    reduced_in_place = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda x, group=None: reduced_in_place.append(x))
    x, summed = torch.ones(2, 8), torch.full((2, 8), 2.0)
    taken = _FakeCustom(summed)
    assert TPGroup(0, 2, None, taken).all_reduce(x) is summed and not reduced_in_place
    declined = _FakeCustom(None)
    assert TPGroup(0, 2, None, declined).all_reduce(x) is x and reduced_in_place == [x]
    assert taken.calls == declined.calls == 1
    assert TPGroup(0, 2).all_reduce(x) is x and len(reduced_in_place) == 2  # no custom path: NCCL / gloo


def test_an_rms_norm_after_a_row_parallel_layer_reduces_its_input_fused_or_apart(monkeypatch):
    """RMSNorm(partial=True) returns the fused result where the custom path takes it; otherwise it
    all-reduces x first and norms the sum (+ residual), as the unfused path always did."""
    from gpu_workers.models.layers import RMSNorm

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda x, group=None: x.mul_(2))  # two equal ranks
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    fused = (torch.zeros(3, 8), torch.ones(3, 8))
    previous = distributed.set_tp_group(TPGroup(0, 2, None, _FakeCustom(fused)))
    try:
        taken = RMSNorm(8)
        declined = RMSNorm(8)
        declined.tp = TPGroup(0, 2, None, _FakeCustom(None))
    finally:
        distributed.set_tp_group(previous)
    next_weight = torch.empty(16, 8)
    assert taken(x, residual, partial=True, slot=0, prefetch=next_weight) is fused
    assert taken.tp.custom_all_reduce.prefetch is next_weight  # handed to the fused kernel to prefetch
    out, new_residual = declined(x.clone(), residual, partial=True)
    reference = RMSNorm(8)
    expected_out, expected_residual = reference(2 * x, residual)
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(out, expected_out)


class _PushingCustom(_FakeCustom):
    """A symmetric path whose matmul_push takes slot 0 messages only."""

    def matmul_push(self, rows, hidden, dtype, device, slot):
        return ("peers", slot) if slot == 0 else None


def test_a_row_parallel_layer_pushes_where_the_norm_after_it_expects_a_push(monkeypatch):
    """The matmul and the fused norm after it ask the same question (matmul_push, same shape and slot):
    the layer computes through the pushing GEMV exactly where the norm then tells the kernel its input
    was pushed; elsewhere the layer's plain matmul and an unpushed call."""
    from gpu_workers.models.layers import RMSNorm
    from gpu_workers.models.parallel_layers import RowParallelLinear

    custom = _PushingCustom((torch.zeros(3, 8), torch.ones(3, 8)))
    previous = distributed.set_tp_group(TPGroup(0, 2, None, custom))
    try:
        layer, norm = RowParallelLinear(32, 8, reduce_results=False), RMSNorm(8)
    finally:
        distributed.set_tp_group(previous)
    layer.weight.data.normal_()
    pushes = []
    monkeypatch.setattr("kernels.gemv.row_parallel_gemv", lambda x, w, b=None, push=None: pushes.append(push) or x @ w.T)
    x = torch.randn(3, 16)
    for slot, expect_push in ((0, True), (1, False), (None, False)):
        layer.push_slot = slot
        out = layer(x)
        torch.testing.assert_close(out, x @ layer.weight.T)
        norm(out, torch.zeros(3, 8), partial=True, slot=slot)
        assert custom.pushed is expect_push, slot
    assert pushes == [("peers", 0)]
    with pytest.raises(ValueError, match="takes a residual"):
        norm(out, None, partial=True, slot=0)


class _ReducingCustom(_FakeCustom):
    """A symmetric path whose matmul_reduce takes slot 1 messages only."""

    def matmul_reduce(self, rows, hidden, dtype, device, slot):
        return ("peers", slot) if slot == 1 else None


def test_a_row_parallel_layer_reduces_its_own_rows_only_given_the_residual_and_where_taken(monkeypatch):
    """With the residual and where matmul_reduce takes the message, the layer returns Reduced(the
    matmul's sum + residual) from one reducing launch; otherwise its partial sums, as before."""
    from gpu_workers.models.parallel_layers import Reduced, RowParallelLinear

    custom = _ReducingCustom(None)
    previous = distributed.set_tp_group(TPGroup(0, 2, None, custom))
    try:
        layer = RowParallelLinear(32, 8, reduce_results=False)
    finally:
        distributed.set_tp_group(previous)
    layer.weight.data.normal_()
    launches = []
    monkeypatch.setattr("kernels.gemv.reduce_gemv",
                        lambda x, w, peers, slot, residual: launches.append((peers, slot)) or x @ w.T + residual)
    x, residual = torch.randn(3, 16), torch.randn(3, 8)
    for slot, residual_in, reduced in ((1, residual, True), (0, residual, False), (1, None, False)):
        layer.push_slot = slot
        out = layer(x, residual_in)
        assert isinstance(out, Reduced) is reduced, (slot, residual_in is None)
        torch.testing.assert_close(out.h if reduced else out, x @ layer.weight.T + (residual if reduced else 0))
    assert launches == [("peers", 1)]


def test_the_embedding_is_looked_up_reduced_and_normed_fused_or_apart(monkeypatch):
    """VocabParallelEmbedding.forward_norm returns the fused (norm, embedding) where the custom path
    takes it; otherwise it looks up this rank's rows, all-reduces and norms, as the first layer did."""
    from gpu_workers.models.layers import RMSNorm
    from gpu_workers.models.parallel_layers import VocabParallelEmbedding

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda x, group=None: x.mul_(2))  # rank 1 has the same
    fused = (torch.zeros(3, 8), torch.ones(3, 8))
    previous = distributed.set_tp_group(TPGroup(1, 2, None, _FakeCustom(fused)))
    try:
        taken, declined, norm = VocabParallelEmbedding(10, 8), VocabParallelEmbedding(10, 8), RMSNorm(8)
        declined.tp = TPGroup(1, 2, None, _FakeCustom(None))
    finally:
        distributed.set_tp_group(previous)
    for emb in (taken, declined):
        emb.weight.data.copy_(torch.randn(5, 8))
    ids, first_weight = torch.tensor([7, 2, 9]), torch.empty(16, 8)
    assert taken.forward_norm(ids, norm, first_weight) is fused
    assert taken.tp.custom_all_reduce.prefetch is first_weight and taken.tp.custom_all_reduce.vocab_start == 5
    out, embedded = declined.forward_norm(ids, norm, first_weight)
    expected = 2 * torch.stack([declined.weight[2], torch.zeros(8), declined.weight[4]])  # id 2 is rank 0's
    torch.testing.assert_close(embedded, expected)
    torch.testing.assert_close(out, norm(expected))


class _FakeComm:
    fused_peers = None

    def __init__(self, fails: bool):
        self.fails = fails

    def self_test(self):
        if self.fails:
            raise RuntimeError("one_shot of 2048 elements gave wrong sums")


def _agreement_rank(rank: int, world_size: int, store: str, results) -> None:
    """Set-up on gloo with its steps faked per rank: whatever one rank hits, all end alike."""
    from gpu_workers import symm_all_reduce as sar

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    cpu = torch.device("cpu")
    outcome = []
    for failing_step in ("checks", "allocate", "self-test", None):  # on rank 1 only
        fails = rank == 1
        allocated = []
        sar.why_unsupported = lambda *a: "no peer access" if fails and failing_step == "checks" else None

        def allocate(*args, **kwargs):
            allocated.append(True)
            if fails and failing_step == "allocate":
                raise RuntimeError("rendezvous failed")
            return _FakeComm(fails and failing_step == "self-test")

        sar.SymmMemAllReduce.allocate = allocate
        comm = sar.create_symm_all_reduce(dist.group.WORLD, rank, world_size, cpu, peers=range(world_size))
        outcome.append((failing_step, comm is not None, bool(allocated)))
    results.put((rank, outcome))
    dist.destroy_process_group()


def test_set_up_ends_alike_on_every_rank_whichever_step_fails_on_one(tmp_path):
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    _spawn(_agreement_rank, 2, str(tmp_path / "store"), extra=(results,), timeout_s=120)
    outcomes = dict(results.get() for _ in range(2))
    expected_on = {"checks": False, "allocate": False, "self-test": False, None: True}
    for rank in (0, 1):
        assert [(step, on) for step, on, _ in outcomes[rank]] == list(expected_on.items())
    # Rank 0's checks passed, yet it allocated nothing once rank 1's checks had failed.
    assert outcomes[0][0] == ("checks", False, False)


# ---------------------------------------------------------------- GPU: real ranks

SHAPES = [(1, HIDDEN), (3, HIDDEN), (64, HIDDEN), (256, HIDDEN), (1024, HIDDEN), (2048, HIDDEN), (5, 8), (3, 5)]
GRAPH_SHAPES = [(1, HIDDEN), (64, HIDDEN), (256, HIDDEN), (2048, HIDDEN)]  # 2048: 16 MiB, NCCL inside the graph


def _inputs(shape, dtype, step: int, world_size: int, device) -> list[torch.Tensor]:
    """Every rank's input of one step: each rank can compute all of them (and so the exact sum)."""
    gens = [torch.Generator(device=device).manual_seed(1000 * step + r) for r in range(world_size)]
    return [torch.randn(shape, generator=g, device=device).to(dtype) for g in gens]


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = xs[0].clone()
    for x in xs[1:]:  # rank order, as the kernels add
        acc = acc + x
    return acc


def _check(out: torch.Tensor, xs: list[torch.Tensor], what: str, same_order: bool = True) -> None:
    """`out` is the sum of `xs` and identical on every rank. The symmetric kernels add in rank order,
    as `_sum` does (equal but for rare double roundings of bfloat16); NCCL adds in its ring's order,
    compared with a float32 sum at a bfloat16 rounding per addend."""
    if same_order:
        tol = dict(rtol=2e-2, atol=2e-2) if out.dtype == BF16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, _sum(xs), **tol, msg=lambda m: f"{what}: {m}")
    else:
        ref = _sum([x.float() for x in xs])
        atol = len(xs) * 0.07 if out.dtype == BF16 else 1e-4
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=atol, msg=lambda m: f"{what}: {m}")
    _assert_same_on_every_rank(out, what)


def _assert_same_on_every_rank(t: torch.Tensor, what: str) -> None:
    gathered = torch.empty((dist.get_world_size(), *t.shape), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(gathered, t.contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what}: ranks got different results"


def _tp_all_reduce(comm: SymmMemAllReduce, x: torch.Tensor) -> torch.Tensor:
    out = comm.all_reduce(x)  # what TPGroup.all_reduce does
    if out is None:
        dist.all_reduce(x)
        out = x
    return out


def _fused_inputs(shape, dtype, step: int, world_size: int, device):
    xs = _inputs(shape, dtype, step, world_size, device)
    g = torch.Generator(device=device).manual_seed(10_000 + step)
    residual = (2 * torch.randn(shape, generator=g, device=device)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[1], generator=g, device=device)).to(dtype)
    return xs, residual, weight


def _check_fused(got, xs, residual, weight, what: str) -> None:
    """`got` = (RMSNorm(sum + residual) * weight, sum + residual), identical on every rank."""
    from tests.kernels.test_all_reduce_rms_norm import reference

    ref_out, ref_residual = reference([x.cpu() for x in xs], residual.cpu(), weight.cpu(), 1e-6)
    tol = dict(rtol=2e-2, atol=2e-2) if xs[0].dtype == BF16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].cpu(), ref_residual, **tol, msg=lambda m: f"{what} residual: {m}")
    torch.testing.assert_close(got[0].cpu(), ref_out, **tol, msg=lambda m: f"{what} out: {m}")
    for t in got:
        _assert_same_on_every_rank(t, what)


def _embed_call(comm: SymmMemAllReduce, rank: int, world_size: int, device, rows: int, dtype, step: int):
    """The fused embedding lookup + all-reduce + RMSNorm of `rows` ids, with what to check it against:
    (got, (each rank's lookup, a zero residual, the weight))."""
    from tests.kernels.test_all_reduce_rms_norm import _embed_inputs, _embed_partials

    ids, tables, weight = _embed_inputs(step, rows, HIDDEN, dtype, world_size)
    got = comm.embedding_rms_norm(ids.to(device), tables[rank].to(device), rank * tables[0].shape[0],
                                  weight.to(device), 1e-6)
    return got, ([p.to(device) for p in _embed_partials(ids, tables)], torch.zeros(rows, HIDDEN, dtype=dtype,
                                                                                    device=device), weight.to(device))


def _fused_checks(comm: SymmMemAllReduce, rank: int, world_size: int, device) -> None:
    """The fused all-reduce + add + RMSNorm on every message one-shot takes (and only those), then
    back to back with the plain kernels, without waiting in between, its one-barrier slots 0 and 1
    alternating as the model uses them."""
    for d, dtype in enumerate((BF16, F32)):
        for i, shape in enumerate(SHAPES):
            xs, residual, weight = _fused_inputs(shape, dtype, 500 + 100 * d + i, world_size, device)
            got = comm.add_rms_norm(xs[rank], residual, weight, 1e-6)
            assert (got is None) == (comm.route(xs[rank]) is not Algorithm.ONE_SHOT), (shape, dtype)
            if got is not None:
                _check_fused(got, xs, residual, weight, f"fused {shape} {dtype}")
        for rows in (1, 64, 4096):  # the last is a prefill's: too large for the fused kernel
            got, (xs, residual, weight) = _embed_call(comm, rank, world_size, device, rows, dtype, 600 + rows)
            assert (got is None) == (comm.route(xs[rank]) is not Algorithm.ONE_SHOT), (rows, dtype)
            if got is not None:
                _check_fused(got, xs, residual, weight, f"fused embedding of {rows} ids, {dtype}")
    outs, fused_calls = [], 0
    next_weight = torch.randn(4096, 2048, dtype=BF16, device=device)  # prefetched by every other call: no effect
    for i in range(40):
        shape = [(1, HIDDEN), (64, HIDDEN), (8, HIDDEN), (200, HIDDEN)][i % 4]
        inputs = _fused_inputs(shape, BF16, 700 + i, world_size, device)
        xs, residual, weight = inputs
        if comm.route(xs[rank]) is Algorithm.ONE_SHOT:
            slot = None if i == 39 else fused_calls % 2  # the last with two barriers: the graph's starts on 0
            outs.append((comm.add_rms_norm(xs[rank], residual, weight, 1e-6, slot, next_weight if i % 2 else None),
                         inputs))
            fused_calls += 1
        outs.append(((comm.one_shot if i % 2 else comm.two_shot)(xs[rank]), inputs))
        if i % 5 == 4:  # the embedding's (any slot order: it takes slot None with flags)
            outs.append(_embed_call(comm, rank, world_size, device, 32, BF16, 800 + i))
    for i, (got, (xs, residual, weight)) in enumerate(outs):
        if isinstance(got, tuple):
            _check_fused(got, xs, residual, weight, f"back-to-back fused call {i}")
        else:
            _check(got, xs, f"back-to-back plain call {i}")


def _row_parallel_inputs(rows: int, step: int, world_size: int, device, seed: int):
    """(every rank's activations, every rank's weight slice, the residual, the norm weight, every rank's
    partial sums) of one row-parallel matmul [rows, 512] x [512, HIDDEN] per rank."""
    from kernels.gemv import row_parallel_gemv

    k = 512
    g = torch.Generator(device=device).manual_seed(seed + step)
    xs = [torch.randn(rows, k, generator=g, device=device).to(BF16) for _ in range(world_size)]
    ws = [(torch.randn(HIDDEN, k, generator=g, device=device) * k ** -0.5).to(BF16) for _ in range(world_size)]
    _, residual, weight = _fused_inputs((rows, HIDDEN), BF16, seed + 10_000 + step, world_size, device)
    partials = [row_parallel_gemv(x, w) for x, w in zip(xs, ws)]  # every rank's matmul
    return xs, ws, residual, weight, partials


def _matmul_calls(call, inputs, check, what: str) -> None:
    """24 calls back to back at decode row counts, alternating slots 0 / 1, one in three with call's
    other path (`call(xs, ws, residual, weight, slot, main_path)`); then both slots' calls in one CUDA
    graph, replayed with new inputs. `check(got, partials, residual, weight, what)` each result."""
    outs = []
    for i in range(24):
        case = inputs((1, 17, 64, 5, 40, 24)[i % 6], i)
        outs.append((call(*case[:4], i % 2, i % 3 != 2), case))
    for i, (got, (_, _, residual, weight, partials)) in enumerate(outs):
        check(got, partials, residual, weight, f"{what} call {i}")
    static = list(inputs(64, 100)[:4])
    graph = torch.cuda.CUDAGraph()
    call(*static, 0, True), call(*static, 1, True)  # warm-up (compiles) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        graph_outs = [call(*static, slot, True) for slot in (0, 1)]
    for replay in range(4):
        xs, ws, residual, weight, partials = inputs(64, 200 + replay)
        for t, new in zip(static, (xs, ws)):
            for old_t, new_t in zip(t, new):
                old_t.copy_(new_t)
        static[2].copy_(residual), static[3].copy_(weight)
        graph.replay()
        for slot in (0, 1):
            check(graph_outs[slot], partials, residual, weight, f"graph replay {replay} {what}, slot {slot}")
    torch.cuda.synchronize()


def _pushed_checks(comm: SymmMemAllReduce, rank: int, world_size: int, device) -> None:
    """Row-parallel matmuls that push their partial sums themselves (kernels/gemv.py) and the fused
    all-reduce that then only polls, as the model alternates them: eagerly back to back, mixed with
    unpushed calls, then in a CUDA graph replayed with new inputs. Every rank's sums must be those of
    all ranks' matmuls, identical everywhere."""
    from kernels.gemv import row_parallel_gemv

    def call(xs, ws, residual, weight, slot, push):
        target = comm.matmul_push(xs[rank].shape[0], HIDDEN, BF16, device, slot) if push else None
        assert (target is not None) == push, "matmul_push declined a decode-sized bf16 message"
        y = row_parallel_gemv(xs[rank], ws[rank], push=target)
        return comm.add_rms_norm(y, residual, weight, 1e-6, slot, pushed=push)

    assert comm.matmul_push(65, HIDDEN, BF16, device, 0) is None  # over the GEMV's 64 rows
    assert comm.matmul_push(8, HIDDEN, BF16, device, None) is None  # slot None counts its calls: never pushed
    with pytest.raises(ValueError, match="not one matmul_push takes"):
        comm.add_rms_norm(torch.zeros(65, HIDDEN, dtype=BF16, device=device), torch.zeros(65, HIDDEN, dtype=BF16,
                          device=device), torch.ones(HIDDEN, dtype=BF16, device=device), 1e-6, 0, pushed=True)
    _matmul_calls(call, lambda rows, step: _row_parallel_inputs(rows, step, world_size, device, 20_000),
                  _check_fused, "pushed")


def _reduced_checks(comm: SymmMemAllReduce, rank: int, world_size: int, device) -> None:
    """Row-parallel matmuls that all-reduce their own rows in their epilogue and add the residual
    (kernels.gemv.reduce_gemv), as the model alternates them with pushed calls to the fused kernel:
    eagerly back to back at decode row counts, then in a CUDA graph replayed with new inputs. Every rank
    gets the residual stream of the unfused path, identical everywhere."""
    from kernels.gemv import reduce_gemv, row_parallel_gemv
    from tests.kernels.test_all_reduce_rms_norm import reference

    def call(xs, ws, residual, weight, slot, reduce):
        if not reduce:  # the pushed path, in the same slot alternation
            target = comm.matmul_push(xs[rank].shape[0], HIDDEN, BF16, device, slot)
            return comm.add_rms_norm(row_parallel_gemv(xs[rank], ws[rank], push=target), residual, weight, 1e-6,
                                     slot, pushed=True)[1]
        target = comm.matmul_reduce(xs[rank].shape[0], HIDDEN, BF16, device, slot)
        assert target is not None, "matmul_reduce declined a decode-sized bf16 message"
        return reduce_gemv(xs[rank], ws[rank], *target, residual)

    def check(h, partials, residual, weight, what):
        _, ref_h = reference([p.cpu() for p in partials], residual.cpu(), weight.cpu(), 1e-6)
        torch.testing.assert_close(h.cpu(), ref_h, rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")
        _assert_same_on_every_rank(h, what)

    assert comm.matmul_reduce(65, HIDDEN, BF16, device, 0) is None  # over the GEMV's 64 rows
    assert comm.matmul_reduce(8, HIDDEN, BF16, device, None) is None  # slot None counts its calls
    _matmul_calls(call, lambda rows, step: _row_parallel_inputs(rows, step, world_size, device, 40_000),
                  check, "reduced")


def _eager_checks(comm: SymmMemAllReduce, rank: int, world_size: int, device) -> None:
    """Every shape and dtype through the routed path and both kernels forced; a non-contiguous input;
    then calls back to back without waiting, reusing the buffer behind queued kernels."""
    for d, dtype in enumerate((BF16, F32)):
        for i, shape in enumerate(SHAPES):
            xs = _inputs(shape, dtype, 100 * d + i, world_size, device)
            x = xs[rank].clone()
            route = comm.route(x)
            _check(_tp_all_reduce(comm, x.clone()), xs, f"{route.value} {shape} {dtype}",
                   same_order=route is not Algorithm.NCCL)
            if route is not Algorithm.NCCL:
                _check(comm.one_shot(x), xs, f"one-shot {shape} {dtype}")
                _check(comm.two_shot(x), xs, f"two-shot {shape} {dtype}")
                assert torch.equal(x, xs[rank]), "the input was modified"
    xs = [t.t() for t in _inputs((HIDDEN, 8), BF16, 300, world_size, device)]
    _check(comm.one_shot(xs[rank]), xs, "one-shot of a transposed input")
    outs, expected = [], []
    for i in range(60):
        xs = _inputs([(1, HIDDEN), (64, HIDDEN), (8, HIDDEN)][i % 3], BF16, 400 + i, world_size, device)
        outs.append((comm.one_shot if i % 2 else comm.two_shot)(xs[rank]))
        expected.append(xs)
    for i, (out, xs) in enumerate(zip(outs, expected)):
        _check(out, xs, f"back-to-back call {i}")


def _graph_checks(comm: SymmMemAllReduce, rank: int, world_size: int, device) -> None:
    """One CUDA graph of several all-reduces (symmetric and NCCL), replayed with new inputs, with
    eager calls in between that reuse the same buffer."""
    static = [torch.zeros(shape, dtype=BF16, device=device) for shape in GRAPH_SHAPES]
    fused_in = [torch.zeros((8, HIDDEN), dtype=BF16, device=device) for _ in range(2)]  # x, residual
    weight = torch.zeros(HIDDEN, dtype=BF16, device=device)
    fused_on = comm.fused_peers is not None and comm.route(fused_in[0]) is Algorithm.ONE_SHOT

    # the embedding's lookup + all-reduce + norm first, as a forward pass starts: fixed tables, new ids
    from tests.kernels.test_all_reduce_rms_norm import _embed_inputs, _embed_partials

    _, tables, emb_weight = _embed_inputs(1400, 8, HIDDEN, BF16, world_size)
    emb_table, emb_ids = tables[rank].to(device), torch.zeros(8, dtype=torch.int64, device=device)
    emb_weight = emb_weight.to(device)

    def forward():  # the fused calls take slots 0, then 1 (a replay ends on 1, the next starts on 0)
        fused = [comm.embedding_rms_norm(emb_ids, emb_table, rank * emb_table.shape[0], emb_weight, 1e-6)] + [
            comm.add_rms_norm(fused_in[0], fused_in[1], weight, 1e-6, slot, static[0] if slot else None)
            for slot in (0, 1)] if fused_on else []
        return [_tp_all_reduce(comm, x.clone()) for x in static] + [comm.two_shot(static[1])] + fused

    forward()  # warm-up: NCCL's first call outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = forward()
    for replay in range(5):
        inputs = [_inputs(shape, BF16, 1000 + 10 * replay + j, world_size, device)
                  for j, shape in enumerate(GRAPH_SHAPES)]
        for x, xs in zip(static, inputs):
            x.copy_(xs[rank])
        if fused_on:
            xs_f, residual, w = _fused_inputs((8, HIDDEN), BF16, 1500 + replay, world_size, device)
            fused_in[0].copy_(xs_f[rank]), fused_in[1].copy_(residual), weight.copy_(w)
            ids = torch.randint(0, len(tables) * tables[0].shape[0], (8,), generator=torch.Generator().manual_seed(replay))
            emb_ids.copy_(ids)
        graph.replay()
        if fused_on:
            _check_fused(graph_outs[-3], [p.to(device) for p in _embed_partials(ids, tables)],
                         torch.zeros(8, HIDDEN, dtype=BF16, device=device), emb_weight,
                         f"graph replay {replay} fused embedding")
            for slot in (0, 1):
                _check_fused(graph_outs[-2 + slot], xs_f, residual, w, f"graph replay {replay} fused, slot {slot}")
        for out, xs in zip(graph_outs, inputs + [inputs[1]]):
            _check(out, xs, f"graph replay {replay} {tuple(out.shape)}",
                   same_order=comm.route(xs[0]) is not Algorithm.NCCL)
        eager = _inputs((64, HIDDEN), BF16, 2000 + replay, world_size, device)
        _check(comm.one_shot(eager[rank]), eager, f"eager call after replay {replay}")
    torch.cuda.synchronize()


def _rank_main(rank: int, world_size: int, store: str) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    envs.pin_collectives_to_loopback()  # as the engine's ranks do
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            device_id=device)
    comm = create_symm_all_reduce(dist.group.WORLD, rank, world_size, device, peers=range(world_size))
    assert comm is not None, "set-up failed (the warning above says why)"
    assert comm.fused_peers is not None, "the fused all-reduce + RMSNorm was not set up"
    assert comm.fused_peers.lamport == envs.fused_all_reduce_lamport()
    _eager_checks(comm, rank, world_size, device)
    _fused_checks(comm, rank, world_size, device)
    _graph_checks(comm, rank, world_size, device)
    if comm.fused_peers.lamport and torch.cuda.get_device_capability(device)[0] >= 9:  # pushing: PDL, flag-free
        _pushed_checks(comm, rank, world_size, device)
        with pytest.MonkeyPatch.context() as mp:  # every decode row count, not only where it is the default
            mp.setenv("PAGEDSERVE_REDUCE_IN_MATMUL", "1")
            _reduced_checks(comm, rank, world_size, device)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(fn, world_size: int, store: str, extra: tuple = (), timeout_s: float = 300) -> None:
    """Run fn(rank, world_size, store, *extra) on world_size processes; fails (and kills them) if they
    have not ended in time."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world_size, store, *extra), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):  # raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks still running after {timeout_s:.0f} s: a hang in a collective")


@pytest.mark.gpu
@pytest.mark.parametrize("world_size, lamport", [(2, "1"), (4, "1"), (2, "0")])
def test_symmetric_all_reduce_sums_like_every_rank_expects_eagerly_and_in_cuda_graphs(
        tmp_path, monkeypatch, world_size, lamport):
    """lamport: the fused kernel's protocol, flag-free (the default) or with flags (the A/B baseline)."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, has {torch.cuda.device_count()}")
    # Children inherit these: NVLink multicast stays off (it can take a shared host's GPUs down).
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.setenv(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    monkeypatch.setenv("PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT", lamport)
    _spawn(_rank_main, world_size, str(tmp_path / "store"))
