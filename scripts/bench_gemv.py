"""The few-row GEMV (kernels/gemv.py) vs cuBLAS (F.linear), per projection of Llama-3.1-8B and Qwen3-0.6B.

    PAGEDSERVE_PDL=1 python scripts/bench_gemv.py          # CUDA, bf16, 1 row: the batch-1 decode case
    TRITON_INTERPRET=1 python scripts/bench_gemv.py --device cpu --dtype float32 --iters 1 --scale 0.01  # smoke

With --split-k 2 4, the GEMV also runs with K split 2 and 4 ways (kernels/gemv.py's SPLIT_K).
Each side runs as a CUDA graph of `--iters` (RMSNorm, matmul) pairs, as a decode graph interleaves them,
over enough weight copies that L2 (50-60 MB) never holds the next one; with PDL on, the GEMV's weight
prefetch overlaps the RMSNorm before it. Prints us per matmul, the weight bytes / us, and the speed-up.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import bench_common as bc
from kernels import rms_norm
from kernels.gemv import _config, gemv

# (model, projection): (N, K) of the weight [N, K]
SHAPES = {
    ("llama-3.1-8b", "qkv_proj"): (6144, 4096), ("llama-3.1-8b", "o_proj"): (4096, 4096),
    ("llama-3.1-8b", "gate_up_proj"): (28672, 4096), ("llama-3.1-8b", "down_proj"): (4096, 14336),
    ("llama-3.1-8b", "lm_head"): (128256, 4096),
    ("qwen3-0.6b", "qkv_proj"): (4096, 1024), ("qwen3-0.6b", "o_proj"): (1024, 2048),
    ("qwen3-0.6b", "gate_up_proj"): (6144, 1024), ("qwen3-0.6b", "down_proj"): (1024, 3072),
    ("qwen3-0.6b", "lm_head"): (151936, 1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--iters", type=int, default=48)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every shape (CPU smoke runs)")
    parser.add_argument("--split-k", type=int, nargs="*", default=[], help="also time the GEMV with these K splits")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"{'model':14} {'projection':13} {'N x K':>14} {'cuBLAS us':>9} {'GB/s':>6} {'gemv us':>9} {'GB/s':>6} "
          f"{'speed-up':>8} {'rel err':>8}" + "".join(f" {f'split{s} us':>10}" for s in args.split_k))
    for (model, proj), (n, k) in SHAPES.items():
        n, k = max(16, int(n * args.scale)), max(16, int(k * args.scale))
        nbytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(2, min(args.iters, math.ceil(256e6 / nbytes)))  # 256 MB of weights: never all in L2
        weights = [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5 for _ in range(copies)]
        x = torch.randn(args.rows, k, device=device, dtype=dtype)
        norm_w = torch.ones(k, device=device, dtype=dtype)
        times = {}
        for name, matmul in (("cublas", F.linear), ("gemv", gemv)):
            times[name] = bc.time_us(lambda i: matmul(rms_norm(x, norm_w, 1e-6), weights[i % copies]),
                                     args.iters, device)
        split_times = []
        for s in args.split_k:
            block_n, block_k, warps, stages, _ = _config(n, device)
            config = (block_n, block_k, warps, stages, s)
            split_times.append(bc.time_us(lambda i: gemv(rms_norm(x, norm_w, 1e-6), weights[i % copies], None, config),
                                          args.iters, device))
        ref, got = (F.linear(x, weights[0]).float(), gemv(x, weights[0]).float())
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"{model:14} {proj:13} {f'{n} x {k}':>14} {times['cublas']:9.2f} {nbytes / times['cublas'] / 1e3:6.0f} "
              f"{times['gemv']:9.2f} {nbytes / times['gemv'] / 1e3:6.0f} {times['cublas'] / times['gemv']:7.2f}x "
              f"{err:8.1e}" + "".join(f" {t:10.2f}" for t in split_times), flush=True)


if __name__ == "__main__":
    main()
