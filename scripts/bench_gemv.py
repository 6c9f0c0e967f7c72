"""kernels/gemv.py against cuBLAS (F.linear) at the Llama-3.1-8B and Qwen3-0.6B projection shapes, for the
few-row matmuls of small-batch decode.

    python scripts/bench_gemv.py                          # CUDA, bf16, rows 1, 4, 16
    TRITON_INTERPRET=1 python scripts/bench_gemv.py --device cpu --dtype float32 --iters 1 --small   # smoke

Each call is timed in a CUDA graph of `--iters` calls that cycle over enough copies of the weight to
miss the L2 cache (as a decode step reads each layer's weights once), and reported as the weight bytes
per microsecond it sustains (GB/s), beside the relative error against F.linear. The kernel's column is
the best of its CONFIGS (the engine's start-up tuning picks the same way), named in the last column.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import bench_common as bc
from kernels.gemv import CONFIGS, gemv

# (model, layer): (N, K) of W
SHAPES = {
    ("llama-3.1-8b", "qkv"): (6144, 4096), ("llama-3.1-8b", "o_proj"): (4096, 4096),
    ("llama-3.1-8b", "gate_up"): (28672, 4096), ("llama-3.1-8b", "down"): (4096, 14336),
    ("llama-3.1-8b", "lm_head"): (128256, 4096),
    ("qwen3-0.6b", "qkv"): (4096, 1024), ("qwen3-0.6b", "o_proj"): (1024, 2048),
    ("qwen3-0.6b", "gate_up"): (6144, 1024), ("qwen3-0.6b", "down"): (1024, 3072),
}
SMALL = {("tiny", "a"): (96, 80), ("tiny", "b"): (33, 300)}  # --small: interpreter-sized, odd edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    l2_bytes = 256 << 20 if device.type == "cuda" else 0
    results = []
    print(f"{'model':14} {'layer':8} {'rows':>4} {'cublas us':>9} {'gemv us':>8} {'cublas GB/s':>11} "
          f"{'gemv GB/s':>9} {'rel err':>8} config")
    for (model, layer), (n, k) in (SMALL if args.small else SHAPES).items():
        nbytes = n * k * dtype.itemsize
        copies = max(1, math.ceil(l2_bytes / nbytes))
        weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            t_ref = bc.time_us(lambda i: torch.nn.functional.linear(x, weights[i % copies]), args.iters, device)
            configs = CONFIGS[:1] if args.small else CONFIGS
            t_ours, best = min((bc.time_us(lambda i: gemv(x, weights[i % copies], None, c), args.iters, device), c)
                               for c in configs)
            ref, got = torch.nn.functional.linear(x, weights[0]).float(), gemv(x, weights[0], None, best).float()
            err = ((got - ref).norm() / ref.norm()).item()
            row = dict(model=model, layer=layer, rows=m, n=n, k=k, cublas_us=t_ref, gemv_us=t_ours, config=best,
                       cublas_gb_per_s=nbytes / t_ref / 1e3, gemv_gb_per_s=nbytes / t_ours / 1e3, rel_err=err)
            results.append(row)
            print(f"{model:14} {layer:8} {m:4} {t_ref:9.2f} {t_ours:8.2f} {row['cublas_gb_per_s']:11.0f} "
                  f"{row['gemv_gb_per_s']:9.0f} {err:8.1e} {best}")
        del weights
    if args.output_json:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        json.dump({"benchmark": "gemv", "card": card, "dtype": args.dtype, "rows": results}, open(args.output_json, "w"))


if __name__ == "__main__":
    main()
