"""A minimal OpenAI-compatible completions server around transformers' generate, for bench_serve's baseline.

    python scripts/hf_server.py --model /tmp/llama8b --port 8001 [--load-format dummy]

Serves POST /v1/completions (prompt as text or token ids; max_tokens, temperature, ignore_eos, stream,
stream_options.include_usage), GET /v1/models and GET /health. One request generates at a time (an
asyncio lock: transformers has no continuous batching); generate() runs in a thread and a streamer hands
each new token to the event loop, which sends it as one SSE chunk. A client that disconnects stops its
generation at the next token. Not for production: no auth, no n > 1, no stop strings, no logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


class Generation:
    """One generate() call in a worker thread; new token ids arrive on `queue`, None marks the end."""

    def __init__(self, state: "ServerState", prompt: list[int], max_tokens: int, temperature: float,
                 ignore_eos: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[int | None | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state, self.prompt = state, prompt
        self.kwargs = bc.hf_generation_kwargs(state.pad_id, max_tokens, temperature)
        if not ignore_eos:
            self.kwargs["min_new_tokens"] = 0

    def run(self) -> None:  # in the worker thread
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        gen = self

        class Streamer(BaseStreamer):
            seen_prompt = False

            def put(self, value):  # first call: the prompt; then [1] or [1, 1] tensors of new ids
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                for token in value.reshape(-1).tolist():
                    gen.loop.call_soon_threadsafe(gen.queue.put_nowait, token)

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), gen.cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        result: int | None | BaseException = None
        try:
            ids = torch.tensor([self.prompt], device=self.state.device)
            with torch.inference_mode():
                self.state.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Streamer(),
                                          stopping_criteria=StoppingCriteriaList([Cancelled()]), **self.kwargs)
        except BaseException as exc:  # travels to the request's handler
            result = exc
        self.loop.call_soon_threadsafe(self.queue.put_nowait, result)


class ServerState:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.model, self.device = bc.load_hf_model(args.model, args.dtype, args.load_format, args.device,
                                                   args.hf_attn_implementation)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(self.model.generation_config.eos_token_id if isinstance(
            self.model.generation_config.eos_token_id, list) else [self.model.generation_config.eos_token_id])
        self.name = args.served_model_name or args.model
        self.max_model_len = args.max_model_len or bc.read_config(args.model).get("max_position_embeddings") or 4096
        self.lock = asyncio.Lock()


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def parse_request(state: ServerState, body: dict) -> tuple[list[int], int, float, bool, bool, bool]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt = state.tokenizer.encode(prompt)
    if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        raise ValueError("'prompt' must be one non-empty string or list of token ids")
    max_tokens = int(body.get("max_tokens") or 16)
    if max_tokens < 1 or len(prompt) + max_tokens > state.max_model_len:
        raise ValueError(f"max_tokens {max_tokens} with a {len(prompt)}-token prompt exceeds {state.max_model_len}")
    stream = bool(body.get("stream", False))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return prompt, max_tokens, float(body.get("temperature", 1.0)), bool(body.get("ignore_eos", False)), stream, include_usage


async def completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app["state"]
    try:
        prompt, max_tokens, temperature, ignore_eos, stream, include_usage = parse_request(state, await request.json())
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        return error(400, str(exc))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
        body = {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                "choices": [] if usage else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    response = None
    async with state.lock:  # batch 1: requests queue here
        gen = Generation(state, prompt, max_tokens, temperature, ignore_eos)
        thread = threading.Thread(target=gen.run, daemon=True)
        thread.start()
        tokens, text, finish = [], "", "length"
        try:
            if stream:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                await response.prepare(request)
            while (item := await gen.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                tokens.append(item)
                full = state.tokenizer.decode(tokens, skip_special_tokens=True)
                delta, text = full[len(text):], full
                if item in state.eos_ids and not ignore_eos:
                    finish = "stop"
                if stream:
                    await response.write(chunk(delta, None))
        finally:
            gen.cancelled.set()  # a client gone mid-stream stops the generation at the next token
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
    usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens), "total_tokens": len(prompt) + len(tokens)}
    if not stream:
        return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": state.name,
                                  "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                                  "usage": usage})
    await response.write(chunk("", finish))
    if include_usage:
        await response.write(chunk("", None, usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    name = request.app["state"].name
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "hf_server"}]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="name in responses (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    bc.add_hf_args(p)
    # Unknown flags (pagedserve's engine flags, when bench_serve passes one --server-arg list to both) are ignored.
    args, ignored = p.parse_known_args(argv)
    if ignored:
        print(f"hf_server: ignoring flags it does not know: {' '.join(ignored)}", flush=True)
    app = web.Application(client_max_size=64 * 2**20)

    async def start(app: web.Application) -> None:
        app["state"] = ServerState(args)

    app.on_startup.append(start)
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models), web.get("/health", health)])
    web.run_app(app, host=args.host, port=args.port, print=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
