"""Batch-1 latency: first-token time, decode ms per output token, and the weight-bandwidth floor.

    python scripts/bench_latency.py --model /tmp/llama8b --load-format dummy --input-len 128 --output-len 512
    python scripts/bench_latency.py --backend hf --model /tmp/llama8b --load-format dummy --num-iters 1

Each iteration runs one request twice on a fresh random prompt (so no prefix-cache hit helps): with
max_tokens=1 (the first-token latency, prefill included) and with max_tokens=O (end to end). The decode
part is (end to end - first token) / (O - 1) per token; the medians over --num-iters are reported.

The floor is what one decode step must cost if it only streams the weights once:
weight bytes (every parameter of config.json's shapes, tied embeddings once, in the run's dtype) divided
by the copy bandwidth measured here (a large device-to-device copy_, bytes read + written, best of
several), and by the tensor-parallel size (each GPU streams its share at once; the copy bandwidth is one
GPU's). fraction_of_floor = floor / decode time (1.0 = at the floor).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from make_random_checkpoint import weight_bytes  # noqa: E402


class Timer:
    """Times one request (prompt ids, number of new tokens) end to end on a backend."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self, prompt: list[int], num_tokens: int) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PagedServeTimer(Timer):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        from frontend import LLM
        max_len = args.max_model_len or args.input_len + max(args.output_len, args.warmup_output_len)
        self.llm = LLM(args.model, max_model_len=max_len, **bc.engine_kwargs(args))

    def __call__(self, prompt: list[int], num_tokens: int) -> float:
        from frontend import SamplingParams
        params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, temperature=self.args.temperature)
        start = time.perf_counter()
        out = self.llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert len(out[0].outputs[0].token_ids) == num_tokens, "ignore_eos must yield exactly max_tokens"
        return seconds

    def close(self) -> None:
        self.llm.shutdown()


class HfTimer(Timer):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        from transformers import AutoTokenizer
        self.model, self.device = bc.load_hf_model(args.model, args.dtype, args.load_format, args.device,
                                                   args.hf_attn_implementation)
        tok = AutoTokenizer.from_pretrained(args.model)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __call__(self, prompt: list[int], num_tokens: int) -> float:
        import torch
        ids = torch.tensor([prompt], device=self.device)
        bc.cuda_sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      **bc.hf_generation_kwargs(self.pad_id, num_tokens, self.args.temperature))
        bc.cuda_sync()
        seconds = time.perf_counter() - start
        assert out.shape[1] == len(prompt) + num_tokens
        return seconds


def run_dtype_name(args: argparse.Namespace, config: dict) -> str:
    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return str(bc.resolve_dtype(args.dtype, config, device)).removeprefix("torch.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.output_len < 2:
        raise SystemExit("error: --output-len must be >= 2 (the decode part needs a second token)")
    config = bc.read_config(args.model)
    # Before the engine starts, in a child process: this one keeps no CUDA context beside the worker.
    bandwidth = bc.run_in_child(bc.measure_copy_bandwidth, args.device, args.bandwidth_gib)
    dtype = run_dtype_name(args, config)
    specials = bc.special_token_ids(args.model)
    prompts = iter(bc.make_requests(argparse.Namespace(**{**vars(args), "num_prompts": 2 * (args.num_iters + args.num_iters_warmup)}),
                                    config["vocab_size"], specials))
    start = time.perf_counter()
    timer = PagedServeTimer(args) if args.backend == "pagedserve" else HfTimer(args)
    startup_s = time.perf_counter() - start
    try:
        for _ in range(args.num_iters_warmup):
            timer(next(prompts).prompt_token_ids, 1)
            timer(next(prompts).prompt_token_ids, args.warmup_output_len)
        first, total = [], []
        for _ in range(args.num_iters):
            first.append(timer(next(prompts).prompt_token_ids, 1))
            total.append(timer(next(prompts).prompt_token_ids, args.output_len))
    finally:
        timer.close()
    decode = [(t - f) / (args.output_len - 1) for f, t in zip(first, total)]
    decode_ms = statistics.median(decode) * 1e3
    if decode_ms <= 0:
        print("warning: the decode part came out <= 0 (noise larger than decode): use a longer --output-len",
              file=sys.stderr)
    nbytes = weight_bytes(config, dtype)
    tp = getattr(args, "tensor_parallel_size", 1) or 1
    floor_ms = nbytes / tp / bandwidth * 1e3  # each of tp GPUs streams its share of the weights at once
    summary = {"benchmark": "latency", "backend": args.backend, "model": args.model,
               "architecture": (config.get("architectures") or ["?"])[0], "num_layers": config["num_hidden_layers"],
               "load_format": args.load_format, "dtype": dtype, "batch_size": 1, "input_len": args.input_len,
               "output_len": args.output_len, "num_iters": args.num_iters, "startup_s": startup_s,
               "first_token_ms": statistics.median(first) * 1e3, "decode_ms_per_token": decode_ms,
               "e2e_latency_s": statistics.median(total), "weight_bytes": nbytes,
               "copy_bandwidth_gb_per_s": bandwidth / 1e9, "floor_ms_per_token": floor_ms,
               "fraction_of_floor": floor_ms / decode_ms, "iters_first_token_s": first, "iters_e2e_s": total}
    if args.backend == "pagedserve":
        summary["engine_args"] = bc.engine_kwargs(args)
    print(f"First token: {summary['first_token_ms']:.2f} ms (prefill of {args.input_len} tokens)")
    print(f"Decode: {decode_ms:.3f} ms per output token (median of {args.num_iters}); end to end "
          f"{summary['e2e_latency_s']:.3f} s for {args.output_len} tokens")
    share = f" / {tp} GPUs" if tp > 1 else ""
    print(f"Floor: {nbytes / 1e9:.2f} GB of {dtype} weights{share} / {bandwidth / 1e9:.0f} GB/s copy bandwidth = "
          f"{floor_ms:.3f} ms per token; reached {100 * floor_ms / decode_ms:.0f}% of it")
    return bc.finish(summary, args.output_json, __file__, argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bc.base_parser(__doc__)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--num-iters", type=int, default=3, help="timed iterations (each: first token, then end to end)")
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--warmup-output-len", type=int, default=None, help="output tokens of a warm-up run (default: --output-len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer size of the copy-bandwidth measurement")
    p.add_argument("--output-json", help="also write the JSON summary here")
    bc.add_engine_args(p, max_model_len_help="default: input + output length")
    bc.add_hf_args(p)
    args = p.parse_args(argv)
    args.warmup_output_len = args.warmup_output_len or args.output_len
    # make_requests reads the workload fields: fixed lengths.
    args.random_range_ratio, args.input_len_range, args.output_len_range = 0.0, None, None
    return args


if __name__ == "__main__":
    main()
