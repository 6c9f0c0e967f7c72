"""What the benchmark scripts share: random token-id workloads, the card's name, the JSON summary, and
loading the transformers baseline on the same checkpoint.

A workload is a list of Request(prompt_token_ids, output_len), drawn from one seed so every backend and
every rerun gets the same prompts. Token ids avoid the tokenizer's special ids (a random EOS or pad id
in a prompt would make backends treat the prompt differently).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import NamedTuple, Sequence


class Request(NamedTuple):
    prompt_token_ids: list[int]
    output_len: int


def read_config(model: str) -> dict:
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {model!r} is not a checkpoint directory with a config.json")
    with open(path) as f:
        return json.load(f)


def special_token_ids(model: str) -> list[int]:
    """Special ids of the checkpoint's tokenizer plus its config's bos/eos/pad ids."""
    ids: set[int] = set()
    config = read_config(model)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    try:
        from transformers import AutoTokenizer
        ids.update(AutoTokenizer.from_pretrained(model).all_special_ids)
    except (OSError, ValueError):  # no tokenizer: the config's ids will do
        pass
    return sorted(ids)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every offline benchmark shares: backend, checkpoint, load format, dtype."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["pagedserve", "hf"], default="pagedserve")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer, weights)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights from config.json alone (both backends)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on GPU, float32 on CPU), bfloat16, ...")
    return p


def add_workload_args(p: argparse.ArgumentParser, input_len: int, output_len: int) -> None:
    g = p.add_argument_group("workload (random token ids, ignore_eos: every request yields exactly its output length)")
    g.add_argument("--num-prompts", type=int, default=100, help="number of requests")
    g.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, default=output_len, help="output tokens per request")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)] (vLLM's random dataset)")
    g.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="prompt lengths uniform in [MIN, MAX] (overrides --input-len)")
    g.add_argument("--output-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="output lengths uniform in [MIN, MAX] (overrides --output-len)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and lengths")


def length_bounds(length: int, ratio: float, explicit: Sequence[int] | None, name: str) -> tuple[int, int]:
    if explicit:
        lo, hi = explicit
    else:
        if not 0.0 <= ratio < 1.0:
            raise SystemExit(f"error: --random-range-ratio must be in [0, 1), got {ratio}")
        lo, hi = int(length * (1 - ratio)), int(length * (1 + ratio))
    if not 1 <= lo <= hi:
        raise SystemExit(f"error: {name} lengths must satisfy 1 <= min <= max, got [{lo}, {hi}]")
    return lo, hi


def make_requests(args: argparse.Namespace, vocab_size: int, skip_ids: Sequence[int]) -> list[Request]:
    """args.num_prompts requests with uniform random lengths in the bounds the args give."""
    import numpy as np

    in_lo, in_hi = length_bounds(args.input_len, args.random_range_ratio, args.input_len_range, "input")
    out_lo, out_hi = length_bounds(args.output_len, args.random_range_ratio, args.output_len_range, "output")
    rng = np.random.default_rng(args.seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(skip_ids, dtype=np.int64))
    in_lens = rng.integers(in_lo, in_hi + 1, size=args.num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, size=args.num_prompts)
    return [Request(allowed[rng.integers(0, len(allowed), size=int(n))].tolist(), int(o))
            for n, o in zip(in_lens, out_lens)]


def workload_fields(requests: Sequence[Request]) -> dict:
    ins, outs = [len(r.prompt_token_ids) for r in requests], [r.output_len for r in requests]
    return {"num_prompts": len(requests), "input_len_min": min(ins), "input_len_max": max(ins),
            "output_len_min": min(outs), "output_len_max": max(outs),
            "num_prompt_tokens": sum(ins), "num_requested_output_tokens": sum(outs)}


def device_name() -> str:
    """The GPU's name as torch reports it, read through nvidia-smi where possible so this process makes
    no CUDA context next to the engine's worker; "CPU" without a GPU."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[0]
            if out.strip():
                return out.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def finish(summary: dict, output_json: str | None, script: str, argv: Sequence[str] | None) -> dict:
    """Adds card, date and the command line (`script` with `argv`, default sys.argv[1:]); prints the
    one-line JSON summary; writes it to output_json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = ["python", os.path.relpath(script, os.path.dirname(os.path.dirname(os.path.abspath(script))))] + argv
    summary = {**summary, "card": device_name(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in command)}
    line = json.dumps(summary)
    print("SUMMARY " + line, flush=True)
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w") as f:
            f.write(line + "\n")
    return summary


def add_engine_args(p: argparse.ArgumentParser, max_model_len_help: str) -> None:
    g = p.add_argument_group("pagedserve engine (LLM() keywords, vLLM's names)")
    g.add_argument("--max-model-len", type=int, default=None, help=max_model_len_help)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--attention-backend", default=None, help="torch, triton or auto (the engine's default)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (passed to LLM only when set)")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LLM() keyword; VALUE is parsed as JSON when it can be")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keywords from the flags (max_model_len aside); flags left unset are not passed."""
    kwargs = dict(load_format=args.load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
                  enable_prefix_caching=args.enable_prefix_caching)
    for name in ("max_num_batched_tokens", "attention_backend", "block_size"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kwargs[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.replace("-", "_")] = value
    return kwargs


def add_hf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transformers baseline (--backend hf)")
    g.add_argument("--hf-attn-implementation", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    g.add_argument("--device", default="auto", help="device of the hf backend: auto (cuda if available), cuda, cpu")


def load_hf_model(model: str, dtype: str, load_format: str, device: str, attn_implementation: str):
    """transformers' model for the checkpoint, on `device` in `dtype`. With load_format "dummy" it is built
    from config.json with random weights directly on the device (no safetensors needed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, read_config(model), device)
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(model)
        config._attn_implementation = attn_implementation
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype,
                                                  attn_implementation=attn_implementation).to(device)
    return hf.eval(), torch.device(device)


def resolve_dtype(dtype: str, config: dict, device: str):
    """pagedserve's rule: "auto" is float32 on the CPU and the checkpoint's dtype (bf16 if unsaid) on a GPU."""
    import torch

    if dtype == "auto":
        dtype = "float32" if device == "cpu" else (config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return {"half": torch.float16, "float": torch.float32}.get(dtype) or getattr(torch, dtype)


def hf_generation_kwargs(tokenizer_pad_id: int | None, num_tokens: int, temperature: float) -> dict:
    """generate() arguments for exactly num_tokens new tokens (EOS suppressed until then), greedy at
    temperature 0, plain sampling otherwise (no top-k / top-p from generation_config.json)."""
    kwargs = dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, pad_token_id=tokenizer_pad_id,
                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    return kwargs


def rotating_weights(n: int, k: int, max_copies: int, device, dtype) -> list:
    """Copies of a random [n, k] weight, enough for 256 MB (at least 2, at most max_copies): timed calls
    that rotate through them read each weight from HBM, never from a 50 MB L2."""
    import math

    import torch

    copies = max(2, min(max_copies, math.ceil(256e6 / (n * k * dtype.itemsize))))
    return [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5 for _ in range(copies)]


def time_us(call, iters: int, device) -> float:
    """Mean microseconds of call(0), ..., call(iters - 1), after one warm-up call (Triton compiles then).
    On CUDA the calls are captured into one graph and replayed, so launch overhead counts as it does in
    the engine's decode graphs; on CPU they simply run."""
    import time

    import torch

    call(0)
    if device.type != "cuda":
        start = time.perf_counter()
        for i in range(iters):
            call(i)
        return (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def cuda_sync() -> None:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str = "auto", gib: float = 2.0, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), best of `repeats` copies of a
    `gib` GiB random buffer (a quarter of that on the CPU). Call it in a child process beside a running
    engine (see run_in_child), so this process keeps no CUDA context or cached memory."""
    import time

    import torch

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    nbytes = int(gib * 2**30) if device != "cpu" else int(gib * 2**28)
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)  # random: zeros can copy faster
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy is a warm-up
        if device == "cpu":
            start = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - start
        else:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        best = min(best, seconds)
    return 2 * nbytes / best


def run_in_child(fn, *args):
    """fn(*args) in a fresh spawned process (its CUDA context and memory go with it)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
