"""End to end through real processes: LLM -> scheduler process -> worker process, compared with
transformers' own generate on the same float32 checkpoint."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from frontend import LLM, EngineDeadError, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, there was a small model that liked to generate text about paged attention",
    "1 2 3",
]


def hf_greedy(path: str, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' generate, one prompt at a time (no padding), greedy, float32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        outs.append(gen[0, len(ids):].tolist())
    return outs


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llama_llm(tiny_checkpoints):
    with LLM(tiny_checkpoints["llama"], max_model_len=256) as llm:
        yield llm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_on_random_checkpoints(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    with LLM(path, max_model_len=256) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], 24)
    for out in outs:
        assert out.outputs[0].finish_reason in ("stop", "length")


def test_greedy_matches_transformers_on_the_default_model(default_model):
    with LLM(max_model_len=512) as llm:  # model=None: the bundled SmolLM2-135M-Instruct
        assert llm.model_path == default_model
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert token_ids(outs) == hf_greedy(default_model, [o.prompt_token_ids for o in outs], 16)
    assert "Paris" in outs[1].outputs[0].text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_preemption_and_chunked_prefill_keep_greedy_outputs(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    prompts = [p * (1 + i % 2) for i, p in enumerate(PROMPTS * 2)]
    # 32 blocks of 4 slots (one max_model_len request) for 8 requests of ~25-110 tokens: the pool
    # must preempt. A budget of 16 tokens per step chunks every long prompt.
    with LLM(path, max_model_len=128, block_size=4, num_gpu_blocks_override=32,
             max_num_batched_tokens=16, enable_prefix_caching=False) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                            use_tqdm=False)
        stats = llm.engine.stats
    assert stats.num_preemptions > 0
    expected = hf_greedy(path, [o.prompt_token_ids for o in outs], 20)
    assert token_ids(outs) == expected


def test_outputs_keep_input_order_and_token_prompts(llama_llm):
    tok = llama_llm.get_tokenizer()
    ids = tok.encode(PROMPTS[2])
    outs = llama_llm.generate([PROMPTS[0], {"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=5),
                              use_tqdm=False)
    assert outs[0].prompt == PROMPTS[0]
    assert outs[1].prompt_token_ids == ids and outs[1].prompt is None
    solo = llama_llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert outs[1].outputs[0].token_ids == solo[0].outputs[0].token_ids


def test_text_is_the_detokenized_tokens(llama_llm):
    outs = llama_llm.generate(PROMPTS, SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True),
                              use_tqdm=False)
    tok = llama_llm.get_tokenizer()
    for out in outs:
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        assert len(out.outputs[0].token_ids) == 30 and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llama_llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llama_llm.generate(PROMPTS, [others, params, others, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llama_llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12,
                                                               ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_returns_distinct_samples_sharing_the_prompt(llama_llm):
    outs = llama_llm.generate(PROMPTS[2], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
                              use_tqdm=False)
    samples = outs[0].outputs
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in samples}) > 1
    assert all(len(s.token_ids) == 10 for s in samples)
    again = llama_llm.generate(PROMPTS[2], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10,
                                                          ignore_eos=True), use_tqdm=False)
    assert [s.token_ids for s in again[0].outputs] == [s.token_ids for s in samples]


def test_repeated_prompt_reports_cached_tokens(llama_llm):
    prompt = "A prompt no other test sends, repeated to fill blocks. " * 4  # several 16-token blocks
    first = llama_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    second = llama_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens > 0 and second.num_cached_tokens % 16 == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_stop_strings_cut_the_text(llama_llm):
    free = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    stop = free.text[5:8]
    out = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop),
                             use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    kept = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                         include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llama_llm):
    free = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = llama_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                        stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_logprobs_match_transformers(llama_llm, tiny_checkpoints):
    from transformers import AutoModelForCausalLM
    out = llama_llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2),
                             use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)  # [seq, vocab]
    n = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for pos in range(1, n):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-4
        assert len(entry) <= 3
    for step, entry in enumerate(out.outputs[0].logprobs):
        token = out.outputs[0].token_ids[step]
        row = ref[n - 1 + step]
        assert abs(entry[token].logprob - row[token].item()) < 1e-4
        assert entry[token].rank == 1  # greedy picks the top token
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(entry)
    assert abs(out.outputs[0].cumulative_logprob - sum(e[t].logprob for e, t in
                                                       zip(out.outputs[0].logprobs, out.outputs[0].token_ids))) < 1e-5


def test_allowed_token_ids_match_transformers_prefix_allowed_tokens(llama_llm, tiny_checkpoints):
    from transformers import AutoModelForCausalLM
    allowed = sorted(torch.randperm(llama_llm.vocab_size)[:20].tolist())
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    outs = llama_llm.generate(PROMPTS[:2], params, use_tqdm=False)  # one constrained row, one free, one batch
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    ids = outs[0].prompt_token_ids
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             prefix_allowed_tokens_fn=lambda batch, seq: allowed)
    assert outs[0].outputs[0].token_ids == gen[0, len(ids):].tolist()
    assert outs[1].outputs[0].token_ids == hf_greedy(tiny_checkpoints["llama"], [outs[1].prompt_token_ids], 12)[0]
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llama_llm.generate(PROMPTS[0], SamplingParams(allowed_token_ids=[llama_llm.vocab_size]), use_tqdm=False)


def test_chat_applies_the_template(llama_llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llama_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    text = llama_llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text
    assert out.prompt_token_ids == llama_llm.get_tokenizer().encode(text, add_special_tokens=False)

    messages = [*messages, {"role": "assistant", "content": "Hi, I am"}]
    out = llama_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False,
                         add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("Hi, I am") and out.prompt == llama_llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ValueError, match="continue_final_message"):
        llama_llm.chat(messages, use_tqdm=False, continue_final_message=True)


def test_bad_input_fails_with_the_cause(llama_llm, tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="max_model_len"):
        llama_llm.generate("hi " * 300, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama_llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    # The engine keeps serving after the rejected requests.
    assert llama_llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))


def test_unsupported_architecture_is_named(tiny_checkpoints, tmp_path):
    import json
    import shutil
    path = tmp_path / "gpt"
    shutil.copytree(tiny_checkpoints["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM"):
        LLM(str(path))


def _engine_processes(llm: LLM) -> list[psutil.Process]:
    scheduler = psutil.Process(llm.engine.proc.pid)
    return [scheduler, *scheduler.children(recursive=True)]


def test_killing_a_worker_raises_in_the_caller_and_leaves_no_process(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], max_model_len=256)
    procs = _engine_processes(llm)
    workers = [p for p in procs if "gpu_workers" in " ".join(p.cmdline())]
    assert len(procs) == 2 and len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="worker"):
        llm.generate(PROMPTS * 4, SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 10
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert alive == []
    with pytest.raises(EngineDeadError):
        llm.generate("again", use_tqdm=False)
    llm.shutdown()


def test_triton_backend_under_the_interpreter_matches_transformers(tiny_checkpoints, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the worker inherits it: Triton kernels run on the CPU
    monkeypatch.setenv("PAGEDSERVE_TRITON_ELEMENTWISE", "1")  # and the fused elementwise kernels, as on CUDA
    path = tiny_checkpoints["qwen3"]
    # A 16-token budget chunks the longest prompt, so its chunks run beside the others' decodes (mixed steps).
    with LLM(path, max_model_len=128, attention_backend="triton", max_num_batched_tokens=16) as llm:
        outs = llm.generate(PROMPTS[:2] + [PROMPTS[2] * 2], SamplingParams(temperature=0, max_tokens=6),
                            use_tqdm=False)
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], 6)


def test_triton_sampling_under_the_interpreter_keeps_seeds_and_top_k(tiny_checkpoints, monkeypatch):
    """The CUDA sampling path (kernels/sampling.py) through the real engine: top_k=1 is transformers'
    greedy, a seeded request samples the same alone and in a batch, and n > 1 outputs differ."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PAGEDSERVE_TRITON_SAMPLING", "1")
    path = tiny_checkpoints["llama"]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=8, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True)
    forked = SamplingParams(n=3, temperature=1.0, min_p=0.01, seed=5, max_tokens=8, ignore_eos=True)
    with LLM(path, max_model_len=128) as llm:
        alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
        batch = llm.generate(PROMPTS[:3], [top1, seeded, forked], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert token_ids(batch[:1]) == hf_greedy(path, [batch[0].prompt_token_ids], 8)
    assert len({tuple(o.token_ids) for o in batch[2].outputs}) > 1


def test_killing_the_scheduler_raises_in_the_caller_and_leaves_no_process(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], max_model_len=256)
    procs = _engine_processes(llm)
    os.kill(llm.engine.proc.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="scheduler"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=50), use_tqdm=False)
    gone, alive = psutil.wait_procs(procs, timeout=10)  # the worker dies with its parent
    assert alive == []
    llm.shutdown()


def test_repetition_penalty_matches_transformers(llama_llm, tiny_checkpoints):
    from transformers import AutoModelForCausalLM
    path = tiny_checkpoints["llama"]
    outs = llama_llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5),
                              use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 repetition_penalty=1.5)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()[:len(out.outputs[0].token_ids)]
    plain = llama_llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert token_ids(plain) != token_ids(outs)  # the penalty changed something
