"""Tensor parallelism end to end: LLM(tensor_parallel_size=N) with one worker process per rank
(gloo on CPU), compared with transformers' greedy output, which TP=1 reproduces exactly
(tests/frontend/test_llm.py); sampled outputs, logprobs and penalties equal one rank's. Also: a dead
rank kills the engine cleanly, and two "nodes" on loopback (node 0: LLM; node 1: python -m
gpu_workers.node) serve as one engine.

Engine starts dominate the run time (each rank imports torch on a 2-core CI machine), so each test
starts one engine and covers a different split: Llama with KV heads split (tp 2), Qwen2 with KV
heads replicated and tied embeddings (tp 4), Qwen3 across two nodes (tp 2), SmolLM2 (tp 3)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from frontend import LLM, EngineDeadError, SamplingParams
from tests.checkpoints import make_tiny_checkpoint
from tests.frontend.test_llm import PROMPTS, hf_greedy, token_ids

REPO = str(Path(__file__).resolve().parents[2])
GREEDY = SamplingParams(temperature=0, max_tokens=12)
# 8 query heads; vocab 387 is divisible by no tp > 1 (padded vocabulary shards).
HEADS = dict(hidden_size=128, num_attention_heads=8, intermediate_size=256, num_hidden_layers=2, vocab_size=387)


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_e2e")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama", num_key_value_heads=4, **HEADS),
        # 2 KV heads at tp 4: each replicated on two ranks; tied embeddings share the vocab shard.
        "qwen2": make_tiny_checkpoint("qwen2", root / "qwen2", num_key_value_heads=2,
                                      tie_word_embeddings=True, **HEADS),
        "qwen3": make_tiny_checkpoint("qwen3", root / "qwen3", num_key_value_heads=4, **HEADS),
    }


def _engine_processes(llm: LLM) -> list[psutil.Process]:
    scheduler = psutil.Process(llm.engine.proc.pid)
    return [scheduler, *scheduler.children(recursive=True)]


def test_greedy_on_four_ranks_with_replicated_kv_heads_matches_a_single_rank(tp_checkpoints):
    path = tp_checkpoints["qwen2"]
    with LLM(path, max_model_len=128, tensor_parallel_size=4) as llm:
        assert len(_engine_processes(llm)) == 1 + 4
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], GREEDY.max_tokens)


# Every way the sampling rank uses logits gathered from the vocab shards (greedy tokens alone take
# each rank's best instead): seeded top-p/top-k sampling with logprobs, penalties over the token
# history, n > 1, logit_bias with min_tokens, prompt logprobs.
SAMPLED = [
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=10, logprobs=3),
    SamplingParams(temperature=1.0, seed=3, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.3,
                   repetition_penalty=1.2),
    SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=8, min_tokens=4, logit_bias={5: 3.0}, logprobs=2, prompt_logprobs=2),
]


def _assert_same_samples(got, want) -> None:
    """Same tokens and texts; logprobs equal up to float32 sums taken in another order (the
    vocab-parallel LM head and the row-parallel layers add the ranks' partial sums)."""
    for a, b in zip(got, want):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
        pairs = [(x.logprobs, y.logprobs) for x, y in zip(a.outputs, b.outputs)]
        for rows_a, rows_b in pairs + [(a.prompt_logprobs, b.prompt_logprobs)]:
            assert (rows_a is None) == (rows_b is None)
            for ra, rb in zip(rows_a or [], rows_b or []):
                assert (ra is None) == (rb is None)
                if ra is not None:
                    assert ra.keys() == rb.keys()
                    assert all(abs(ra[t].logprob - rb[t].logprob) < 1e-4 and ra[t].rank == rb[t].rank for t in ra)
    assert got[3].outputs[0].logprobs and got[3].prompt_logprobs[1]  # the checks above had rows to compare


def test_two_ranks_match_one_greedy_and_sampled_then_a_dead_rank_ends_the_engine(tp_checkpoints):
    # One engine for all three checks: each start costs seconds of CI time on two cores.
    path = tp_checkpoints["llama"]
    with LLM(path, max_model_len=128) as single:
        want = single.generate(PROMPTS, SAMPLED, use_tqdm=False)
    llm = LLM(path, max_model_len=128, tensor_parallel_size=2)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], GREEDY.max_tokens)
    _assert_same_samples(llm.generate(PROMPTS, SAMPLED, use_tqdm=False), want)

    procs = _engine_processes(llm)
    rank1 = [p for p in procs if p.cmdline()[-1] == "1" and "gpu_workers" in " ".join(p.cmdline())]
    assert len(procs) == 3 and len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank"):
        llm.generate(PROMPTS * 4, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert alive == []
    llm.shutdown()


def test_default_model_runs_on_three_ranks(default_model):
    # SmolLM2-135M: 9 query heads and 3 KV heads, one KV head per rank.
    with LLM(max_model_len=128, tensor_parallel_size=3) as llm:
        outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert token_ids(outs) == hf_greedy(default_model, [o.prompt_token_ids for o in outs], 4)


def test_unsupported_split_fails_before_any_process_starts(tp_checkpoints):
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide num_attention_heads 8"):
        LLM(tp_checkpoints["llama"], tensor_parallel_size=3)
    with pytest.raises(ValueError, match="master_port"):
        LLM(tp_checkpoints["llama"], tensor_parallel_size=2, nnodes=2)
    assert set(psutil.Process().children(recursive=True)) == before


def _free_port() -> int:
    # master_port + 1 (the scheduler's port) must be free too.
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def test_two_nodes_on_loopback_serve_as_one_engine(tp_checkpoints, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both "hosts" are this one
    path, port = tp_checkpoints["qwen3"], _free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "gpu_workers.node", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port)],
        env={**os.environ, "PYTHONPATH": REPO})
    try:
        with LLM(path, max_model_len=128, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1",
                 master_port=port) as llm:
            # Node 0 runs only rank 0; rank 1 is the agent's child.
            assert len(_engine_processes(llm)) == 2
            assert len(psutil.Process(node1.pid).children()) == 1
            outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert node1.wait(timeout=30) == 0  # the engine's shutdown reached the other node
    finally:
        if node1.poll() is None:
            node1.kill()
    assert token_ids(outs) == hf_greedy(path, [o.prompt_token_ids for o in outs], GREEDY.max_tokens)
