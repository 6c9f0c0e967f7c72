"""Scheduler: iteration-level continuous batching over a paged KV cache. Pure Python, no torch.

Each step packs, under `max_num_batched_tokens` tokens and `max_num_seqs` requests:
  1. running requests, oldest first: one decode token each, or the next chunk of an unfinished prefill;
  2. waiting requests, FCFS: their prompt (after the prefix-cache hit), chunked to the budget left.
A request needs slots for every token it computes; when blocks run out, the most recently admitted
running request is preempted (blocks freed, re-queued at the front, recomputed later).

The plan sent to workers is a diff (vLLM's SchedulerOutput): a request in full the first time the
workers see it (or after preemption / fork), afterwards only its new block ids and token counts.
num_computed_tokens advances when the step is planned; tokens are appended when its result arrives.

Two steps may be in flight (the scheduler plans step n+1 while the GPU runs step n): a request whose
token from step n is not back yet is planned as if it were (`num_pending_samples`); the worker already
holds that token. A request that would surely be finished by then (max_tokens, max_model_len), a
parent about to fork (n > 1), and a preempted request still waiting for a result are not planned.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from ipc.messages import (CachedRequestData, ExecuteStep, Logprobs, NewRequestData, RequestDelta,
                          SchedulerStats, StepResult)
from ipc.sampling_params import SamplingParams
from scheduler_proc.block_manager import BlockManager
from scheduler_proc.request import Request, RequestStatus


class SchedulerOutput(NamedTuple):
    step: ExecuteStep | None
    """None when nothing could be scheduled (finished ids then wait for the next step)."""
    num_scheduled_tokens: dict[str, int]
    preempted: list[Request]


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: list[int] | tuple[int, ...] = (),
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks * block_size < max_model_len:
            raise ValueError(
                f"max_model_len ({max_model_len}) needs more KV-cache slots than the "
                f"{num_blocks} blocks x {block_size} available; lower max_model_len or give more memory")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # request_id -> live request
        self.groups: dict[str, list[Request]] = {}  # client id -> its live requests
        self.finished_ids: list[str] = []  # to tell the workers at the next step
        self.step_id = 0
        # Counters for metrics.
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, client_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float = 0.0) -> None:
        if client_id in self.groups:
            raise ValueError(f"request id {client_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but the model's maximum "
                             f"context length (max_model_len) is {self.max_model_len}")
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(client_id, client_id, prompt_token_ids, params, max_tokens, arrival_time,
                      num_samples=params.n)
        self.requests[client_id] = req
        self.groups[client_id] = [req]
        self.waiting.append(req)

    def abort(self, ids: list[str]) -> list[RequestDelta]:
        """Abort whole requests (client ids) or single outputs of an n > 1 request (`id#index`);
        their blocks are freed at once. Unknown ids are ignored (already finished)."""
        deltas = []
        for rid in ids:
            reqs = list(self.groups.get(rid, ())) or ([self.requests[rid]] if rid in self.requests else [])
            for req in reqs:
                self._finish(req, "abort")
                deltas.append(RequestDelta(req.client_id, [], req.index, "abort"))
        return deltas

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.block_manager.usage,
                              self.num_preemptions, self.prefix_queries, self.prefix_hits,
                              self.num_prompt_tokens, self.num_generation_tokens)

    # ------------------------------------------------------------------ planning

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        planned: list[tuple[Request, int]] = []  # (request, tokens to compute), in running order
        copies: list[tuple[int, int]] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(self._num_schedulable(req), budget)
            if num_new == 0:
                i += 1
                continue
            result = self._append_or_preempt(req, num_new, preempted)
            if result is None:
                break  # req itself was preempted: nothing after it is left to schedule
            if result.copy is not None:
                copies.append(result.copy)
                req.table_replaced = True
            planned.append((req, num_new))  # preemption only pops requests after req
            budget -= num_new
            i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if self.waiting[0].num_pending_samples:
                break  # preempted while a step that samples it was in flight: wait for its token
            num_new = self._admit(self.waiting[0], budget)
            if num_new == 0:
                break
            req = self.waiting.popleft()
            self.running.append(req)
            planned.append((req, num_new))
            budget -= num_new

        scheduled = {req.request_id: num_new for req, num_new in planned}
        if not planned:
            return SchedulerOutput(None, scheduled, preempted)
        # Planned only now: blocks the running requests fill this step are hashed after the waiting
        # ones looked up the prefix cache.
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for req, num_new in planned:
            self._plan(req, num_new, new_reqs, cached_reqs)
        self.step_id += 1
        step = ExecuteStep(self.step_id, new_reqs, cached_reqs, self.finished_ids, copies)
        self.finished_ids = []
        return SchedulerOutput(step, scheduled, preempted)

    def _num_schedulable(self, req: Request) -> int:
        """Tokens of a running request that can be computed now, counting tokens in flight. (max_tokens
        is capped to the context room at admission, so reaching it also covers max_model_len.)"""
        pending = req.num_pending_samples
        if pending and (req.num_samples > 1 or req.num_output_tokens + pending >= req.max_tokens):
            return 0
        return req.num_tokens + pending - req.num_computed_tokens

    def _append_or_preempt(self, req: Request, num_new: int, preempted: list[Request]):
        """Slots for req's next num_new tokens, preempting the newest running requests if needed.
        Returns the AppendResult, or None if req itself had to be preempted."""
        bm = self.block_manager
        while True:
            result = bm.append_slots(req.request_id, req.num_computed_tokens,
                                     req.num_computed_tokens + num_new)
            if result is not None:
                return result
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return None

    def _admit(self, req: Request, budget: int) -> int:
        """Allocate blocks for a waiting request's next chunk; returns its token count (0: no room)."""
        bm = self.block_manager
        prefix = None
        if req.sampling_params.prompt_logprobs is None or req.prompt_logprobs_sent:
            prefix = bm.find_cached_prefix(req.all_token_ids)
        num_computed = prefix.num_tokens if prefix else 0
        num_new = min(req.num_tokens - num_computed, budget)
        if not bm.allocate(req.request_id, num_computed + num_new, prefix):
            return 0  # tried again next step: the lookup is counted when admission succeeds
        if prefix is not None:
            self.prefix_queries += req.num_tokens
            self.prefix_hits += prefix.num_tokens
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_computed
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_computed
            req.first_scheduled_time = time.time()
            self.num_prompt_tokens += req.num_prompt_tokens
        return num_new

    def _plan(self, req: Request, num_new: int, new_reqs: list, cached_reqs: list) -> None:
        bm = self.block_manager
        table = bm.block_table(req.request_id)
        if not req.on_worker:
            new_reqs.append(NewRequestData(
                req.request_id, req.prompt_token_ids, req.output_token_ids, req.sampling_params,
                list(table), req.num_computed_tokens, num_new, req.index, req.num_samples,
                not req.prompt_logprobs_sent))
            req.on_worker = True
        elif req.table_replaced:
            cached_reqs.append(CachedRequestData(
                req.request_id, req.num_computed_tokens, num_new, list(table), True))
        else:
            cached_reqs.append(CachedRequestData(
                req.request_id, req.num_computed_tokens, num_new, table[req.num_blocks_on_worker:]))
        req.num_blocks_on_worker = len(table)
        req.table_replaced = False
        req.num_computed_tokens += num_new
        if req.num_computed_tokens == req.num_tokens + req.num_pending_samples:
            req.num_pending_samples += 1  # this step samples the request's next token
        bm.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req.request_id)
        self._forget_on_worker(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _forget_on_worker(self, req: Request) -> None:
        if req.on_worker:
            self.finished_ids.append(req.request_id)
            req.on_worker = False
            req.num_blocks_on_worker = 0

    # ------------------------------------------------------------------ results

    def update(self, result: StepResult) -> list[RequestDelta]:
        """Apply a step's sampled tokens: append, fork n > 1 parents, finish. Returns the deltas
        for the frontend."""
        deltas: list[RequestDelta] = []
        starts = result.prompt_logprob_starts or [0] * len(result.prompt_logprobs or ())
        for rid, lps, first in zip(result.prompt_logprob_request_ids or (), result.prompt_logprobs or (), starts):
            req = self.requests.get(rid)
            if req is not None and not req.prompt_logprobs_sent:
                deltas.append(self._prompt_logprobs(req, lps, first))
        logprobs = result.logprobs or [None] * len(result.request_ids)
        for rid, tokens, lps in zip(result.request_ids, result.sampled_token_ids, logprobs):
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue  # aborted while the step ran
            req.num_pending_samples -= 1
            if req.num_samples > 1:
                deltas.extend(self._fork(req, tokens, lps))
            else:
                deltas.append(self._append(req, tokens[0], lps[0] if lps else None))
        return deltas

    def _prompt_logprobs(self, req: Request, lps: list[Logprobs | None], first: int) -> RequestDelta:
        """`lps` are the prompt logprobs of positions [first, first + len(lps)) (a chunk computing
        positions [s, e) scores tokens s + 1 .. e, plus position 0's None when s is 0). After a
        preemption the recomputed chunks repeat positions already delivered, which are dropped."""
        skip = req.num_prompt_logprobs - first
        fresh = lps[skip:] if skip > 0 else lps
        req.num_prompt_logprobs += len(fresh)
        req.prompt_logprobs_sent = req.num_prompt_logprobs >= req.num_prompt_tokens
        return RequestDelta(req.client_id, [], req.index, prompt_logprobs=fresh)

    def _append(self, req: Request, token: int, lp: Logprobs | None) -> RequestDelta:
        req.all_token_ids.append(token)
        self.num_generation_tokens += 1
        reason = self._check_stop(req, token)
        queue_time = None
        if req.num_output_tokens == 1 and req.first_scheduled_time is not None:
            queue_time = max(req.first_scheduled_time - req.arrival_time, 0.0)
        delta = RequestDelta(req.client_id, [token], req.index, reason, [lp] if lp else None,
                             num_cached_tokens=max(req.num_cached_tokens, 0),
                             stop_token_id=token if reason == "stop" else None, queue_time=queue_time)
        if reason is not None:
            self._finish(req, reason)
        return delta

    def _fork(self, parent: Request, tokens: list[int], lps: list[Logprobs] | None) -> list[RequestDelta]:
        """The parent's prefill is done and n first tokens were sampled: split into n children that
        share the parent's blocks, then drop the parent. A parent preempted while its samples were
        in flight has no blocks left: its children wait, in its place, to be recomputed."""
        running = parent.status is RequestStatus.RUNNING
        queue = self.running if running else self.waiting
        pos = queue.index(parent)
        children = []
        for i in range(len(tokens)):
            child = Request(f"{parent.client_id}#{i}", parent.client_id, parent.prompt_token_ids,
                            parent.sampling_params, parent.max_tokens, parent.arrival_time, index=i)
            child.num_cached_tokens = parent.num_cached_tokens
            child.prompt_logprobs_sent = True
            child.first_scheduled_time = parent.first_scheduled_time
            if running:
                child.status = RequestStatus.RUNNING
                child.num_computed_tokens = parent.num_computed_tokens
                self.block_manager.fork(parent.request_id, child.request_id)
            self.requests[child.request_id] = child
            self.groups[parent.client_id].append(child)
            children.append(child)
        if running:
            self.running[pos:pos + 1] = children
        else:
            del self.waiting[pos]
            for child in reversed(children):
                self.waiting.insert(pos, child)
        self._release(parent)
        return [self._append(c, t, lps[i] if lps else None) for i, (c, t) in enumerate(zip(children, tokens))]

    def _check_stop(self, req: Request, token: int) -> str | None:
        params = req.sampling_params
        num_output_tokens = req.num_output_tokens
        if num_output_tokens > params.min_tokens:  # the sampler blocks stops before that
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if params.stop_token_ids and token in params.stop_token_ids:
                return "stop"
        if num_output_tokens >= req.max_tokens:  # capped at admission to the context room
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._release(req)

    def _release(self, req: Request) -> None:
        """Free a request's blocks and forget it (finished, aborted, or a forked parent)."""
        req.status = RequestStatus.FINISHED
        self.block_manager.free(req.request_id)
        self._forget_on_worker(req)
        del self.requests[req.request_id]
        group = self.groups[req.client_id]
        group.remove(req)
        if not group:
            del self.groups[req.client_id]
