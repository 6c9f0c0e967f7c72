"""Turns the scheduler's per-step RequestDeltas into RequestOutputs: detokenizes, applies stop
strings, converts logprobs, and reports which requests must be aborted (a stop string matched).
Shared by the offline LLM and the HTTP server."""

from __future__ import annotations

from typing import NamedTuple

from frontend.detokenizer import IncrementalDetokenizer
from frontend.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from ipc.messages import Logprobs, RequestDelta
from ipc.sampling_params import SamplingParams


class OutputUpdate(NamedTuple):
    output: RequestOutput
    """The request's cumulative output so far."""
    new_text: list[str]
    """Per output index: text gained by this update (stop-string safe, for streaming)."""
    new_token_ids: list[list[int]]
    """Per output index: token ids gained by this update."""

    @property
    def outputs(self):
        return self.output.outputs

    @property
    def finished(self) -> bool:
        return self.output.finished


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer) -> None:
        self.request_id = request_id
        self.params = params
        self.tokenizer = tokenizer
        self.detoks = [IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for _ in range(params.n)]
        want_lp = params.logprobs is not None
        self.output = RequestOutput(
            request_id, prompt, prompt_token_ids,
            [CompletionOutput(i, "", [], 0.0 if want_lp else None, [] if want_lp else None)
             for i in range(params.n)],
            prompt_logprobs=[] if params.prompt_logprobs is not None else None)

    def apply(self, delta: RequestDelta) -> tuple[list[int], bool]:
        """Apply one delta; returns the token ids it added and whether a stop string ended the output
        (so the caller must abort it in the scheduler)."""
        out = self.output.outputs[delta.index]
        detok = self.detoks[delta.index]
        self.output.num_cached_tokens = max(self.output.num_cached_tokens, delta.num_cached_tokens)
        if delta.queue_time is not None:
            self.output.metrics.setdefault("queue_time", delta.queue_time)
        if delta.prompt_logprobs is not None:
            self.output.prompt_logprobs.extend(self._convert(lp) for lp in delta.prompt_logprobs)
        if out.finish_reason is not None:
            return [], False  # tokens sampled after a stop string, before the abort arrived
        before = len(detok.output_token_ids)
        detok.add_tokens(delta.new_token_ids)
        added = detok.output_token_ids[before:]
        out.token_ids.extend(added)
        out.text = detok.text
        if out.logprobs is not None and delta.logprobs:
            for lp in delta.logprobs[:len(added)]:
                converted = self._convert(lp)
                out.logprobs.append(converted)
                out.cumulative_logprob += lp.logprobs[0]
        stopped = detok.stop_reason is not None
        if stopped:
            out.finish_reason, out.stop_reason = "stop", detok.stop_reason
        elif delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.stop_reason = delta.stop_token_id
        self.output.finished = all(o.finish_reason is not None for o in self.output.outputs)
        return added, stopped

    def _convert(self, lp: Logprobs | None) -> PositionLogprobs | None:
        if lp is None:
            return None
        result: PositionLogprobs = {}
        for i, (tok, value) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tok in result:
                continue
            rank = lp.rank if i == 0 else i
            result[tok] = Logprob(value, rank, self.tokenizer.decode([tok]))
        return result


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        self.states[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer)

    def process(self, deltas: list[RequestDelta]) -> tuple[list[OutputUpdate], list[str]]:
        """Returns the updates (finished requests are dropped from the processor) and the scheduler
        ids of outputs to abort because a stop string ended them (`id`, or `id#index` when n > 1)."""
        touched: dict[str, tuple[list[str], list[list[int]]]] = {}
        to_abort: list[str] = []
        for delta in deltas:
            state = self.states.get(delta.request_id)
            if state is None:
                continue
            texts, tokens = touched.setdefault(delta.request_id, ([""] * state.params.n,
                                                                 [[] for _ in range(state.params.n)]))
            added, stopped = state.apply(delta)
            tokens[delta.index].extend(added)
            if stopped and delta.finish_reason is None:
                n = state.params.n
                to_abort.append(delta.request_id if n == 1 else f"{delta.request_id}#{delta.index}")
        updates = []
        for request_id, (texts, tokens) in touched.items():
            state = self.states[request_id]
            for i, detok in enumerate(state.detoks):
                texts[i] = detok.new_text(state.output.outputs[i].finish_reason is not None)
            if state.output.finished:
                del self.states[request_id]
            updates.append(OutputUpdate(state.output, texts, tokens))
        return updates, to_abort

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)
