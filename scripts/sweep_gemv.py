"""Sweep kernels/gemv.py's explicit configs (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K) at decode rows on
the row-parallel projections of a Llama-3.1-8B tensor-parallel rank (o_proj, down_proj), against cuBLAS.

    python scripts/sweep_gemv.py --rows 64 32 --tp 2            # CUDA, bf16
    python scripts/sweep_gemv.py --gated --rows 64 --tp 2 1     # gate_up + SiLU-and-mul in one launch
    python scripts/sweep_gemv.py --reduce --rows 1 16 32 64 --tp 2   # the matmul + all-reduce + norm paths
Prints us per (RMSNorm, matmul) pair in a CUDA graph over rotating weights (bench_common.time_us), best first.
With --reduce, one GPU times a row-parallel matmul, its all-reduce and the RMSNorm after it as one rank
of world size 1 (no peer to wait for: the local cost of each path, not the NVLink latency): cuBLAS then
the fused all-reduce + RMSNorm, the pushing GEMV then the polling fused kernel (the engine's TP path),
and reduce_gemv then a plain RMSNorm.
With --gated the projection is gate_up_proj and every timing includes the activation: cuBLAS then
kernels/activation.py's silu_and_mul, against the GEMV's gated launch (`gemv(..., gated=True)`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402
from bench_gemm import shapes  # noqa: E402  (a Llama-8B rank's projections, as bench_gemm times them)
from kernels import gemv as gemv_kernel  # noqa: E402
from kernels import rms_norm  # noqa: E402
from kernels.activation import silu_and_mul  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64])
    p.add_argument("--tp", type=int, nargs="+", default=[2])
    p.add_argument("--iters", type=int, default=48)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--projections", nargs="+", default=["o_proj", "down_proj"])
    p.add_argument("--narrow", action="store_true", help="only the configs around session 15's winners")
    p.add_argument("--configs", default=None, help="only these, e.g. '32,128,4,6,1;64,128,4,6,2'")
    p.add_argument("--block-m", type=int, nargs="+", default=[0], help="dot tile rows to try (0: from the rows)")
    p.add_argument("--gated", action="store_true", help="gate_up_proj with its SiLU-and-mul (see above)")
    p.add_argument("--reduce", action="store_true", help="the three all-reduce paths at world size 1 (see above)")
    args = p.parse_args()
    if args.reduce:
        return sweep_reduce(args)
    gated = args.gated
    if gated:
        args.projections = ["gate_up_proj"]
    act = silu_and_mul if gated else (lambda y: y)
    device, dtype = torch.device("cuda"), torch.bfloat16
    configs = [(bn, bk, 8 if bn * bk >= 64 * 256 else 4, st, sk)
               for bn, bk, st, sk in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 6), (1, 2, 4))
               if (64 * bk + bn * bk) * 2 * st <= 200 * 1024]
    if args.narrow:
        configs = [c for c in configs if c[1] in (128, 256) and c[3] in (4, 6) and c[4] in (1, 2)]
    else:
        configs = [c for c in configs if c[0] > 16]
    if args.configs:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    configs = [(c, bm) for c in configs for bm in args.block_m]
    for tp in args.tp:
        for proj in args.projections:
            n, k = shapes(tp)[proj]
            weights = bc.rotating_weights(n, k, args.iters, device, dtype)
            copies = len(weights)
            for rows in args.rows:
                x = torch.randn(rows, k, device=device, dtype=dtype)
                nw = torch.ones(k, device=device, dtype=dtype)
                norm_us = bc.time_us(lambda i: rms_norm(x, nw, 1e-6), args.iters, device)
                cublas = bc.time_us(lambda i: act(F.linear(rms_norm(x, nw, 1e-6), weights[i % copies])), args.iters,
                                    device)
                ref = act(F.linear(x, weights[0])).float()
                results = []
                for cfg, bm in configs:
                    if bm and bm < rows:
                        continue
                    try:
                        y = gemv_kernel.gemv(x, weights[0], config=cfg, block_m=bm or None, gated=gated)
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        us = bc.time_us(lambda i: gemv_kernel.gemv(rms_norm(x, nw, 1e-6), weights[i % copies],
                                                                   config=cfg, block_m=bm or None, gated=gated),
                                        args.iters, device)
                        results.append((us, (cfg, bm or "auto"), err))
                    except Exception as e:  # out of resources
                        print(f"  {cfg}: {type(e).__name__}", flush=True)
                results.sort()
                print(f"tp {tp} rows {rows} {proj} {n}x{k}: norm {norm_us:.2f} cublas {cublas:.2f} us", flush=True)
                for us, cfg, err in results[:args.top]:
                    print(f"    {us:7.2f} us  {cfg}  rel err {err:.1e}", flush=True)


def sweep_reduce(args) -> None:
    from kernels import all_reduce_rms_norm as fused

    device, dtype = torch.device("cuda"), torch.bfloat16
    data_bytes = 64 * 8192 * 2
    buffer = torch.empty(fused.buffer_bytes(data_bytes, 1), dtype=torch.uint8, device=device)
    fused.init_lamport(buffer, data_bytes, 1)
    peers = fused.PeerBuffers(torch.tensor([buffer.data_ptr()], device=device), 0, 1, data_bytes, True,
                              (buffer.data_ptr(),))
    for tp in args.tp:
        for proj in args.projections:
            n, k = shapes(tp)[proj]
            weights = bc.rotating_weights(n, k, args.iters, device, dtype)
            copies = len(weights)
            for rows in args.rows:
                x = torch.randn(rows, k, device=device, dtype=dtype)
                residual = torch.randn(rows, n, device=device, dtype=dtype)
                nw = torch.ones(n, device=device, dtype=dtype)

                def unfused(i):
                    return fused.all_reduce_add_rms_norm(F.linear(x, weights[i % copies]), residual, nw, 1e-6, peers,
                                                         i % 2)

                def pushed(i):
                    y = gemv_kernel.row_parallel_gemv(x, weights[i % copies], push=(peers, i % 2))
                    return fused.all_reduce_add_rms_norm(y, residual, nw, 1e-6, peers, i % 2, pushed=True)

                def reduced(i):
                    h = gemv_kernel.reduce_gemv(x, weights[i % copies], peers, i % 2, residual)
                    return rms_norm(h, nw, 1e-6), h

                ref = unfused(0)
                line = []
                for name, call in (("cublas+fused", unfused), ("push+poll", pushed), ("reduce+norm", reduced)):
                    out, h = call(0)
                    err = max((out.float() - ref[0].float()).abs().max().item(), (h.float() - ref[1].float()).abs().max().item())
                    line.append(f"{name} {bc.time_us(call, args.iters, device):7.2f} us (err {err:.1e})")
                print(f"tp {tp} rows {rows} {proj} {n}x{k}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
