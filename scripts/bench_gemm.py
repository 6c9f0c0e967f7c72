"""Decode-sized matmuls (batch rows x a Llama-3.1-8B projection, one tensor-parallel rank's slice) through
torch's GEMM back-ends (cuBLAS as torch calls it by default, torch's cuBLASLt path, TunableOp: torch
benchmarks the candidate algorithms per shape once and keeps the fastest) and kernels/gemv.py (autotuned
over 16 rows; with PDL its weight prefetch overlaps the RMSNorm before it).

    python scripts/bench_gemm.py --rows 64 --tp 1 2        # CUDA, bf16
    TRITON_INTERPRET=1 python scripts/bench_gemm.py --device cpu --dtype float32 --iters 2 --scale 0.05 --rows 4 \
        --backends cublas gemv   # smoke

Each column is a CUDA graph of --iters (RMSNorm, matmul) pairs, as a decode graph interleaves them, over
enough weight copies that L2 never holds the next one. The RMSNorm alone is timed too, so the matmul's
share is the difference. Prints us per pair and the weight bytes moved per us of it (GB/s).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402
from kernels import gemv as gemv_kernel  # noqa: E402
from kernels import rms_norm  # noqa: E402

HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024  # Llama-3.1-8B


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection's weight on one of `tp` ranks."""
    return {"qkv_proj": ((Q + 2 * KV) // tp, HIDDEN), "o_proj": (HIDDEN, Q // tp),
            "gate_up_proj": (2 * INTERMEDIATE // tp, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE // tp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=48)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every shape (CPU smoke runs)")
    parser.add_argument("--backends", nargs="+", default=["cublas", "cublaslt", "tunable", "gemv"],
                        choices=["cublas", "cublaslt", "tunable", "gemv", "kn", "inductor"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = [b for b in args.backends if device.type == "cuda" or b in ("cublas", "gemv", "kn")]
    print(f"{'tp':>2} {'rows':>4} {'projection':13} {'N x K':>13} {'norm us':>7} "
          + " ".join(f"{b + ' us':>11} {'GB/s':>5}" for b in backends), flush=True)
    rows_out = []
    for tp in args.tp:
        for rows in args.rows:
            for proj, (n, k) in shapes(tp).items():
                n, k = max(16, int(n * args.scale)), max(16, int(k * args.scale))
                nbytes = n * k * dtype.itemsize
                copies = max(2, min(args.iters, math.ceil(256e6 / nbytes)))
                weights = [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5 for _ in range(copies)]
                x = torch.randn(rows, k, device=device, dtype=dtype)
                norm_w = torch.ones(k, device=device, dtype=dtype)
                norm_us = bc.time_us(lambda i: rms_norm(x, norm_w, 1e-6), args.iters, device)
                # a back-end named twice is timed twice (its spread against the others' difference)
                times = [time_backend(backend, x, norm_w, weights, args.iters, device) for backend in backends]
                rows_out.append(dict(tp=tp, rows=rows, projection=proj, n=n, k=k, norm_us=norm_us,
                                     us=dict(zip(backends, times))))
                print(f"{tp:2} {rows:4} {proj:13} {f'{n} x {k}':>13} {norm_us:7.2f} " + " ".join(
                    f"{t:11.2f} {nbytes / max(t - norm_us, 1e-3) / 1e3:5.0f}" for t in times), flush=True)
    if device.type == "cuda" and torch.cuda.tunable.is_enabled():
        print("TunableOp picks:", *torch.cuda.tunable.get_results(), sep="\n  ")


def time_backend(backend: str, x, norm_w, weights, iters: int, device) -> float:
    copies = len(weights)

    def pair(i):
        return F.linear(rms_norm(x, norm_w, 1e-6), weights[i % copies])

    if backend == "cublas":
        return bc.time_us(pair, iters, device)
    if backend == "gemv":
        if x.shape[0] > gemv_kernel.MAX_ROWS:
            return float("nan")
        return bc.time_us(lambda i: gemv_kernel.gemv(rms_norm(x, norm_w, 1e-6), weights[i % copies]), iters, device)
    if backend == "kn":  # the weight stored transposed, [K, N] contiguous: cuBLAS's NN case instead of TN
        weights_kn = [w.t().contiguous() for w in weights]
        return bc.time_us(lambda i: torch.mm(rms_norm(x, norm_w, 1e-6), weights_kn[i % copies]), iters, device)
    if backend == "inductor":  # torch.compile max-autotune: cuBLAS against inductor's Triton GEMM templates
        import torch._inductor.config as inductor_config
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
        mm = torch.compile(lambda a, w: F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
        mm(rms_norm(x, norm_w, 1e-6), weights[0])  # compile and autotune this shape, outside any capture
        torch.cuda.synchronize()
        return bc.time_us(lambda i: mm(rms_norm(x, norm_w, 1e-6), weights[i % copies]), iters, device)
    if backend == "cublaslt":
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return bc.time_us(pair, iters, device)
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
    # TunableOp: tune this shape eagerly (never inside a graph capture), then time the tuned pick.
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)
    torch.cuda.tunable.set_max_tuning_duration(100)
    try:
        pair(0)
        torch.cuda.synchronize()
        torch.cuda.tunable.tuning_enable(False)
        return bc.time_us(pair, iters, device)
    finally:
        torch.cuda.tunable.tuning_enable(False)


if __name__ == "__main__":
    main()
