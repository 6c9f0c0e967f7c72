"""Overlapped steps (gpu_workers/worker.py): a worker launches step n+1 before step n's tokens reach the
host, feeding them to step n+1 on the device. On CUDA this is the default; PAGEDSERVE_OVERLAP_STEPS=1
turns it on here on the CPU, so the same code path is checked against transformers and against the
step-by-step path, through the real processes."""

from __future__ import annotations

import json

import pytest

from frontend import LLM, SamplingParams
from tests.frontend.test_llm import PROMPTS, hf_greedy, token_ids


def run(path, prompts, params, monkeypatch, tmp_path, overlap: bool, **engine_args):
    """Generate with overlap on or off; returns (outputs, the worker's step counters)."""
    timing = tmp_path / f"timing-{int(overlap)}.json"
    monkeypatch.setenv("PAGEDSERVE_OVERLAP_STEPS", "1" if overlap else "0")
    monkeypatch.setenv("PAGEDSERVE_STEP_TIMING", str(timing))
    with LLM(path, max_model_len=128, **engine_args) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, json.loads(timing.read_text())  # written by the worker at shutdown


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_overlapped_greedy_matches_transformers_under_preemption_and_chunking(tiny_checkpoints, arch,
                                                                             monkeypatch, tmp_path):
    path = tiny_checkpoints[arch]
    prompts = [p * (1 + i % 2) for i, p in enumerate(PROMPTS * 2)]
    outs, timing = run(path, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), monkeypatch,
                       tmp_path, True, block_size=4, num_gpu_blocks_override=32, max_num_batched_tokens=16,
                       enable_prefix_caching=False)
    assert timing["n_overlapped"] > 20  # most decode steps were launched behind the previous one
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], 20)


def test_overlapped_tensor_parallel_ranks_stay_in_step(tiny_checkpoints, monkeypatch, tmp_path):
    """Each rank decides alone whether the next plan came before its running step ended; the ranks'
    collectives must still pair up, and the tokens must equal transformers'."""
    path = tiny_checkpoints["llama"]
    prompts = [p * (1 + i % 2) for i, p in enumerate(PROMPTS * 2)]
    outs, timing = run(path, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), monkeypatch,
                       tmp_path, True, tensor_parallel_size=2, block_size=4, num_gpu_blocks_override=32,
                       max_num_batched_tokens=16, enable_prefix_caching=False)
    assert timing["n_overlapped"] > 10
    rank1 = json.loads((tmp_path / "timing-1.json.rank1").read_text())  # each rank writes its own file
    assert rank1["n_launch"] == timing["n_launch"]  # both ranks ran every step
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], 16)


def test_overlap_keeps_every_sampling_feature(tiny_checkpoints, monkeypatch, tmp_path):
    """Seeded sampling, penalties (which need the token history, so those steps wait), min_tokens,
    logprobs, n > 1 and stop strings give the same outputs with and without overlap."""
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=16, logprobs=2),
        SamplingParams(temperature=1.0, seed=5, max_tokens=12, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, min_tokens=6, prompt_logprobs=1),
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
    ]
    path = tiny_checkpoints["llama"]
    on, timing = run(path, PROMPTS, params, monkeypatch, tmp_path, True)
    off, _ = run(path, PROMPTS, params, monkeypatch, tmp_path, False)
    assert timing["n_overlapped"] > 0
    for a, b in zip(on, off):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
        assert [o.finish_reason for o in a.outputs] == [o.finish_reason for o in b.outputs]
    # Batches differ in composition between the runs, so float32 sums differ in the last bits.
    for got, want in [(on[0].outputs[0].logprobs, off[0].outputs[0].logprobs),
                      (on[2].prompt_logprobs[1:], off[2].prompt_logprobs[1:])]:
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
    assert len(on[2].outputs[0].token_ids) >= 6
