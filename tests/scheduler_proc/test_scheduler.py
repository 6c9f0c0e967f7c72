"""Scheduler with tiny configs: token budgets, chunked prefill, preemption, fork, finish rules, and
the step plan's diff form. A fake worker samples a fixed token for every request that samples."""

from ipc.messages import Logprobs, StepResult
from ipc.sampling_params import SamplingParams
from scheduler_proc.scheduler import Scheduler


def make(num_blocks=8, block_size=4, max_num_seqs=8, budget=64, max_model_len=32, eos=(99,), caching=True):
    return Scheduler(num_blocks, block_size, max_num_seqs, budget, max_model_len, eos, caching)


def run_step(sched: Scheduler, token=7, tokens=None):
    """Plan a step, then play the worker: every request whose tokens are all computed samples."""
    out = sched.schedule()
    if out.step is None:
        return out, []
    ids, sampled = [], []
    for data in [*out.step.cached_requests, *out.step.new_requests]:
        req = sched.requests[data.request_id]
        if req.num_computed_tokens == req.num_tokens:
            ids.append(req.request_id)
            n = req.num_samples
            sampled.append(tokens[:n] if tokens else [token] * n)
    return out, sched.update(StepResult(out.step.step_id, ids, sampled))


def test_prefill_chunks_under_the_token_budget_and_decodes_go_first():
    sched = make(num_blocks=16, budget=6)
    sched.add_request("a", list(range(10)), SamplingParams(max_tokens=4))
    sched.add_request("b", list(range(3)), SamplingParams(max_tokens=4))
    out, deltas = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 6}  # chunked: 6 of a's 10 prompt tokens
    assert deltas == []
    out, deltas = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 4, "b": 2}  # a finishes its prompt, b starts
    assert [d.request_id for d in deltas] == ["a"]
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}  # a's decode, b's last prompt token
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_max_num_seqs_caps_the_batch():
    sched = make(num_blocks=16, max_num_seqs=2)
    for name in "abc":
        sched.add_request(name, [1, 2, 3], SamplingParams(max_tokens=2))
    out, _ = run_step(sched)
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    assert sched.num_waiting == 1
    run_step(sched)  # a and b finish (max_tokens 2)
    out, _ = run_step(sched)
    assert set(out.num_scheduled_tokens) == {"c"}


def test_plan_sends_a_request_in_full_once_then_only_new_blocks():
    sched = make(caching=False)
    sched.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    out, _ = run_step(sched)
    (new,) = out.step.new_requests
    assert new.prompt_token_ids == [1, 2, 3] and new.block_ids == [0]
    assert new.num_computed_tokens == 0 and new.num_scheduled_tokens == 3
    out, _ = run_step(sched)  # token 3 goes into block 0
    assert out.step.new_requests == []
    (cached,) = out.step.cached_requests
    assert (cached.num_computed_tokens, cached.num_scheduled_tokens, cached.new_block_ids) == (3, 1, [])
    out, _ = run_step(sched)  # token 4 needs block 1
    assert out.step.cached_requests[0].new_block_ids == [1]


def test_finish_on_max_tokens_eos_stop_token_and_ignore_eos():
    sched = make(num_blocks=16)
    sched.add_request("len", [1, 2], SamplingParams(max_tokens=1))
    sched.add_request("len2", [1, 2], SamplingParams(max_tokens=2))
    sched.add_request("eos", [1, 2], SamplingParams(max_tokens=5))
    sched.add_request("ign", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request("stop", [1, 2], SamplingParams(max_tokens=5, stop_token_ids=[99]))
    _, deltas = run_step(sched, token=5)
    assert {d.request_id: d.finish_reason for d in deltas} == {
        "len": "length", "len2": None, "eos": None, "ign": None, "stop": None}
    _, deltas = run_step(sched, token=99)
    reasons = {d.request_id: d.finish_reason for d in deltas}
    # EOS on the last allowed token reports "stop", as in vLLM; ignore_eos runs to the length.
    assert reasons == {"len2": "stop", "eos": "stop", "ign": "length", "stop": "stop"}
    assert not sched.has_work()
    assert sched.block_manager.num_free_blocks == 16


def test_min_tokens_defers_eos():
    sched = make()
    sched.add_request("a", [1, 2], SamplingParams(max_tokens=5, min_tokens=2))
    _, deltas = run_step(sched, token=99)
    assert deltas[0].finish_reason is None
    _, deltas = run_step(sched, token=99)
    assert deltas[0].finish_reason is None
    _, deltas = run_step(sched, token=99)
    assert deltas[0].finish_reason == "stop"


def test_context_limit_finishes_with_length():
    sched = make(max_model_len=8)
    sched.add_request("a", [1] * 6, SamplingParams(max_tokens=None))
    run_step(sched)
    _, deltas = run_step(sched)
    assert deltas[0].finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 8


def test_preempts_the_newest_request_and_recomputes_it_with_its_outputs():
    sched = make(num_blocks=4, max_model_len=16, caching=False)
    sched.add_request("old", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    sched.add_request("new", [5, 6, 7, 8], SamplingParams(max_tokens=8))
    run_step(sched)  # both prefilled: blocks [0] and [1]
    run_step(sched)  # both decode: [0, 2] and [1, 3]; the pool is full
    for _ in range(3):
        out, _ = run_step(sched)
    assert out.preempted == []
    out, _ = run_step(sched)  # old needs a 3rd block: new is preempted
    assert [r.request_id for r in out.preempted] == ["new"]
    assert out.num_scheduled_tokens == {"old": 1}
    assert "new" in out.step.finished_request_ids  # the worker drops its state
    assert sched.waiting[0].request_id == "new" and sched.waiting[0].num_computed_tokens == 0
    while "old" in sched.requests:
        run_step(sched)
    out, _ = run_step(sched)
    (resumed,) = out.step.new_requests  # back in full, outputs included
    assert resumed.request_id == "new"
    assert resumed.prompt_token_ids == [5, 6, 7, 8] and resumed.output_token_ids == [7] * 5
    assert resumed.num_scheduled_tokens == 9
    assert sched.num_preemptions == 1


def test_n_forks_after_prefill_and_copies_the_shared_partial_block():
    sched = make(num_blocks=8)
    sched.add_request("a", [1, 2, 3, 4, 5, 6], SamplingParams(n=3, max_tokens=4, temperature=1.0))
    out, deltas = run_step(sched, tokens=[10, 11, 12])
    assert out.step.new_requests[0].num_samples == 3
    assert [(d.index, d.new_token_ids) for d in deltas] == [(0, [10]), (1, [11]), (2, [12])]
    # Three children share the prompt's two blocks; the parent is gone.
    tables = {rid: sched.block_manager.block_table(rid) for rid in sched.requests}
    assert tables == {"a#0": [0, 1], "a#1": [0, 1], "a#2": [0, 1]}
    out, _ = run_step(sched)
    assert out.step.finished_request_ids == ["a"]
    assert [r.request_id for r in out.step.new_requests] == ["a#0", "a#1", "a#2"]
    # Each child writes position 7 into block 1: two copy it, the last owner writes in place.
    assert out.step.blocks_to_copy == [(1, 2), (1, 3)]
    assert [r.block_ids for r in out.step.new_requests] == [[0, 2], [0, 3], [0, 1]]
    assert [r.output_token_ids for r in out.step.new_requests] == [[10], [11], [12]]


def test_n_uses_fewer_blocks_than_separate_requests():
    forked = make(num_blocks=32, budget=128, max_model_len=64, caching=False)
    forked.add_request("a", list(range(20)), SamplingParams(n=4, max_tokens=3))
    separate = make(num_blocks=32, budget=128, max_model_len=64, caching=False)
    for i in range(4):
        separate.add_request(f"s{i}", list(range(20)), SamplingParams(max_tokens=3))
    for _ in range(2):
        run_step(forked)
        run_step(separate)
    used = lambda s: s.block_manager.num_blocks - s.block_manager.num_free_blocks
    assert used(forked) == 5 + 4  # 5 shared prompt blocks + one tail block per output
    assert used(separate) == 4 * 6


def test_abort_frees_blocks_at_once_and_drops_late_results():
    sched = make()
    sched.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=10))
    out = sched.schedule()
    deltas = sched.abort(["a"])
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("a", "abort")]
    assert sched.block_manager.num_free_blocks == 8
    assert sched.update(StepResult(out.step.step_id, ["a"], [[3]])) == []
    assert not sched.has_work()


def test_repeated_prompt_hits_the_prefix_cache():
    sched = make(num_blocks=16)
    prompt = list(range(1, 11))
    sched.add_request("a", prompt, SamplingParams(max_tokens=1))
    run_step(sched)
    sched.add_request("b", prompt, SamplingParams(max_tokens=1))
    out, deltas = run_step(sched)
    assert out.num_scheduled_tokens == {"b": 2}  # 8 of 10 tokens came from the cache
    assert deltas[0].num_cached_tokens == 8
    assert sched.prefix_hits == 8


def test_prefix_cache_stats_count_a_request_once_however_long_it_waits_for_blocks():
    sched = make(num_blocks=6, max_model_len=24)
    prompt = list(range(1, 11))
    sched.add_request("a", prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    sched.add_request("b", prompt + list(range(20, 30)), SamplingParams(max_tokens=1))  # needs 3 more blocks
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 10}  # b does not fit beside a yet: its lookup is retried
    while sched.has_work():
        run_step(sched)
    assert (sched.prefix_queries, sched.prefix_hits) == (10 + 20, 8)  # b's first 8 tokens hit a's blocks


def test_prompt_logprobs_are_delivered_once_even_after_preemption():
    sched = make(num_blocks=16, budget=4)
    sched.add_request("a", list(range(1, 9)), SamplingParams(max_tokens=2, prompt_logprobs=0))
    lp = Logprobs([1], [-1.0])
    out = sched.schedule()  # positions 0-3 -> prompt positions 0-4
    deltas = sched.update(StepResult(out.step.step_id, [], [], None, ["a"], [[None, lp, lp, lp, lp]], [0]))
    assert len(deltas[0].prompt_logprobs) == 5
    sched._preempt(sched.running.pop())
    out = sched.schedule()  # recomputes positions 0-3: already delivered
    deltas = sched.update(StepResult(out.step.step_id, [], [], None, ["a"], [[None, lp, lp, lp, lp]], [0]))
    assert deltas[0].prompt_logprobs == []
    out = sched.schedule()  # positions 4-7 -> prompt positions 5-7
    deltas = sched.update(StepResult(out.step.step_id, ["a"], [[3]], None, ["a"], [[lp, lp, lp]], [5]))
    assert len(deltas[0].prompt_logprobs) == 3


def test_bad_requests_are_rejected_with_the_cause():
    sched = make(max_model_len=8)
    import pytest
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request("a", list(range(8)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        sched.add_request("b", [], SamplingParams())


def _result(sched, out, tokens):
    """Play the worker for an already planned step: every request in it that samples gets a token."""
    ids = [d.request_id for d in [*out.step.cached_requests, *out.step.new_requests]
           if d.num_computed_tokens + d.num_scheduled_tokens >= len(sched.requests[d.request_id].prompt_token_ids)
           and d.request_id in tokens]
    return StepResult(out.step.step_id, ids, [[tokens[i]] for i in ids])


def test_plans_the_next_step_before_the_previous_result_arrives():
    sched = make(num_blocks=16)
    sched.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3))
    step1 = sched.schedule()
    step2 = sched.schedule()  # a's first token is still in flight: planned as if known
    (c,) = step2.step.cached_requests
    assert (c.num_computed_tokens, c.num_scheduled_tokens) == (3, 1)
    assert [d.new_token_ids for d in sched.update(_result(sched, step1, {"a": 7}))] == [[7]]
    step3 = sched.schedule()
    assert step3.step.cached_requests[0].num_computed_tokens == 4
    sched.update(_result(sched, step2, {"a": 8}))
    # Two outputs are in hand and one in flight: max_tokens=3 is reached without planning a 4th.
    assert sched.schedule().step is None
    deltas = sched.update(_result(sched, step3, {"a": 9}))
    assert deltas[0].finish_reason == "length"
    assert not sched.has_work() and sched.block_manager.num_free_blocks == 16


def test_a_token_sampled_after_eos_is_dropped():
    sched = make(num_blocks=16)
    sched.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    step1, step2 = sched.schedule(), sched.schedule()
    assert sched.update(_result(sched, step1, {"a": 99}))[0].finish_reason == "stop"
    assert sched.update(StepResult(step2.step.step_id, ["a"], [[5]])) == []  # computed in vain
    assert not sched.has_work() and sched.block_manager.num_free_blocks == 16
    assert sched.finished_ids == ["a"]  # the workers drop it with the next plan


def test_a_parent_waits_for_its_samples_before_forking():
    sched = make(num_blocks=16)
    sched.add_request("a", [1, 2, 3], SamplingParams(n=2, max_tokens=3))
    step1 = sched.schedule()
    assert sched.schedule().step is None  # the parent cannot run ahead of its fork
    out = StepResult(step1.step.step_id, ["a"], [[5, 6]])
    assert [d.new_token_ids for d in sched.update(out)] == [[5], [6]]
    assert [r.request_id for r in sched.schedule().step.new_requests] == ["a#0", "a#1"]


def test_a_parent_preempted_while_its_samples_were_in_flight_forks_into_waiting_children():
    sched = make(num_blocks=16)
    sched.add_request("a", [1, 2, 3, 4, 5], SamplingParams(n=2, max_tokens=3))
    step1 = sched.schedule()
    sched._preempt(sched.running.pop())  # memory ran out while the prefill step was running
    deltas = sched.update(StepResult(step1.step.step_id, ["a"], [[5, 6]]))
    assert [(d.index, d.new_token_ids) for d in deltas] == [(0, [5]), (1, [6])]
    assert [r.request_id for r in sched.waiting] == ["a#0", "a#1"] and sched.running == []
    step2 = sched.schedule()
    # Recomputed with their first tokens; the parent's freed full block is a prefix-cache hit.
    assert [(r.request_id, r.output_token_ids, r.num_computed_tokens, r.num_scheduled_tokens)
            for r in step2.step.new_requests] == [("a#0", [5], 4, 2), ("a#1", [6], 4, 2)]
    assert sched.block_manager.num_free_blocks == 16 - 3
