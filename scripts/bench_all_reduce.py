"""Microbenchmarks of the tensor-parallel all-reduce over real GPUs, each rank a spawned process (run
through scripts/gpu_tp_check.py's --all-reduce-bench and --matmul-reduce-bench):

- `all_reduce_bench`: one bf16 all-reduce per message size and path (NCCL, one-shot, two-shot), and as
  [tokens, 4096] rows, one-shot then RMSNorm against the fused kernel;
- `matmul_reduce_bench`: a Llama-8B TP=2 rank's row-parallel matmul, its all-reduce and the RMSNorm
  after it, down each path the engine can take.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path


def _init_rank(rank: int, world_size: int, store: str):
    """(device, symmetric all-reduce) of a benchmark rank, its process group set up as the engine's ranks do."""
    import torch
    import torch.distributed as dist

    from gpu_workers.symm_all_reduce import create_symm_all_reduce
    from ipc import envs

    envs.pin_collectives_to_loopback()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            device_id=device)
    return device, create_symm_all_reduce(dist.group.WORLD, rank, world_size, device, peers=range(world_size))


def _bench_rank(rank: int, world_size: int, store: str, sizes: list[int], results) -> None:
    import torch
    import torch.distributed as dist

    from bench_common import time_us  # one CUDA graph of back-to-back calls, us per call
    from gpu_workers.symm_all_reduce import pick_algorithm
    from kernels.rms_norm import rms_norm

    device, comm = _init_rank(rank, world_size, store)
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
        row = {"bytes": nbytes, "routed": pick_algorithm(nbytes, x.dtype, world_size).value,
               "nccl_us": time_us(lambda _: dist.all_reduce(x), 100, device)}
        if comm is not None and nbytes <= comm.max_bytes:
            row["one_shot_us"] = time_us(lambda _: comm.one_shot(x), 100, device)
            row["two_shot_us"] = time_us(lambda _: comm.two_shot(x), 100, device)
            rows_x = x.view(-1, 4096) if x.numel() % 4096 == 0 else x.view(1, -1)  # [tokens, hidden]
            residual, weight = torch.randn_like(rows_x), torch.ones(rows_x.shape[1], device=device).to(x.dtype)
            if comm.add_rms_norm(rows_x, residual, weight, 1e-6) is not None:
                row["one_shot_then_norm_us"] = time_us(
                    lambda _: rms_norm(comm.one_shot(rows_x), weight, 1e-6, residual), 100, device)
                row["fused_us"] = time_us(lambda _: comm.add_rms_norm(rows_x, residual, weight, 1e-6), 100, device)
                calls = itertools.count()  # slots 0 and 1 alternating over the warm-up, the capture and replays
                row["fused_slots_us"] = time_us(
                    lambda _: comm.add_rms_norm(rows_x, residual, weight, 1e-6, next(calls) % 2), 100, device)
        rows.append(row)
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


MATMUL_SHAPES = {"o_proj": (4096, 2048), "down_proj": (4096, 7168)}  # a Llama-8B TP=2 rank's (N, K)
MATMUL_ROWS = [1, 16, 32, 64]


def _matmul_bench_rank(rank: int, world_size: int, store: str, _sizes, results) -> None:
    """us per row-parallel matmul + all-reduce + RMSNorm (Llama-8B TP=2 slices, weights rotating past L2)
    down each path: cuBLAS then the fused kernel, the pushing GEMV then the polling fused kernel (the
    engine's default), reduce_gemv then a plain RMSNorm."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from bench_common import rotating_weights, time_us
    from kernels.gemv import reduce_gemv, row_parallel_gemv
    from kernels.rms_norm import rms_norm

    os.environ["PAGEDSERVE_REDUCE_IN_MATMUL"] = "1"  # every row count, as the A/B's "=1" runs
    device, comm = _init_rank(rank, world_size, store)
    calls, rows_out = itertools.count(), []  # slots 0 and 1 alternate over every call, as in the model
    for proj, (n, k) in MATMUL_SHAPES.items():
        weights = rotating_weights(n, k, 64, device, torch.bfloat16)
        copies = len(weights)
        nw = torch.ones(n, device=device, dtype=torch.bfloat16)
        for rows in MATMUL_ROWS:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            residual = torch.randn(rows, n, device=device, dtype=torch.bfloat16)

            def unfused(i):
                return comm.add_rms_norm(F.linear(x, weights[i % copies]), residual, nw, 1e-6, next(calls) % 2)

            def pushed(i):
                slot = next(calls) % 2
                y = row_parallel_gemv(x, weights[i % copies], push=comm.matmul_push(rows, n, x.dtype, device, slot))
                return comm.add_rms_norm(y, residual, nw, 1e-6, slot, pushed=True)

            def reduced(i):
                target = comm.matmul_reduce(rows, n, x.dtype, device, next(calls) % 2)
                return rms_norm(reduce_gemv(x, weights[i % copies], *target, residual), nw, 1e-6)

            row = {"proj": proj, "rows": rows}
            for name, fn in (("cublas_fused_us", unfused), ("push_poll_us", pushed), ("reduce_norm_us", reduced)):
                row[name] = time_us(fn, 48, device)
            rows_out.append(row)
    if rank == 0:
        results.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def _spawn_bench(target, world_size: int, workdir: Path, sizes, timeout_s: float):
    """Run target(rank, world_size, store, sizes, results) on world_size processes; rank 0's results."""
    import tempfile

    import torch.multiprocessing as mp

    workdir.mkdir(parents=True, exist_ok=True)
    store = os.path.join(tempfile.mkdtemp(dir=workdir), "store")
    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(target, args=(world_size, store, sizes, results), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):  # raises with a rank's traceback if one failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"{target.__name__} still running after {timeout_s} s")
    return results.get()


def matmul_reduce_bench(world_size: int, workdir: Path, timeout_s: float = 240) -> list[dict]:
    rows = _spawn_bench(_matmul_bench_rank, world_size, workdir, None, timeout_s)
    print(f"\nrow-parallel matmul + all-reduce + RMSNorm over {world_size} GPUs, us per call (48 in one CUDA graph):")
    print(f"{'matmul':>10}{'rows':>6}{'cublas+fused':>14}{'push+poll':>11}{'reduce+norm':>13}")
    for r in rows:
        print(f"{r['proj']:>10}{r['rows']:>6}{r['cublas_fused_us']:>14.2f}{r['push_poll_us']:>11.2f}"
              f"{r['reduce_norm_us']:>13.2f}")
    print(flush=True)
    return rows


def all_reduce_bench(world_size: int, workdir: Path, timeout_s: float = 240) -> list[dict]:
    """us per bf16 all-reduce over `world_size` GPUs, 8 KiB to 16 MiB: NCCL, one-shot, two-shot; and as
    [tokens, 4096] rows, one-shot then RMSNorm against the fused kernel (two barriers; slots 0/1: one)."""
    sizes = [8 << 10, 32 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20]
    rows = _spawn_bench(_bench_rank, world_size, workdir, sizes, timeout_s)
    print(f"\nbf16 all-reduce over {world_size} GPUs, us per call (100 calls in one CUDA graph):")
    print(f"{'bytes':>10}{'routed':>10}{'nccl':>10}{'one_shot':>10}{'two_shot':>10}{'1shot+norm':>12}{'fused':>10}"
          f"{'fused 0/1':>10}")
    for r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in ("nccl_us", "one_shot_us", "two_shot_us",
                                                              "one_shot_then_norm_us", "fused_us", "fused_slots_us")]
        print(f"{r['bytes']:>10}{r['routed']:>10}" + "".join(f"{c:>10}" for c in cells[:3])
              + "".join(f"{c:>12}" for c in cells[3:4]) + "".join(f"{c:>10}" for c in cells[4:]))
    print(flush=True)
    return rows
