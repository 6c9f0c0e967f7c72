"""The sampler's random rows at real vocabularies, batch sizes and filter settings, by four paths: the
torch stages sorting for top-p and drawing by torch's exponential race; the same with top-p's threshold
from kernels/top_p.py; that with the draw by kernels/gumbel.py (the CUDA default); the Triton kernel
(kernels/sampling.py, opt-in).

    python scripts/bench_sampling.py                       # CUDA, bf16 logits
    TRITON_INTERPRET=1 python scripts/bench_sampling.py --device cpu --vocab 2000 --batch-sizes 2 --iters 1

Times `Sampler.sample` as the engine calls it (eager: the batch's tensors are built once, outside the
timing, as the engine builds them on the host while the GPU runs): mean microseconds per call over
`--iters` back-to-back calls, synchronized at the end, so it is max(CPU launch time, GPU time).
"""

from __future__ import annotations

import argparse
import time

import torch

from gpu_workers.sampler import RowInfo, Sampler, SamplingBatch
from ipc.sampling_params import SamplingParams

SETTINGS = {
    "temperature": SamplingParams(temperature=0.8),
    "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k 50 + top_p 0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    "min_p 0.05": SamplingParams(temperature=0.8, min_p=0.05),
    "seeded top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9, seed=7),
}


def time_call(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up (Triton compiles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def time_gpu(fn, iters: int) -> float:
    """GPU microseconds per call alone: the calls are queued behind a ~100 ms sleep kernel, so the
    host's launch time (overlapped with the forward pass in the engine) is out of the measure."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, nargs="+", default=[128_256, 151_936])  # Llama-3, Qwen3
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    samplers = {"sort": Sampler(device=device, use_triton=False, top_p_search=False, race=False),
                "search": Sampler(device=device, use_triton=False, top_p_search=True, race=False),
                "search+race": Sampler(device=device, use_triton=False, top_p_search=True, race=True),
                "triton": Sampler(device=device, use_triton=True)}
    print("us per call (host launch or GPU, whichever is longer), then GPU alone [in brackets]; sort: the\n"
          "torch path sorting for top-p, drawing by torch's exponential race; search: top-p by kernels/top_p.py;\n"
          "search+race: drawn by kernels/gumbel.py too (the CUDA default); triton: kernels/sampling.py")
    print(f"{'vocab':>7} {'batch':>5} {'setting':24} " + "".join(f"{p:>20}" for p in samplers))
    for vocab in args.vocab:
        for batch_size in args.batch_sizes:
            logits = (torch.randn(batch_size, vocab, device=device) * 3).to(torch.bfloat16)
            for name, params in SETTINGS.items():
                rows = [RowInfo(params, [1], [], 0, [], position=i) for i in range(batch_size)]
                batch = SamplingBatch.build(rows, device)
                cells = []
                for s in samplers.values():
                    us = time_call(lambda s=s: s.sample(logits, batch), args.iters, device)
                    gpu = time_gpu(lambda s=s: s.sample(logits, batch), 20) if device.type == "cuda" else float("nan")
                    cells.append(f"{us:9.1f} [{gpu:7.1f}]")
                print(f"{vocab:7} {batch_size:5} {name:24} " + "".join(f"{c:>20}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
