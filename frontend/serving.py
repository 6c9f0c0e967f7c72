"""What the OpenAI endpoints share: model names, prompts, admission, fan-in of engine streams, SSE.

One HTTP request may hold several engine requests (a list of prompts); each is an
`AsyncLLM.generate` stream consumed by its own task, and `OpenAIServing.generate` merges them:

    prompt 0 ── llm.generate ── pump task ──┐
    prompt 1 ── llm.generate ── pump task ──┼──▶ queue ──▶ generate(): (index, update | None)
    prompt k ── llm.generate ── pump task ──┘

Leaving `generate` early (client gone, handler cancelled, error) cancels every pump task, and each
engine stream's own `finally` aborts its request, which frees its KV blocks at once.

Admission (--max-queued-requests) counts engine requests that have not produced their first output
yet, i.e. that wait in the scheduler's queue or in prefill; beyond the limit a request gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator, NamedTuple

import jinja2
import msgspec
from aiohttp import web

from frontend.metrics import ServerMetrics
from frontend.output_processor import OutputUpdate
from frontend.outputs import PositionLogprobs, RequestOutput
from frontend.protocol import ApiError, bad_request, check_token_ids
from ipc.errors import EngineDeadError
from ipc.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
_DONE = b"data: [DONE]\n\n"
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
_encoder = msgspec.json.Encoder()


class Prompt(NamedTuple):
    token_ids: list[int]
    text: str | None
    """The prompt's text when it came as text (or from a chat template); None for token ids."""


class OpenAIServing:
    def __init__(self, llm, served_model_names: list[str], chat_template: str | None,
                 max_queued_requests: int | None, metrics: ServerMetrics) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_names = served_model_names
        self.chat_template = chat_template
        self.max_queued_requests = max_queued_requests
        self.num_pending = 0
        self.metrics = metrics
        self.vocab_size = llm.config.model.vocab_size or len(llm.tokenizer)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    # ------------------------------------------------------------ prompts

    def make_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise bad_request("'prompt' must not be empty", "prompt")
            return Prompt(ids, prompt)
        check_token_ids(prompt, self.vocab_size)
        return Prompt(list(prompt), None)

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, extra: dict,
                    continue_final_message: bool = False) -> str:
        """The chat template (--chat-template, else the tokenizer's) applied to the messages."""
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; start the server with --chat-template",
                              "messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **extra)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise bad_request(f"the chat template could not render these messages: {e}", "messages") from None

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool, extra: dict,
                    continue_final_message: bool = False) -> Prompt:
        text = self.render_chat(messages, add_generation_prompt, extra, continue_final_message)
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template carries BOS
        if not ids:
            raise bad_request("the messages render to an empty prompt", "messages")
        return Prompt(ids, text)

    def check_params(self, params: SamplingParams) -> None:
        if params.logit_bias:
            check_token_ids(list(params.logit_bias), self.vocab_size, "logit_bias")
        if params.stop_token_ids:
            check_token_ids(params.stop_token_ids, self.vocab_size, "stop_token_ids")
        if params.allowed_token_ids:
            check_token_ids(params.allowed_token_ids, self.vocab_size, "allowed_token_ids")

    # ------------------------------------------------------------ generation

    async def generate(self, request_id: str, prompts: list[Prompt], params: list[SamplingParams]
                       ) -> AsyncIterator[tuple[int, OutputUpdate | None]]:
        """Merged updates of every prompt's engine request: (prompt index, update), then
        (prompt index, None) once that prompt's request has finished."""
        self._admit(len(prompts))
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(f"{request_id}-{i}", i, p, sp, queue))
                 for i, (p, sp) in enumerate(zip(prompts, params))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item is None
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def check_capacity(self, count: int) -> None:
        """503 if `count` more engine requests would exceed --max-queued-requests (checked again, and
        counted, when generation starts; streams check first so that the refusal is a status code)."""
        limit = self.max_queued_requests
        if limit is not None and self.num_pending + count > limit:
            raise ApiError(503, f"the server is overloaded: {self.num_pending} requests are already queued "
                                f"(--max-queued-requests {limit}); retry later", code="queue_full")

    def _admit(self, count: int) -> None:
        self.check_capacity(count)
        self.num_pending += count

    async def _pump(self, request_id: str, index: int, prompt: Prompt, params: SamplingParams,
                    queue: asyncio.Queue) -> None:
        timer = self.metrics.timer()
        pending = True
        try:
            stream = self.llm.generate(prompt.token_ids, params, request_id, prompt_text=prompt.text)
            async with aclosing(stream):
                async for update in stream:
                    if pending:
                        self.num_pending -= 1
                        pending = False
                    timer.on_update(update)
                    if update.finished:
                        timer.on_finish(update)
                    queue.put_nowait((index, update))
            queue.put_nowait((index, None))
        except Exception as e:  # handed to the consumer, which turns it into an HTTP error
            queue.put_nowait((index, e))
        finally:
            if pending:
                self.num_pending -= 1

    async def collect(self, request_id: str, prompts: list[Prompt], params: list[SamplingParams]
                      ) -> list[RequestOutput]:
        """Non-streaming: every prompt's final output."""
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async with aclosing(self.generate(request_id, prompts, params)) as updates:
            async for index, update in updates:
                if update is not None:
                    finals[index] = update.output
        return finals


# ---------------------------------------------------------------- responses


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    response = json_response(error.body(), error.status)
    if error.status in (413, 431):
        response.force_close()  # close the connection: the rest of what the client sends is never read
    return response


def as_api_error(e: BaseException) -> ApiError:
    """Errors that reach a handler from the engine, as the client sees them."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineDeadError):
        return ApiError(503, f"the engine is dead: {e}", code="engine_dead", type="server_error")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    return ApiError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")


async def stream_response(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    """Send `events` as SSE `data:` lines, then `data: [DONE]`. An engine failure mid-stream becomes
    an error event (`data: {"error": ...}`) before [DONE]; a client that left ends it quietly (closing
    `events` aborts its engine requests)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async with aclosing(events):
            try:
                async for event in events:
                    await response.write(b"data: " + _encoder.encode(event) + b"\n\n")
            except ConnectionResetError:
                raise
            except Exception as e:  # headers are out: the error travels as the stream's last event
                if not isinstance(e, (ApiError, EngineDeadError, ValueError)):
                    logger.exception("error in the stream of %s", request.path)
                await response.write(b"data: " + _encoder.encode(as_api_error(e).body()) + b"\n\n")
        await response.write(_DONE)
    except ConnectionResetError:
        pass  # the client is gone
    return response


def usage(prompts: list[Prompt], finals: list[RequestOutput]) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(o.token_ids) for final in finals for o in final.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in finals)}}


def clamp_logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


def now() -> int:
    return int(time.time())


def prompt_logprobs_json(positions: list[PositionLogprobs | None], k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token, None for the first, then {token id: {"logprob", "rank",
    "decoded_token"}} holding the prompt's own token and the k most likely (the engine may have computed
    more, for echo's logprobs)."""
    return [None if pos is None else
            {str(tok): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for i, (tok, lp) in enumerate(pos.items()) if i == 0 or (lp.rank is not None and lp.rank <= k)}
            for pos in positions]
