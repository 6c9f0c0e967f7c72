"""kernels/top_p.py's search at each number of pivots a pass (16 x 8 passes is the shipped one): the
time a call, and how many rows' thresholds differ from the first setting's (none but a row whose cut
the order of a float32 sum could tip).

    python scripts/bench_top_p.py                                  # CUDA: 128k vocabulary, batch 1 / 64 / 256
    TRITON_INTERPRET=1 python scripts/bench_top_p.py --device cpu --vocab 1000 --batch-sizes 2 --iters 1

A pass compares every token with every pivot; on an H200 that, not the memory it reads, bounds a pass
at 64 and 256 rows (BENCHMARKS.md, session 12), so fewer pivots and more passes may take less time.
Rows: float32 scaled logits (bf16 `randn * 3` / 0.8) and top_p 0.95, as the sampler hands them over.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402
import kernels.top_p as top_p_module  # noqa: E402

SETTINGS = [(16, 8), (8, 11), (4, 16), (2, 32)]
"""(pivots a pass, passes): each narrows 2**32 float keys to one."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    shipped = (top_p_module.PIVOTS, top_p_module.PASSES)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: top_p_thresholds, us a call"
          f"{' in a CUDA graph' if device.type == 'cuda' else ''}; vocab {args.vocab}")
    print(f"{'batch':>5} " + "".join(f"{f'{p} x {n}':>12}" for p, n in SETTINGS))
    try:
        for batch in args.batch_sizes:
            y = (torch.randn(batch, args.vocab, device=device) * 3).to(torch.bfloat16).float() / 0.8  # [S, V]
            top_p = torch.full((batch,), 0.95, device=device)
            cells, first = [], None
            for pivots, passes in SETTINGS:
                top_p_module.PIVOTS, top_p_module.PASSES = pivots, passes
                out = top_p_module.top_p_thresholds(y, top_p)  # [S]
                first = out if first is None else first
                differ = int((out != first).sum())  # a row whose cut rounding could tip (a float32 sum's order)
                us = bc.time_us(lambda i: top_p_module.top_p_thresholds(y, top_p), args.iters, device)
                cells.append(f"{us:.1f}" + (f" ({differ} differ)" if differ else ""))
            print(f"{batch:>5} " + "".join(f"{c:>12}" for c in cells), flush=True)
    finally:
        top_p_module.PIVOTS, top_p_module.PASSES = shipped


if __name__ == "__main__":
    main()
