"""Offline throughput, like `vllm bench throughput`: N requests of random token ids, ignore_eos, one call.

    python scripts/bench_throughput.py --model /tmp/llama8b --load-format dummy \\
        --num-prompts 1000 --input-len 1024 --output-len 128
    python scripts/bench_throughput.py --model /tmp/qwen3 --load-format dummy --num-prompts 256 \\
        --input-len-range 100 1024 --output-len-range 100 1024
    python scripts/bench_throughput.py --backend hf --model /tmp/llama8b --num-prompts 64 --hf-batch-size 32 ...

--backend pagedserve runs frontend.LLM in this process (the engine's processes beside it) and times one
generate() over all requests, after a short warm-up on other prompts (so prefix caching cannot reuse it).
--backend hf runs transformers' generate() on the same checkpoint and requests in static batches of
--hf-batch-size, left-padded, each batch forced to its longest requested output (min_new_tokens =
max_new_tokens); only the requested tokens are counted, as a static-batching server whose requests stop at
EOS would deliver them. Total tokens = prompt tokens + output tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def default_max_model_len(args: argparse.Namespace, requests: list[bc.Request]) -> int:
    need = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    if args.max_model_len is not None:
        if args.max_model_len < need:
            raise SystemExit(f"error: --max-model-len {args.max_model_len} < longest request ({need} tokens)")
        return args.max_model_len
    limit = bc.read_config(args.model).get("max_position_embeddings") or need
    return max(need, min(4096, limit))


def run_pagedserve(args: argparse.Namespace, requests: list[bc.Request], warmup: list[bc.Request]) -> dict:
    from frontend import LLM, SamplingParams

    def params(r: bc.Request) -> SamplingParams:
        return SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=args.temperature)

    start = time.perf_counter()
    llm = LLM(args.model, max_model_len=default_max_model_len(args, requests), **bc.engine_kwargs(args))
    startup_s = time.perf_counter() - start
    try:
        if warmup:
            llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warmup], [params(r) for r in warmup],
                         use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                               [params(r) for r in requests], use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    short = sum(p < r.output_len for p, r in zip(produced, requests))
    if short:
        print(f"warning: {short} requests stopped before their output length", file=sys.stderr)
    return {"elapsed_s": elapsed, "startup_s": startup_s, "num_output_tokens": sum(produced)}


def run_hf(args: argparse.Namespace, requests: list[bc.Request], warmup: list[bc.Request]) -> dict:
    import torch
    from transformers import AutoTokenizer

    start = time.perf_counter()
    model, device = bc.load_hf_model(args.model, args.dtype, args.load_format, args.device,
                                     args.hf_attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    startup_s = time.perf_counter() - start

    def run_batch(batch: list[bc.Request]) -> int:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        num_new = max(r.output_len for r in batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **bc.hf_generation_kwargs(pad_id, num_new, args.temperature))
        assert out.shape[1] == width + num_new, (out.shape, width, num_new)
        return num_new * len(batch)

    if warmup:
        run_batch(warmup[: args.hf_batch_size])
    bc.cuda_sync()
    start, generated = time.perf_counter(), 0
    for i in range(0, len(requests), args.hf_batch_size):
        generated += run_batch(requests[i: i + args.hf_batch_size])
    bc.cuda_sync()
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "startup_s": startup_s, "hf_batch_size": args.hf_batch_size,
            "num_output_tokens": sum(r.output_len for r in requests), "hf_generated_tokens": generated,
            "hf_output_lengths": "each static batch runs to its longest request; only requested tokens counted"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = bc.read_config(args.model)
    specials = bc.special_token_ids(args.model)
    requests = bc.make_requests(args, config["vocab_size"], specials)
    warm_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1, "num_prompts": args.num_warmup_prompts})
    warmup = [bc.Request(r.prompt_token_ids, min(r.output_len, 8))
              for r in bc.make_requests(warm_args, config["vocab_size"], specials)] if args.num_warmup_prompts else []
    run = run_pagedserve if args.backend == "pagedserve" else run_hf
    result = run(args, requests, warmup)
    elapsed, workload = result["elapsed_s"], bc.workload_fields(requests)
    total_tokens = workload["num_prompt_tokens"] + result["num_output_tokens"]
    summary = {"benchmark": "throughput", "backend": args.backend, "model": args.model,
               "architecture": (config.get("architectures") or ["?"])[0], "num_layers": config["num_hidden_layers"],
               "load_format": args.load_format, "dtype": args.dtype, "temperature": args.temperature, **workload,
               **result, "requests_per_s": len(requests) / elapsed, "total_tokens_per_s": total_tokens / elapsed,
               "output_tokens_per_s": result["num_output_tokens"] / elapsed}
    if args.backend == "pagedserve":
        summary["engine_args"] = bc.engine_kwargs(args)
    print(f"Elapsed: {elapsed:.2f} s (start-up {result['startup_s']:.1f} s, not counted)")
    print(f"Throughput: {summary['requests_per_s']:.2f} requests/s, {summary['total_tokens_per_s']:.2f} total tokens/s, "
          f"{summary['output_tokens_per_s']:.2f} output tokens/s")
    return bc.finish(summary, args.output_json, __file__, argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bc.base_parser(__doc__)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else plain sampling")
    p.add_argument("--num-warmup-prompts", type=int, default=8, help="warm-up requests before timing (other prompts)")
    p.add_argument("--output-json", help="also write the JSON summary here")
    p.add_argument("--disable-tqdm", action="store_true")
    bc.add_workload_args(p, input_len=1024, output_len=128)
    bc.add_engine_args(p, max_model_len_help="default: max(longest request, min(4096, model's))")
    bc.add_hf_args(p)
    p.add_argument("--hf-batch-size", type=int, default=32, help="static batch size of --backend hf")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
