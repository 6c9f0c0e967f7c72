"""GPU smoke test: our engine (Triton backend, CUDA graphs) against transformers on the same random
checkpoints, then a rough decode timing. Run on the GPU machine:

    python scripts/gpu_smoke.py OUT_DIR [--quick | --wide]

float32 tokens must be identical, and sampled rows (the Triton sampling kernel) must keep top_k=1 ==
greedy, a seed's tokens whatever the batch, and n>1 outputs distinct (exit status 1 otherwise); bf16
greedy tokens are reported. --quick: float32 greedy and the sampling check, no timing. --wide: only
float32 greedy of 32 prompts at once on hidden-2048 checkpoints (the decode GEMV launches; check_wide)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend import LLM, SamplingParams  # noqa: E402
from tests.checkpoints import make_tiny_checkpoint  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, there was a small model " * 5, "1 2 3"]


def hf_greedy(path, prompt_ids, n, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
        outs.append(gen[0, len(ids):].tolist())
    del model
    torch.cuda.empty_cache()
    return outs


def check(path, dtype, eager, results):
    with LLM(path, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=eager,
             attention_backend="triton") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    ref = hf_greedy(path, [o.prompt_token_ids for o in outs], 32, getattr(torch, dtype))
    key = f"{Path(path).name}-{dtype}-{'eager' if eager else 'graphs'}"
    results[key] = compare(ours, ref)
    print(key, results[key], flush=True)


def compare(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """How far our token sequences agree with transformers'."""
    return {"identical_sequences": sum(x == y for x, y in zip(ours, ref)), "of": len(ref),
            "same_tokens": sum(a == b for x, y in zip(ours, ref) for a, b in zip(x, y)),
            "total": sum(len(y) for y in ref)}


def check_wide(root: Path, results) -> None:
    """float32 greedy tokens of 32 prompts decoded together against transformers, on random checkpoints
    wide enough (hidden 2048) for a decode step's GEMV launches at 32 rows: qkv with RoPE and the K/V
    write in its epilogue (kernels.qkv_rope.takes_qkv_rope; 8 KV heads, so decode attention does not take
    the RoPE itself), o_proj and down_proj on row_parallel_gemv (takes_row_parallel), gate_up +
    SiLU-and-mul as one gated launch (takes_gated). Qwen2 adds qkv biases."""
    wide = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=4096, initializer_range=0.05)
    prompts = [[3 + (i * 37 + j * 11) % 4000 for j in range(5 + i % 13)] for i in range(32)]
    for arch in ("llama", "qwen2"):
        path = make_tiny_checkpoint(arch, root / f"wide-{arch}", **wide)
        with LLM(path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                 attention_backend="triton") as llm:
            outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                                SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        ours = [o.outputs[0].token_ids for o in outs]
        key = f"wide-{arch}-float32-b32"
        results[key] = compare(ours, hf_greedy(path, prompts, 24, torch.float32))
        print(key, results[key], flush=True)


def check_sampling(path, results):
    """Random rows through the engine (the Triton sampling kernel on CUDA): top_k=1 gives the greedy
    tokens, a seeded request samples the same alone and beside others, and n=3 outputs differ."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True)
    forked = SamplingParams(n=3, temperature=1.0, min_p=0.01, seed=3, max_tokens=24, ignore_eos=True)
    with LLM(path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,  # float32: no tied maxima
             attention_backend="triton") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
        top = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, top1, use_tqdm=False)]
        alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
        batch = llm.generate(PROMPTS[:3], [greedy, seeded, forked], use_tqdm=False)
    results["sampling"] = {"top_k_1_equals_greedy": top == ref, "seeded_same_in_a_batch": batch[1].outputs[0].token_ids == alone,
                           "n3_outputs_distinct": len({tuple(o.token_ids) for o in batch[2].outputs}) > 1}
    print("sampling", results["sampling"], flush=True)


def timing(path, results):
    with LLM(path, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5,
             attention_backend="triton") as llm:
        for bs in (1, 32, 128):
            prompts = [{"prompt_token_ids": [5 + i % 50] * 64} for i in range(bs)]
            params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
            results[f"timing-bs{bs}"] = {"s": dt, "ms_per_step": dt / 128 * 1000, "out_tok_s": bs * 128 / dt}
            print(f"bs={bs}", results[f"timing-bs{bs}"], flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--quick", "--wide")]
    quick = "--quick" in sys.argv[1:]
    out = Path(args[0] if args else "/tmp/smoke")
    out.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    root = Path("/tmp/ckpt")
    if "--wide" in sys.argv[1:]:
        check_wide(root, results)
        (out / "smoke.json").write_text(json.dumps(results, indent=1))
        sys.exit(0 if all(v["identical_sequences"] == v["of"] for v in results.values() if isinstance(v, dict)) else 1)
    paths = {a: make_tiny_checkpoint(a, root / a) for a in ("llama", "qwen3")}
    for arch, path in paths.items():
        check(path, "float32", False, results)
        check(path, "float32", True, results)
        if not quick:
            check(path, "bfloat16", False, results)
    check_sampling(paths["llama"], results)
    float32 = {k: v for k, v in results.items() if "-float32-" in k}
    results["float32_identical"] = all(v["identical_sequences"] == v["of"] for v in float32.values())
    ok = results["float32_identical"] and all(results["sampling"].values())
    print("float32 identical to transformers:", results["float32_identical"], flush=True)
    if quick:
        (out / "smoke.json").write_text(json.dumps(results, indent=1))
        sys.exit(0 if ok else 1)
    mid = make_tiny_checkpoint("llama", root / "mid", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=8192,
                               max_position_embeddings=2048)
    timing(mid, results)
    (out / "smoke.json").write_text(json.dumps(results, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
