"""Why a decode step's RMSNorm stays its own launch: a 64-row GEMV whose K loop also does the norm's work,
variant by variant, against the plain loop (BENCHMARKS.md, session 19).

    python scripts/bench_norm_prologue.py                      # CUDA, bf16, Llama-8B qkv_proj at TP=1 and 2
    TRITON_INTERPRET=1 python scripts/bench_norm_prologue.py --device cpu --check   # variants vs torch, tiny

Folding RMSNorm(x) W^T = rstd * (x * g) W^T into the loop needs x * g ahead of the dot and each row's sum of
squares. Variants (MODE):
  0 plain: the dot alone (then scaled by rstd of nothing: timing only)
  1 x * g before the dot             2 sum of x^2 each K tile (tl.sum)       3 = 1 + 2: the whole norm
  4 x^2 as dot(x, x^T)'s diagonal     5 = 1 + 4: the whole norm                6 x^2 accumulated elementwise
Modes 3 and 5 compute RMSNorm(x) W^T (`--check` compares them with torch); 4 and 6 are the squares alone,
what is left when g is folded into W.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

MODES = range(7)
NORMED = (3, 5)  # the modes that compute the whole norm


@triton.jit
def _kernel(x_ptr, w_ptr, g_ptr, y_ptr, M, N, K, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sumsq = tl.zeros([BLOCK_M], tl.float32)
    gram = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K a multiple of BLOCK_K, N of BLOCK_N (the caller's shapes)
        w = tl.load(w_ptr + cols[:, None] * K + k0 + ks[None, :])
        x = tl.load(x_ptr + rows[:, None] * K + k0 + ks[None, :], mask=(rows < M)[:, None], other=0.0)
        if MODE == 2 or MODE == 3:
            sumsq += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        if MODE == 4 or MODE == 5:
            gram += tl.dot(x, tl.trans(x))
        if MODE == 6:
            squares += x.to(tl.float32) * x.to(tl.float32)
        if MODE == 1 or MODE == 3 or MODE == 5:
            g = tl.load(g_ptr + k0 + ks).to(tl.float32)
            x = (x.to(tl.float32) * g[None, :]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    if MODE == 4 or MODE == 5:
        sumsq = tl.sum(tl.where(rows[:, None] == rows[None, :], gram, 0.0), 1)
    if MODE == 6:
        sumsq = tl.sum(squares, 1)
    acc *= tl.rsqrt(sumsq / K + eps)[:, None]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None])


def launch(x, w, g, y, mode: int, config: tuple[int, int, int, int], eps: float = 1e-6):
    block_n, block_k, warps, stages = config
    n, k = w.shape
    _kernel[(n // block_n,)](x, w, g, y, x.shape[0], n, k, eps, 64, block_n, block_k, mode,
                             num_warps=warps, num_stages=stages)
    return y


def reference(x, w, g, eps: float = 1e-6):
    xd = x.double()
    return (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * g.double()) @ w.double().T


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=48)
    p.add_argument("--check", action="store_true", help="modes 3 and 5 against torch; no timing")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(6144, 4096), (3072, 4096)] if cuda else [(64, 256)]
    configs = [(32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 4)] if cuda else [(32, 64, 4, 2)]
    worst = 0.0
    for n, k in shapes:
        weights = bc.rotating_weights(n, k, args.iters, device, dtype) if cuda else [torch.randn(n, k)]
        x = torch.randn(64 if cuda else 5, k, device=device, dtype=dtype)
        g = (torch.rand(k, device=device) + 0.5).to(dtype)
        y = torch.empty(x.shape[0], n, device=device, dtype=dtype)
        for config in configs:
            if args.check:
                ref = reference(x, weights[0], g)
                for mode in NORMED:
                    got = launch(x, weights[0], g, y, mode, config).double()
                    err = ((got - ref).norm() / ref.norm()).item()
                    worst = max(worst, err)
                    print(f"{n}x{k} {config} mode {mode}: rel err {err:.1e}", flush=True)
                continue
            times = {m: bc.time_us(lambda i, m=m: launch(x, weights[i % len(weights)], g, y, m, config),
                                   args.iters, device) for m in MODES}
            print(f"{n}x{k} {','.join(map(str, config))}: " + " ".join(f"{m}:{t:6.1f}" for m, t in times.items()),
                  flush=True)
    if args.check and worst > (1e-5 if dtype == torch.float32 else 2e-2):
        sys.exit(f"a normed variant is off: rel err {worst:.1e}")


if __name__ == "__main__":
    main()
