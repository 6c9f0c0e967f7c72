"""Fused Triton elementwise kernels vs the torch path of layers.py, per op, at real model shapes.

    python scripts/bench_elementwise.py                    # CUDA: bf16, batch 1 and 64, Qwen3-0.6B + Llama-8B
    TRITON_INTERPRET=1 python scripts/bench_elementwise.py --device cpu --iters 1   # smoke test only

Each op is timed as a CUDA graph of `--iters` back-to-back calls (launch overhead included, as in a
decode graph), and its bf16 output is compared with the torch path's (relative error).
"""

from __future__ import annotations

import argparse

import torch

import bench_common as bc
from gpu_workers.models import elementwise
from gpu_workers.models.layers import RMSNorm, RotaryEmbedding

# name: (hidden, num_heads, num_kv_heads, head_dim, intermediate, qk_norm)
SHAPES = {"qwen3-0.6b": (1024, 16, 8, 128, 3072, True), "llama-3.1-8b": (4096, 32, 8, 128, 14336, False)}


def ops(shape, batch: int, dtype: torch.dtype, device: torch.device):
    """(name, fn) pairs running one layer's elementwise ops through layers.py's modules."""
    hidden, heads, kv_heads, head_dim, inter, qk_norm = shape
    norm = RMSNorm(hidden, 1e-6).to(device, dtype)
    rope = RotaryEmbedding(head_dim, 4096, 1e6, {"rope_type": "default"}).to(device)
    q_norm, k_norm = (RMSNorm(head_dim, 1e-6).to(device, dtype) for _ in range(2))
    x, res = (torch.randn(batch, hidden, device=device, dtype=dtype) for _ in range(2))
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(batch, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
    pos = torch.randint(0, 4096, (batch,), device=device)
    gate_up = torch.randn(batch, 2 * inter, device=device, dtype=dtype)

    def rotary():
        if elementwise.use_triton(q):
            return elementwise.rotary(rope, pos, q, k, *((q_norm, k_norm) if qk_norm else ()))
        qq, kk = (q_norm(q), k_norm(k)) if qk_norm else (q, k)
        return rope(pos, qq, kk)

    def silu_and_mul():
        if elementwise.use_triton(gate_up):
            return elementwise.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    return [("rms_norm+residual", lambda: norm(x, res)), ("rotary" + ("+qk_norm" if qk_norm else ""), rotary),
            ("silu_and_mul", silu_and_mul)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"{'model':14} {'batch':>5} {'op':22} {'torch us':>9} {'triton us':>9} {'rel err':>9}")
    for model, shape in SHAPES.items():
        for batch in args.batch_sizes:
            for name, fn in ops(shape, batch, dtype, device):
                elementwise.MODE = "torch"
                t_torch, ref = bc.time_us(lambda _: fn(), args.iters, device), fn()
                elementwise.MODE = "triton"
                t_triton, got = bc.time_us(lambda _: fn(), args.iters, device), fn()
                ref, got = (torch.cat([t.flatten() for t in (o if isinstance(o, tuple) else (o,))])
                            for o in (ref, got))
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                print(f"{model:14} {batch:5} {name:22} {t_torch:9.2f} {t_triton:9.2f} {err:9.1e}")
    elementwise.MODE = None


if __name__ == "__main__":
    main()
