"""The worker's per-request state across steps: the slot-indexed block table that ModelRunner keeps in
step with the plans' diffs (finished requests, preemption, copy-on-write, slot reuse), the step
inputs built from it, and the greedy fast path of sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_workers.input_batch import BlockTable, CachedRequestState, argmax_only, prepare_inputs
from gpu_workers.model_runner import ModelRunner, _plain_greedy
from ipc.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ipc.messages import CachedRequestData, ExecuteStep, NewRequestData
from ipc.sampling_params import SamplingParams

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_block_table_rows_pad_with_zeros_and_reuse_freed_slots():
    table = BlockTable(num_slots=2, max_blocks=2)
    a, b = table.add([5, 6]), table.add([7])
    assert (a, b) == (0, 1)
    table.append(b, [8, 9, 10])  # past the initial width: columns grow
    assert table.rows(np.array([a, b])).tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    c = table.add([11])  # past the initial rows: rows grow
    assert c == 2
    table.free(b)
    assert table.add([12]) == b  # the freed row, with nothing of its old blocks left
    assert table.rows(np.array([b, c])).tolist() == [[12], [11]]
    table.replace(a, [3])
    assert table.rows(np.array([a, b, c])).tolist() == [[3], [12], [11]]
    assert table.table[:, 1:].sum() == 0


@pytest.fixture()
def runner(tiny_checkpoints):
    """A CPU runner of the tiny Qwen3, its block table sized for 2 requests of 8 blocks (so the
    steps below make it grow)."""
    config = EngineConfig(ModelConfig(tiny_checkpoints["qwen3"], max_model_len=32, eos_token_ids=[1]),
                          CacheConfig(block_size=BLOCK_SIZE), SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64))
    return ModelRunner(config)


def new(rid: str, num_tokens: int, block_ids: list[int], num_computed: int = 0, params=GREEDY) -> NewRequestData:
    return NewRequestData(rid, list(range(3, 3 + num_tokens)), [], params, block_ids, num_computed,
                          num_tokens - num_computed)


def step_tables(runner: ModelRunner, step: ExecuteStep) -> tuple[list[list[int]], list[int]]:
    """Apply `step` like ModelRunner.launch does; returns its block tables and slot mapping, after
    checking that the persistent table mirrors every request's block_ids."""
    reqs = runner._update_states(step)
    inputs = prepare_inputs(reqs, runner.block_table, BLOCK_SIZE, runner.device, runner.staging)
    table = runner.block_table
    live = {req.slot: req.block_ids for req in runner.requests.values()}
    assert len(live) == len(runner.requests)  # one row each
    assert sorted(list(live) + table.free_slots) == list(range(len(table.table)))
    for slot, row in enumerate(table.table.tolist()):
        blocks = live.get(slot, [])
        assert row == blocks + [0] * (len(row) - len(blocks))
    return inputs.meta.block_tables.tolist(), inputs.meta.slot_mapping.tolist()


def test_block_table_follows_finishes_preemption_copy_on_write_and_slot_reuse(runner):
    # Step 0: three prompts; the third slot makes the table grow.
    tables, slots = step_tables(runner, ExecuteStep(0, [new("a", 8, [0, 1]), new("b", 5, [2, 9]), new("c", 9, [3, 4, 5])],
                                                    []))
    assert tables == [[0, 1, 0], [2, 9, 0], [3, 4, 5]]
    assert slots[:8] == [0, 1, 2, 3, 4, 5, 6, 7] and slots[8:13] == [8, 9, 10, 11, 36]
    # Step 1: b finished (its row freed and zeroed); a decodes into a new block; d reuses b's row.
    tables, slots = step_tables(runner, ExecuteStep(1, [new("d", 2, [7])],
                                                    [CachedRequestData("a", 8, 1, [6]), CachedRequestData("c", 9, 1)],
                                                    ["b"]))
    assert runner.requests["d"].slot == 1
    assert tables == [[0, 1, 6], [3, 4, 5], [7, 0, 0]]
    assert slots == [24, 21, 28, 29]
    # Step 2: c's table replaced (copy-on-write of its last block); a preempted and recomputed in
    # the same step with fresh blocks (finished, then new); e fills a whole row.
    tables, slots = step_tables(runner, ExecuteStep(
        2, [new("a", 10, [11, 12, 13]), new("e", 30, list(range(14, 22)), num_computed=29)],
        [CachedRequestData("c", 10, 1, [3, 4, 10], replace_block_ids=True), CachedRequestData("d", 2, 1)],
        ["a"]))
    assert tables == [[3, 4, 10] + [0] * 5, [7] + [0] * 7, [11, 12, 13] + [0] * 5, list(range(14, 22))]
    assert slots[:2] == [42, 30] and slots[-1] == 21 * BLOCK_SIZE + 1
    # Step 3: everything finishes; a new request takes a row that held other blocks.
    tables, _ = step_tables(runner, ExecuteStep(3, [new("f", 3, [30])], [], ["a", "c", "d", "e"]))
    assert tables == [[30]]
    assert runner.block_table.table.sum() == 30


def test_step_inputs_mark_sampled_and_fed_rows(runner):
    """Decodes whose token is still on the device are fed from the step in flight; only requests
    whose last known token is computed are sampled (a prefill's middle chunk is not)."""
    reqs = runner._update_states(ExecuteStep(0, [new("p", 12, [0, 1, 2], num_computed=4), new("q", 5, [3, 4])], []))
    reqs[0].num_scheduled_tokens = 4  # a middle chunk: tokens 4..7 of 12
    reqs[1].num_pending, reqs[1].pending_row = 1, 3  # q's 6th token is being sampled in row 3
    reqs[1].num_computed_tokens, reqs[1].num_scheduled_tokens = 5, 1
    inputs = prepare_inputs(reqs, runner.block_table, BLOCK_SIZE, runner.device, runner.staging)
    assert inputs.input_ids.tolist() == [7, 8, 9, 10, 0]
    assert inputs.positions.tolist() == [4, 5, 6, 7, 5]
    assert inputs.sample_rows.tolist() == [4] and inputs.sampling_requests == [reqs[1]]
    assert [t.tolist() for t in inputs.feed_rows] == [[4], [3]]
    assert inputs.meta.block_tables.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert inputs.meta.slot_mapping.tolist() == [4, 5, 6, 7, 17]


@pytest.mark.parametrize("num_decodes", [1, 2, 3])
def test_mixed_step_lists_its_decodes_and_prefills_in_aligned_device_arrays(runner, num_decodes):
    """A mixed step names its decodes and its prefills (the Triton backend runs each kind in its own
    kernel), and every staged array starts 16-byte aligned whatever the batch size: Triton compiles
    a kernel variant per pointer alignment, which would otherwise cost ~1 s in a running step."""
    decodes = [new(f"d{i}", 5, [2 * i, 2 * i + 1]) for i in range(num_decodes)]
    reqs = runner._update_states(ExecuteStep(0, [*decodes, new("p", 12, [8, 9, 10])], []))
    for r in reqs[:num_decodes]:
        r.num_computed_tokens, r.num_scheduled_tokens = 4, 1  # the last prompt token: a q_len-1 row
    inputs = prepare_inputs(reqs, runner.block_table, BLOCK_SIZE, runner.device, runner.staging)
    meta = inputs.meta
    assert meta.decode_seq_ids.tolist() == list(range(num_decodes))
    assert meta.prefill_seq_ids.tolist() == [num_decodes]
    staged = [inputs.input_ids, inputs.positions, inputs.sample_rows, meta.slot_mapping, meta.query_start_loc,
              meta.seq_lens, meta.block_tables, meta.decode_seq_ids, meta.prefill_seq_ids]
    assert all(t.data_ptr() % 16 == 0 for t in staged)
    decode_only = prepare_inputs(reqs[:num_decodes], runner.block_table, BLOCK_SIZE, runner.device, runner.staging)
    assert decode_only.meta.is_decode_only and decode_only.meta.decode_seq_ids is None


@pytest.mark.parametrize("params, expected", [
    (GREEDY, True), (SamplingParams(temperature=0, n=2, ignore_eos=True), True),
    (SamplingParams(temperature=0, min_tokens=3), False),  # EOS blocked for the first 3 outputs
    (SamplingParams(temperature=0, min_tokens=3, ignore_eos=True), True),
    (SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[5]), False),
    (SamplingParams(temperature=0, logprobs=1), False), (SamplingParams(temperature=0, repetition_penalty=1.2), False),
    (SamplingParams(temperature=0, logit_bias={4: 1.0}), False), (SamplingParams(temperature=0.7, seed=1), False)])
def test_argmax_only_requests_sample_plain_greedy_rows_at_every_position(runner, params, expected):
    """The fast path that builds no rows is taken only where every row would be plain greedy."""
    req = CachedRequestState("r", [3, 4, 5], 3, params, [0], 3, 0, 0, params.n, False)
    assert req.argmax_only == argmax_only(params) == expected
    for _ in range(5):  # outputs 0..4: before and after min_tokens
        rows = runner._sampling_rows(req)
        assert len(rows) == params.n
        if expected:
            assert all(map(_plain_greedy, rows))
        req.token_ids.append(6)


@torch.inference_mode()
def test_greedy_steps_with_forks_give_the_argmax(runner):
    """A whole step through the runner's fast path: n = 2 forks a row per sample, both the argmax."""
    runner.init_kv_cache(16)
    params = SamplingParams(temperature=0, n=2, ignore_eos=True, max_tokens=4)
    step = ExecuteStep(0, [NewRequestData("x", [5, 6, 7], [], params, [0], 0, 3, num_samples=2),
                           NewRequestData("y", [8, 9], [], GREEDY, [1], 0, 2)], [])
    result = runner.execute(step)
    assert result.request_ids == ["x", "y"] and result.logprobs is None
    assert len(result.sampled_token_ids[0]) == 2 and len(result.sampled_token_ids[1]) == 1
    assert result.sampled_token_ids[0][0] == result.sampled_token_ids[0][1]
    assert runner.requests["x"].token_ids == [5, 6, 7, result.sampled_token_ids[0][0]]


@torch.inference_mode()
def test_start_up_dummy_prefills_write_only_the_first_blocks(runner):
    """The kernel warm-up's prefills run over the real cache before any request: they may only touch
    the blocks at its front (which no request owns yet), and wrap around a small cache."""
    runner.init_kv_cache(16)
    runner._forward_prefills([2 * BLOCK_SIZE + 1])
    written = runner.kv_cache.flatten(3).abs().sum(dim=(0, 1, 3)) > 0  # [num_blocks]
    assert written.tolist() == [True] * 3 + [False] * 13
    runner.init_kv_cache(2)
    runner._forward_prefills([2 * BLOCK_SIZE + 1])  # 3 blocks' worth over 2: wraps, no index error
    assert (runner.kv_cache.abs().sum() > 0).item()
