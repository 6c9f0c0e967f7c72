"""Tensor parallelism on a multi-GPU machine: TP=N greedy tokens against TP=1 on the same
random-weight Llama-shaped checkpoint, then decode throughput of TP=1 and TP=N at several batch
sizes, TP=N optionally both with NCCL and with the symmetric-memory all-reduce in the same run; and a
microbenchmark of one all-reduce per message size and path.

    python scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --dtype float32 --out /tmp/tp_check.json
    python scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --compare-all-reduce --out /tmp/tp.json
    python scripts/gpu_tp_check.py --size 70b --tp 4 --compare-all-reduce   # no greedy, no TP=1 (too big)
    python scripts/gpu_tp_check.py --tp 2 --all-reduce-bench --skip-greedy --skip-throughput
    python scripts/gpu_tp_check.py --tp 2 --matmul-reduce-bench --skip-greedy --skip-throughput
    python scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput        # minutes, not tens

--size small: a 8-layer, 1024-wide Llama built in-process (16 heads, 8 KV heads).
--size 8b:    Llama-3.1-8B shapes from scripts/make_random_checkpoint.py (16 GB of bf16 on disk; use
              --num-layers to cut layers). Throughput runs use load_format="dummy" (only config.json).
--size 8b-rank2: one Llama-3.1-8B TP=2 rank's slices as a whole model (16 heads, 4 KV heads, MLP 7168,
              vocabulary 64128; throughput only, at --tp 1): a TP=2 step's work on one GPU without its
              all-reduces, so TP=2 less this is what the collectives cost.
--size 70b:   Llama-3.1-70B shapes, throughput only (dummy weights; 35 GB a rank at TP=4): the greedy
              check needs written weights (140 GB) and TP=1 does not fit one GPU, so both are skipped.

--compare-all-reduce runs TP=N twice, PAGEDSERVE_CUSTOM_ALL_REDUCE=0 (NCCL) then =1 (symmetric memory),
each engine's workers inheriting the variable; --compare-fused likewise with PAGEDSERVE_FUSED_ALL_REDUCE=0
(reduce, then RMSNorm) against the default (one fused launch); the JSON (written after every run) and the closing
table hold both. Each engine run takes an estimated 1-2 minutes (70b the most: not yet measured);
--budget-s skips the runs that would start after it, so the script ends at most one run past it.
The correctness test of the symmetric all-reduce itself (eager and in CUDA graphs, 2 and 4 GPUs)
is `python -m pytest -q tests/gpu_workers/test_symm_all_reduce.py`.

NVLink multicast (NVLS) stays off in this process and every child it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

# Before torch or any child: the children inherit os.environ (ipc/process.py: spawn).
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_all_reduce import all_reduce_bench, matmul_reduce_bench  # noqa: E402
from frontend import LLM, SamplingParams  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, there was a model " * 8, "1 2 3 4"]
ARCHS = {"8b": "llama-3.1-8b", "70b": "llama-3.1-70b"}
SWITCH = "PAGEDSERVE_CUSTOM_ALL_REDUCE"
FUSED_SWITCH = "PAGEDSERVE_FUSED_ALL_REDUCE"
START = time.monotonic()


def make_checkpoint(size: str, out: Path, num_layers: int | None, weights: bool) -> str:
    """A random-weight checkpoint directory (config only when `weights` is False, for 8b and 70b)."""
    if (out / "config.json").exists() and (not weights or list(out.glob("*.safetensors"))):
        return str(out)  # made by an earlier run
    if size == "small":
        from tests.checkpoints import make_tiny_checkpoint
        return make_tiny_checkpoint("llama", out, hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=num_layers or 8, num_attention_heads=16,
                                    num_key_value_heads=8, vocab_size=8192, max_position_embeddings=4096,
                                    initializer_range=0.05)
    cmd = [sys.executable, str(REPO / "scripts/make_random_checkpoint.py"), "--arch", ARCHS[size.split("-")[0]],
           "--out", str(out)] + (["--num-layers", str(num_layers)] if num_layers else []) + \
        ([] if weights else ["--config-only"])
    subprocess.run(cmd, check=True)
    if size == "8b-rank2":  # one TP=2 rank's slices as a whole model: half the heads, MLP and vocabulary
        config = json.loads((out / "config.json").read_text())
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
            config[key] //= 2
        (out / "config.json").write_text(json.dumps(config, indent=2))
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
              "matching_prefix_lengths": [common_prefix(a, b) for a, b in zip(one, many)], "max_tokens": max_tokens,
              SWITCH: os.environ.get(SWITCH, "unset (on)")}
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


@contextlib.contextmanager
def environment(overrides: dict[str, str]):
    """os.environ with `overrides` while the block runs (an engine's workers inherit it at start)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SAMPLED = dict(temperature=0.8, top_p=0.95)  # --sampled: what a chat client typically asks for
TEMPERATURE = dict(temperature=1.0)  # --sampled, too: the OpenAI API's defaults (temperature 1, top_p 1)


def decode_throughput(path: str, tp: int, batch_sizes: list[int], input_len: int, output_len: int,
                      sampled: bool = False) -> dict:
    """Output tokens per second of `batch` requests decoding `output_len` tokens each; the prefill
    is measured separately (max_tokens=1) and subtracted, each the best of a few runs. After the untimed warm-up of each batch the
    prompts are in the prefix cache, equally for both timed runs. With `sampled`, the decode is also
    timed with SAMPLED's temperature and top-p, with TEMPERATURE's alone, and with SAMPLED and a seed
    per request (the full logits gathered, the sampler)."""
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
            if sampled:
                sampled_s = best_of(2, lambda: llm.generate(
                    prompts, SamplingParams(**SAMPLED, max_tokens=output_len, ignore_eos=True), use_tqdm=False))
                results[batch]["sampled_ms_per_step"] = (sampled_s - prefill_s) / (output_len - 1) * 1000
                temperature_s = best_of(2, lambda: llm.generate(
                    prompts, SamplingParams(**TEMPERATURE, max_tokens=output_len, ignore_eos=True), use_tqdm=False))
                results[batch]["temperature_ms_per_step"] = (temperature_s - prefill_s) / (output_len - 1) * 1000
                seeded = [SamplingParams(**SAMPLED, seed=1000 + i, max_tokens=output_len, ignore_eos=True)
                          for i in range(batch)]
                seeded_s = best_of(2, lambda: llm.generate(prompts, seeded, use_tqdm=False))
                results[batch]["seeded_ms_per_step"] = (seeded_s - prefill_s) / (output_len - 1) * 1000
            print(f"TP={tp} batch={batch}:", results[batch], flush=True)
    return results


class Run(NamedTuple):
    label: str
    tp: int
    env: dict[str, str]


def throughput_runs(tp: int, with_tp1: bool, compare: bool, compare_fused: bool = False) -> list[Run]:
    runs = [Run("tp1", 1, {})] if with_tp1 else []
    if compare:
        runs += [Run(f"tp{tp}-nccl", tp, {SWITCH: "0"})]
    if compare_fused:
        runs += [Run(f"tp{tp}-unfused", tp, {FUSED_SWITCH: "0"})]
    return runs + [Run(f"tp{tp}-symm" if compare else f"tp{tp}", tp, {})]


def run_throughput(path: str, runs: list[Run], args, out: dict, save) -> None:
    """Each run in its own engine, its results into out[label] (saved after each); a run that would
    start past --budget-s is skipped (and says so)."""
    for run in runs:
        if time.monotonic() - START > args.budget_s:
            out[run.label] = {"tp": run.tp, "env": run.env, "skipped": f"--budget-s {args.budget_s} spent"}
            print(f"{run.label}: skipped, --budget-s {args.budget_s} spent", flush=True)
            continue
        started = time.monotonic()
        out[run.label] = {"tp": run.tp, "env": run.env}
        try:
            with environment(run.env):
                out[run.label]["batches"] = decode_throughput(path, run.tp, args.batch_sizes, args.input_len,
                                                              args.output_len, args.sampled)
        except Exception as e:  # noqa: BLE001 - one failed engine must not cost the other runs' numbers
            traceback.print_exc()
            out[run.label]["error"] = f"{type(e).__name__}: {e}"
        out[run.label]["seconds"] = round(time.monotonic() - started, 1)
        print(f"{run.label}: {'failed' if 'error' in out[run.label] else 'done'} in "
              f"{out[run.label]['seconds']} s", flush=True)
        save()


def print_summary(throughput: dict, batch_sizes: list[int]) -> None:
    done = {label: r["batches"] for label, r in throughput.items() if "batches" in r}
    if not done:
        return
    labels = list(done)
    print("\ndecode, ms per step (output tok/s):")
    print(f"{'batch':>6}" + "".join(f"{label:>22}" for label in labels))
    for batch in batch_sizes:
        cells = [f"{done[lb][batch]['ms_per_step']:.2f} ({done[lb][batch]['decode_tok_s']:,.0f})" for lb in labels]
        print(f"{batch:>6}" + "".join(f"{c:>22}" for c in cells))
    pairs = [("tp1", lb) for lb in labels if lb != "tp1" and "tp1" in done]
    default = [lb for lb in labels if lb != "tp1" and not lb.endswith(("-nccl", "-unfused"))]  # tpN or tpN-symm
    pairs += [(lb, default[0]) for lb in labels if lb.endswith(("-nccl", "-unfused")) and default]
    for base, other in pairs:
        ratios = ", ".join(f"batch {b}: {done[other][b]['decode_tok_s'] / done[base][b]['decode_tok_s']:.2f}x"
                           for b in batch_sizes)
        print(f"{other} / {base} decode throughput: {ratios}")
    print(flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("small", "8b", "8b-rank2", "70b"), default="small", help="checkpoint shape")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size to compare with 1")
    p.add_argument("--num-layers", type=int, default=None,
                   help="fewer decoder layers in the greedy check's checkpoint (8b: faster to write); the "
                        "throughput runs always use the whole model")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the greedy comparison (float32: exact ties rarer)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--skip-greedy", action="store_true")
    p.add_argument("--sampled", action="store_true",
                   help=f"also time each decode with {SAMPLED} (sampled_ms_per_step), {TEMPERATURE} "
                        "(temperature_ms_per_step) and the first with a seed per request (seeded_ms_per_step)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-tp1", action="store_true", help="no TP=1 throughput baseline (always so for 70b)")
    p.add_argument("--compare-all-reduce", action="store_true",
                   help="TP=N throughput with NCCL only and with the symmetric-memory all-reduce, side by side")
    p.add_argument("--compare-fused", action="store_true",
                   help="TP=N throughput with the all-reduce and the RMSNorm after it apart (PAGEDSERVE_FUSED_ALL_REDUCE=0) "
                        "and fused (the default), side by side")
    p.add_argument("--all-reduce-bench", action="store_true",
                   help="time one bf16 all-reduce per message size: NCCL, one-shot, two-shot (on --tp GPUs)")
    p.add_argument("--matmul-reduce-bench", action="store_true",
                   help="time a row-parallel matmul + all-reduce + RMSNorm down each path (on --tp GPUs)")
    p.add_argument("--budget-s", type=float, default=480,
                   help="no throughput run starts after this many seconds from the script's start")
    p.add_argument("--workdir", default="/tmp/gpu_tp_check", help="where checkpoints are written")
    p.add_argument("--out", default=None, help="write the results here as JSON (after every run)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # nvidia-smi, not torch.cuda: this process keeps no CUDA context on GPU 0.
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.split("\n") if shutil.which("nvidia-smi") else []
    results: dict = {"size": args.size, "tp": args.tp, "gpus": [g for g in gpus if g]}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))

    work = Path(args.workdir)
    for key, bench in (("all_reduce_bench", all_reduce_bench), ("matmul_reduce_bench", matmul_reduce_bench)):
        if getattr(args, key):
            try:
                results[key] = bench(args.tp, work)
            except Exception as e:  # noqa: BLE001 - the engine runs below still run
                traceback.print_exc()
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            save()
    if args.size == "70b" and not (args.skip_greedy and args.skip_throughput):
        print("70b: greedy check and TP=1 skipped (no written weights; one GPU cannot hold it)", flush=True)
    if not args.skip_greedy and args.size != "70b":
        path = make_checkpoint(args.size, work / f"{args.size}-weights", args.num_layers, weights=True)
        results["greedy"] = check_greedy(path, args.tp, args.dtype, args.max_tokens)
        save()
    if not args.skip_throughput:
        small = args.size == "small"  # its weights are cheap; 8b and 70b get a config-only directory
        path = make_checkpoint(args.size, work / f"{args.size}-{'weights' if small else 'config'}",
                               args.num_layers if small else None, weights=small)
        runs = throughput_runs(args.tp, with_tp1=not args.skip_tp1 and args.size != "70b",
                               compare=args.compare_all_reduce, compare_fused=args.compare_fused)
        results["throughput"] = {}
        run_throughput(path, runs, args, results["throughput"], save)
        print_summary(results["throughput"], args.batch_sizes)
    results["seconds"] = round(time.monotonic() - START, 1)
    save()


if __name__ == "__main__":
    main()
