"""y = x W^T (+ b) for a handful of rows (decode at small batch): a weight-streaming matmul.

At batch 1-16 a linear layer is a read of W and nothing else (2 FLOPs per weight byte pair): its time is
W's bytes over the bandwidth the kernel sustains. cuBLAS picks tiles sized for large M; at M = 1 on an
H200 they left 20-45% of the copy bandwidth unused on the 8B model's smaller projections (qkv, o_proj:
profile in BENCHMARKS.md). Here each program streams BLOCK_N whole rows of W:

    grid = (cdiv(N, BLOCK_N),)
    program n:   acc[16, BLOCK_N] = Σ_k  x[:, k:k+BLOCK_K] · W[n*BLOCK_N:(n+1)*BLOCK_N, k:k+BLOCK_K]^T
                 x padded to 16 rows for tl.dot (tensor cores; the extra rows cost nothing when the
                 weights' bytes set the pace), float32 accumulation, one store of the M real rows.

The K loop is software-pipelined (num_stages) so each SM keeps several weight tiles in flight.

Measured on an H200 (scripts/bench_gemv.py), no single tile configuration beats cuBLAS on every shape:
it did on Qwen3-0.6B's o_proj at 1-4 rows (2x) and lost 5-20% on most others. So `tune` times, at
start-up and on the model's own weights, cuBLAS against each configuration in CONFIGS for every
(N, K, rows) the decode graphs will run, and keeps the kernel only where it wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.decode_attention import _num_sms
from kernels.kv_cache import SUPPORTED_DTYPES, cdiv, check_same_device

MAX_ROWS = 16  # x rows one launch takes (the tl.dot tile's M)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, 16)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features of this program
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [16, BLOCK_K]
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


Config = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS: tuple[Config, ...] = ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3),
                               (64, 256, 8, 3), (16, 1024, 8, 2))


def _config(n: int, k: int, device: torch.device) -> Config:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the widest BLOCK_N (16..64) that still gives every SM
    at least two programs, 256-wide K tiles, 4 stages in flight."""
    sms = _num_sms(device)
    block_n = 64
    while block_n > 16 and cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    return block_n, 256, 4, 4


def gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS, last dim contiguous
    weight: torch.Tensor,  # [N, K], last dim contiguous
    bias: torch.Tensor | None = None,  # [N]
    config: Config | None = None,  # None: a default from the shape
) -> torch.Tensor:
    """x @ weight.T (+ bias) as a new [M, N] tensor in x's dtype, for M <= 16 rows."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [M, K] and [N, K]")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight dtypes ({x.dtype}, {weight.dtype}) must match and be one of {SUPPORTED_DTYPES}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x and weight must be contiguous in their last dim, got strides {x.stride()}, "
                         f"{weight.stride()}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_same_device(weight.device, x=x, **({} if bias is None else {"bias": bias}))
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_n, block_k, num_warps, num_stages = config or _config(n, k, x.device)
    _gemv_kernel[(cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def _graph_us(calls, reps: int = 3) -> float:
    """Microseconds per call of `calls` (a list of closures) captured back to back in one CUDA graph."""
    for call in calls:  # warm-up: compile and autotune nothing inside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


@torch.inference_mode()
def tune(layers: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor | None]]], rows: list[int],
         margin: float = 0.97) -> dict[tuple[int, int, int], Config]:
    """For each weight shape (N, K) -> its layers' (weight, bias), and each row count: the fastest
    configuration, kept where it takes under `margin` of cuBLAS's time. Each candidate runs as one CUDA
    graph over all the layers of that shape, so every call reads a different weight (from HBM, not L2),
    as in a decode step. Returns {(N, K, rows): config}; absent keys stay on cuBLAS."""
    table = {}
    for (n, k), params in layers.items():
        for m in rows:
            x = torch.randn(m, k, dtype=params[0][0].dtype, device=params[0][0].device)
            cublas = _graph_us([lambda w=w, b=b: torch.nn.functional.linear(x, w, b) for w, b in params])
            best, best_us = None, cublas * margin
            for config in CONFIGS:
                us = _graph_us([lambda w=w, b=b: gemv(x, w, b, config) for w, b in params])
                if us < best_us:
                    best, best_us = config, us
            if best is not None:
                table[(n, k, m)] = best
                gemv(x, params[0][0], None, best)  # compile the bias-less variant too (row-parallel
                # layers add their bias after the all-reduce): nothing may compile inside graph capture
    return table
