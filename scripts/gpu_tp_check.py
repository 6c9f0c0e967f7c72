"""Tensor parallelism on a multi-GPU machine: TP=N greedy tokens against TP=1 on the same
random-weight Llama-shaped checkpoint, then decode throughput of TP=1 and TP=N at several batch sizes.

    python scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --dtype float32 --out /tmp/tp_check.json
    python scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput        # minutes, not tens

--size small: a 8-layer, 1024-wide Llama built in-process (16 heads, 8 KV heads).
--size 8b:    Llama-3.1-8B shapes from scripts/make_random_checkpoint.py (16 GB of bf16 on disk; use
              --num-layers to cut layers). Throughput runs use load_format="dummy" (only config.json).

NVLink multicast (NVLS) stays off in this process and every child it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Before torch or any child: the children inherit os.environ (ipc/process.py: spawn).
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frontend import LLM, SamplingParams  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, there was a model " * 8, "1 2 3 4"]


def make_checkpoint(size: str, out: Path, num_layers: int | None, weights: bool) -> str:
    """A random-weight checkpoint directory (config only when `weights` is False and size is 8b)."""
    if (out / "config.json").exists() and (not weights or list(out.glob("*.safetensors"))):
        return str(out)  # made by an earlier run
    if size == "small":
        from tests.checkpoints import make_tiny_checkpoint
        return make_tiny_checkpoint("llama", out, hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=num_layers or 8, num_attention_heads=16,
                                    num_key_value_heads=8, vocab_size=8192, max_position_embeddings=4096,
                                    initializer_range=0.05)
    cmd = [sys.executable, str(REPO / "scripts/make_random_checkpoint.py"), "--arch", "llama-3.1-8b",
           "--out", str(out)] + (["--num-layers", str(num_layers)] if num_layers else []) + \
        ([] if weights else ["--config-only"])
    subprocess.run(cmd, check=True)
    return str(out)


def greedy_tokens(path: str, tp: int, dtype: str, max_tokens: int) -> list[list[int]]:
    with LLM(path, dtype=dtype, tensor_parallel_size=tp, max_model_len=1024, gpu_memory_utilization=0.85) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_greedy(path: str, tp: int, dtype: str, max_tokens: int) -> dict:
    one, many = greedy_tokens(path, 1, dtype, max_tokens), greedy_tokens(path, tp, dtype, max_tokens)
    result = {"dtype": dtype, "identical_sequences": sum(a == b for a, b in zip(one, many)), "of": len(one),
              "matching_prefix_lengths": [common_prefix(a, b) for a, b in zip(one, many)], "max_tokens": max_tokens}
    print(f"greedy TP={tp} vs TP=1:", result, flush=True)
    return result


def best_of(n: int, fn) -> float:
    """The shortest of n timed calls (a stray compile or allocation lands in one, not all)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_throughput(path: str, tp: int, batch_sizes: list[int], input_len: int, output_len: int) -> dict:
    """Output tokens per second of `batch` requests decoding `output_len` tokens each; the prefill
    is measured separately (max_tokens=1) and subtracted, each the best of a few runs. After the untimed warm-up of each batch the
    prompts are in the prefix cache, equally for both timed runs."""
    results = {}
    with LLM(path, dtype="bfloat16", tensor_parallel_size=tp, load_format="dummy", max_model_len=2048,
             gpu_memory_utilization=0.85, max_num_seqs=max(batch_sizes)) as llm:
        llm.generate([{"prompt_token_ids": [11] * 16}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
        for batch in batch_sizes:
            prompts = [{"prompt_token_ids": [100 + (i * 7 + j) % 1000 for j in range(input_len)]} for i in range(batch)]
            # Untimed: the first step of a new shape compiles kernels, which must not land in either timing.
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
            prefill_s = best_of(3, lambda: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1),
                                                          use_tqdm=False))
            total_s = best_of(2, lambda: llm.generate(
                prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False))
            decode_s = total_s - prefill_s
            results[batch] = {"decode_tok_s": batch * (output_len - 1) / decode_s,
                              "ms_per_step": decode_s / (output_len - 1) * 1000, "prefill_s": prefill_s}
            print(f"TP={tp} batch={batch}:", results[batch], flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("small", "8b"), default="small", help="checkpoint shape")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size to compare with 1")
    p.add_argument("--num-layers", type=int, default=None,
                   help="fewer decoder layers in the greedy check's checkpoint (8b: faster to write); the "
                        "throughput runs always use the whole model")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the greedy comparison (float32: exact ties rarer)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--skip-greedy", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--workdir", default="/tmp/gpu_tp_check", help="where checkpoints are written")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()

    # nvidia-smi, not torch.cuda: this process keeps no CUDA context on GPU 0.
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.split("\n") if shutil.which("nvidia-smi") else []
    results: dict = {"size": args.size, "tp": args.tp, "gpus": [g for g in gpus if g]}
    work = Path(args.workdir)
    if not args.skip_greedy:
        path = make_checkpoint(args.size, work / f"{args.size}-weights", args.num_layers, weights=True)
        results["greedy"] = check_greedy(path, args.tp, args.dtype, args.max_tokens)
    if not args.skip_throughput:
        small = args.size == "small"  # its weights are cheap; 8b gets a config-only directory
        path = make_checkpoint(args.size, work / f"{args.size}-{'weights' if small else 'config'}",
                               args.num_layers if small else None, weights=small)
        results["throughput"] = {tp: decode_throughput(path, tp, args.batch_sizes, args.input_len, args.output_len)
                                 for tp in (1, args.tp)}
        for batch in args.batch_sizes:
            one, many = (results["throughput"][tp][batch]["decode_tok_s"] for tp in (1, args.tp))
            print(f"batch {batch}: TP={args.tp} / TP=1 decode throughput = {many / one:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
