"""POST /v1/chat/completions: the chat template renders the messages into one prompt; n choices;
streamed as SSE (a first delta with role "assistant" per choice, content deltas, then a
finish_reason per choice) or returned whole; vLLM's continue_final_message (the last, assistant
message left open) and prompt_logprobs (top level, as in /v1/completions); logprobs as

    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
"""

from __future__ import annotations

import uuid
from typing import AsyncIterator

from aiohttp import web

from frontend.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from frontend.protocol import ChatRequest, make_sampling_params, parse_chat, resolve_max_tokens
from frontend.serving import (OpenAIServing, Prompt, as_api_error, clamp_logprob, json_response, now,
                              prompt_logprobs_json, stream_response, usage)
from ipc.sampling_params import SamplingParams


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: web.Request, body: dict) -> web.StreamResponse:
        req = parse_chat(body)
        s = self.serving
        s.check_model(req.model)
        prompt = s.chat_prompt(req.messages, req.add_generation_prompt, req.extra, req.continue_final_message)
        max_tokens = resolve_max_tokens(req.max_tokens, len(prompt.token_ids), s.max_model_len,
                                        req.max_tokens_param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = make_sampling_params(req.sampling, max_tokens, logprobs, req.prompt_logprobs)
        s.check_params(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            s.check_capacity(1)
            return await stream_response(request, self._events(request_id, req, prompt, params))
        try:
            [final] = await s.collect(request_id, [prompt], [params])
        except Exception as e:
            raise as_api_error(e) from e
        return json_response(self._response(request_id, req, prompt, final))

    def _response(self, request_id: str, req: ChatRequest, prompt: Prompt, final: RequestOutput) -> dict:
        choices = [{"index": out.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._logprobs(req, out.token_ids, out.logprobs),
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
                   for out in final.outputs]
        response = {"id": request_id, "object": "chat.completion", "created": now(),
                    "model": self.serving.model_name, "choices": choices, "usage": usage([prompt], [final])}
        if req.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs, req.prompt_logprobs)
        return response

    async def _events(self, request_id: str, req: ChatRequest, prompt: Prompt,
                      params: SamplingParams) -> AsyncIterator[dict]:
        s = self.serving
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": now(), "model": s.model_name}
        if req.include_usage:
            chunk["usage"] = None
        n = params.n
        yield {**chunk, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None} for j in range(n)]}
        num_tokens = [0] * n
        final: RequestOutput | None = None
        async for _, update in s.generate(request_id, [prompt], [params]):
            if update is None:
                choices = [self._finish(out) for out in final.outputs]
            else:
                final = update.output
                choices = []
                for j, out in enumerate(update.outputs):
                    text, new_ids = update.new_text[j], update.new_token_ids[j]
                    if not text and not new_ids:
                        continue
                    positions = out.logprobs[num_tokens[j]:num_tokens[j] + len(new_ids)] if out.logprobs else None
                    num_tokens[j] += len(new_ids)
                    choices.append({"index": j, "delta": {"content": text},
                                    "logprobs": self._logprobs(req, new_ids, positions), "finish_reason": None})
            if choices:
                yield {**chunk, "choices": choices}
        if req.include_usage:
            yield {**chunk, "choices": [], "usage": usage([prompt], [final])}

    @staticmethod
    def _finish(out: CompletionOutput) -> dict:
        return {"index": out.index, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def _logprobs(self, req: ChatRequest, token_ids: list[int],
                  positions: list[PositionLogprobs] | None) -> dict | None:
        if not req.logprobs:
            return None
        top_n = req.top_logprobs or 0
        content = []
        for token, pos in zip(token_ids, positions or []):
            chosen = pos.get(token)
            top = sorted((lp for lp in pos.values() if lp.rank is not None and lp.rank <= top_n),
                         key=lambda lp: lp.rank)[:top_n]
            content.append({**self._entry(chosen.decoded_token, chosen.logprob),
                            "top_logprobs": [self._entry(lp.decoded_token, lp.logprob) for lp in top]})
        return {"content": content}

    @staticmethod
    def _entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": clamp_logprob(logprob), "bytes": list(token.encode("utf-8"))}
