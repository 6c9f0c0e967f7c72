"""POST /v1/completions: one choice per prompt x n (index = prompt_index * n + output_index),
streamed as SSE or returned whole; echo and OpenAI's legacy logprobs format:

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

best_of > n samples best_of outputs per prompt and returns the n of highest cumulative logprob (the
engine then computes the sampled tokens' logprobs even when the client did not ask for them).
vLLM's prompt_logprobs come back per choice, as vLLM gives them: [null, {token id: {"logprob",
"rank", "decoded_token"}}, ...], one entry per prompt token.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import AsyncIterator

from aiohttp import web

from frontend.outputs import PositionLogprobs, RequestOutput
from frontend.protocol import CompletionRequest, make_sampling_params, parse_completion, resolve_max_tokens
from frontend.serving import (OpenAIServing, Prompt, as_api_error, clamp_logprob, json_response, now,
                              prompt_logprobs_json, stream_response, usage)
from ipc.sampling_params import SamplingParams


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: web.Request, body: dict) -> web.StreamResponse:
        req = parse_completion(body)
        s = self.serving
        s.check_model(req.model)
        prompts = [s.make_prompt(p) for p in req.prompts]
        params = [self._params(req, p) for p in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            s.check_capacity(len(prompts))
            return await stream_response(request, self._events(request_id, req, prompts, params))
        try:
            finals = [self._best(req, final) for final in await s.collect(request_id, prompts, params)]
        except Exception as e:
            raise as_api_error(e) from e
        return json_response(self._response(request_id, req, prompts, finals))

    def _params(self, req: CompletionRequest, prompt: Prompt) -> SamplingParams:
        max_tokens = resolve_max_tokens(req.max_tokens, len(prompt.token_ids), self.serving.max_model_len,
                                        "max_tokens")
        echoed = req.logprobs if req.echo else None
        prompt_logprobs = max((k for k in (echoed, req.prompt_logprobs) if k is not None), default=None)
        sampling, logprobs = req.sampling, req.logprobs
        if req.best_of is not None:  # the ranking needs every output's cumulative logprob
            sampling, logprobs = {**sampling, "n": req.best_of}, logprobs or 0
        params = make_sampling_params(sampling, max_tokens, logprobs, prompt_logprobs)
        self.serving.check_params(params)
        return params

    @staticmethod
    def _best(req: CompletionRequest, final: RequestOutput) -> RequestOutput:
        """The n outputs of highest cumulative logprob, re-indexed 0..n-1 (best first), when best_of > n;
        their logprobs dropped unless the client asked for them."""
        if req.best_of is None:
            return final
        ranked = sorted(final.outputs, key=lambda out: out.cumulative_logprob, reverse=True)[:req.sampling["n"]]
        outputs = [dataclasses.replace(out, index=i, logprobs=out.logprobs if req.logprobs is not None else None,
                                       cumulative_logprob=out.cumulative_logprob if req.logprobs is not None
                                       else None) for i, out in enumerate(ranked)]
        return dataclasses.replace(final, outputs=outputs)

    def _response(self, request_id: str, req: CompletionRequest, prompts: list[Prompt],
                  finals: list[RequestOutput]) -> dict:
        choices = []
        for i, (prompt, final) in enumerate(zip(prompts, finals)):
            n = len(final.outputs)
            for out in final.outputs:
                text, logprobs = out.text, None
                if req.logprobs is not None:
                    logprobs = _LogprobsBuilder(req.logprobs, self.serving.tokenizer)
                    if req.echo:
                        logprobs.add(prompt.token_ids, final.prompt_logprobs)
                    logprobs.add(out.token_ids, out.logprobs)
                    logprobs = logprobs.result
                if req.echo:
                    text = self.serving.prompt_text(prompt) + text
                choice = {"index": i * n + out.index, "text": text, "logprobs": logprobs,
                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs, req.prompt_logprobs)
                choices.append(choice)
        return {"id": request_id, "object": "text_completion", "created": now(),
                "model": self.serving.model_name, "choices": choices, "usage": usage(prompts, finals)}

    async def _events(self, request_id: str, req: CompletionRequest, prompts: list[Prompt],
                      params: list[SamplingParams]) -> AsyncIterator[dict]:
        """SSE chunks: text deltas as they come; per prompt, once its request has finished, a chunk
        with every choice's finish_reason; the usage chunk last if asked for."""
        s = self.serving
        n = params[0].n
        created = now()
        chunk = {"id": request_id, "object": "text_completion", "created": created, "model": s.model_name}
        streams = [_ChoiceStream(req, prompts[i // n], i) for i in range(len(prompts) * n)]
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, update in s.generate(request_id, prompts, params):
            if update is not None:
                finals[i] = update.output
                choices = [c for j in range(n)
                           if (c := streams[i * n + j].delta(update, j, s)) is not None]
            else:
                choices = [streams[i * n + j].finish(finals[i].outputs[j]) for j in range(n)]
            if choices:
                yield {**chunk, "choices": choices}
        if req.include_usage:
            yield {**chunk, "choices": [], "usage": usage(prompts, finals)}


class _ChoiceStream:
    """One streamed choice: what it has sent so far (tokens, characters, the echoed prompt)."""

    def __init__(self, req: CompletionRequest, prompt: Prompt, index: int) -> None:
        self.req = req
        self.prompt = prompt
        self.index = index
        self.num_tokens = 0
        self.num_chars = 0
        self.echoed = not req.echo

    def delta(self, update, j: int, serving: OpenAIServing) -> dict | None:
        text, new_ids = update.new_text[j], update.new_token_ids[j]
        if not text and not new_ids and self.echoed:
            return None
        logprobs = None
        if self.req.logprobs is not None:
            builder = _LogprobsBuilder(self.req.logprobs, serving.tokenizer, self.num_chars)
            if not self.echoed:
                builder.add(self.prompt.token_ids, update.output.prompt_logprobs)
            out = update.outputs[j]
            builder.add(new_ids, out.logprobs[self.num_tokens:self.num_tokens + len(new_ids)])
            logprobs = builder.result
        if not self.echoed:
            text = serving.prompt_text(self.prompt) + text
            self.echoed = True
        self.num_tokens += len(new_ids)
        self.num_chars += len(text)
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def finish(self, out) -> dict:
        return {"index": self.index, "text": "", "logprobs": None, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}


class _LogprobsBuilder:
    """OpenAI's completions logprobs for a run of positions; text_offset continues from `offset`."""

    def __init__(self, num: int, tokenizer, offset: int = 0) -> None:
        self.num = num
        self.tokenizer = tokenizer
        self.offset = offset
        self.result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_ids: list[int], positions: list[PositionLogprobs | None] | None) -> None:
        positions = positions or []
        r = self.result
        for k, token in enumerate(token_ids):
            pos = positions[k] if k < len(positions) else None
            chosen = pos.get(token) if pos else None
            text = chosen.decoded_token if chosen else self.tokenizer.decode([token])
            r["tokens"].append(text)
            r["token_logprobs"].append(clamp_logprob(chosen.logprob) if chosen else None)
            r["top_logprobs"].append(
                {lp.decoded_token: clamp_logprob(lp.logprob) for tok, lp in pos.items()
                 if tok == token or (lp.rank is not None and lp.rank <= self.num)} if pos else None)
            r["text_offset"].append(self.offset)
            self.offset += len(text)
