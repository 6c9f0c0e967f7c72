"""Client mistakes get the right 4xx with OpenAI's error body, never a 500, and the server keeps
serving; clients that disconnect have their requests aborted and their KV blocks freed."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from tests.frontend.server_harness import API_KEY, MAX_MODEL_LEN, http, metric, shared_server, wait_for_idle

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(pytestconfig):
    return shared_server(pytestconfig)


def _assert_error(status: int, body, expected: int, param: str | None = None, words: str | None = None) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if words is not None:
        assert words in error["message"], error


BAD_BODIES = [
    # (endpoint, body, param the error names)
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": 123}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": [10 ** 9]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 1000}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": True}, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 10 ** 30}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, "stop"),
    (COMPLETIONS, {"prompt": "x", "seed": "abc"}, "seed"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_tokens": -3}, "max_tokens"),
    # asked-for behaviour this server does not have: refused, not silently answered otherwise
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": "json"}, "response_format"),
    (COMPLETIONS, {"prompt": "x", "guided_choice": ["yes", "no"]}, "guided_choice"),
    (CHAT, {"messages": USER, "guided_json": {"type": "object"}}, "guided_json"),
    (CHAT, {"messages": USER, "tools": [TOOL]}, "tools"),
    (CHAT, {"messages": USER, "tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    (CHAT, {"messages": USER, "tool_choice": 3}, "tool_choice"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    (COMPLETIONS, {"prompt": "x", "allowed_token_ids": [10 ** 9]}, "allowed_token_ids"),
    (CHAT, {"messages": USER, "allowed_token_ids": "a"}, "allowed_token_ids"),
    (COMPLETIONS, {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "best_of": 100}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (CHAT, {"messages": USER, "prompt_logprobs": -1}, "prompt_logprobs"),
    (CHAT, {"messages": USER, "continue_final_message": True}, "continue_final_message"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_BODIES)
def test_bad_fields_are_400(server, endpoint, body, param):
    status, answer = http("POST", server.url + endpoint, body)
    _assert_error(status, answer, 400, param)


def test_context_length_limit_named(server):
    status, body = http("POST", server.url + COMPLETIONS, {"prompt": "hello", "max_tokens": MAX_MODEL_LEN})
    _assert_error(status, body, 400, words=f"maximum context length is {MAX_MODEL_LEN} tokens")
    long_prompt = [1] * MAX_MODEL_LEN
    status, body = http("POST", server.url + COMPLETIONS, {"prompt": long_prompt})
    _assert_error(status, body, 400, words=f"maximum context length is {MAX_MODEL_LEN} tokens")


@pytest.mark.parametrize("raw,content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"\xff\xfe", "application/json"),
    (json.dumps({"prompt": "x"}).encode(), "text/plain"),
])
def test_malformed_body_or_content_type_is_400(server, raw, content_type):
    status, body = http("POST", server.url + COMPLETIONS, raw=raw, headers={"Content-Type": content_type})
    _assert_error(status, body, 400)


def test_unknown_model_and_route_are_404(server):
    status, body = http("POST", server.url + COMPLETIONS, {"model": "gpt-17", "prompt": "x"})
    _assert_error(status, body, 404, "model")
    status, body = http("POST", server.url + CHAT, {"model": "gpt-17", "messages": USER})
    _assert_error(status, body, 404, "model")
    status, body = http("GET", server.url + "/v1/nothing-here")
    _assert_error(status, body, 404)


def _raw_exchange(port: int, head: bytes) -> tuple[int, dict]:
    """Send a raw request head (no body) and parse the status line and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(body)


def test_oversized_body_is_413_before_reading(server):
    # Declares 1 GiB and sends none of it: the answer must come without the body being read.
    head = (f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n").encode()
    status, body = _raw_exchange(server.port, head)
    _assert_error(status, body, 413)


def test_oversized_headers_are_431(server):
    head = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 100_000}\r\n\r\n").encode()
    status, body = _raw_exchange(server.port, head)
    _assert_error(status, body, 431)


def test_server_still_serves_after_bad_requests(server):
    status, body = http("POST", server.url + COMPLETIONS, {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert http("GET", server.url + "/health")[0] == 200


async def test_disconnect_storm_frees_everything(server):
    """Streams and plain requests closed mid-way: running requests and KV usage go back to 0."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Tell me a long story:", "max_tokens": 500, "ignore_eos": True}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def stream_then_leave(i: int) -> None:
            resp = await session.post(server.url + COMPLETIONS, json={**body, "stream": True})
            assert resp.status == 200
            await resp.content.readline()  # the first event arrived: the request is running
            resp.close()

        async def plain_then_leave(i: int) -> None:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(server.url + COMPLETIONS, json=body,
                                   timeout=aiohttp.ClientTimeout(total=2))

        await asyncio.gather(*(stream_then_leave(i) for i in range(8)), *(plain_then_leave(i) for i in range(3)))
    text = await asyncio.to_thread(wait_for_idle, server.url, 10.0)
    assert metric(text, "pagedserve:num_requests_running") == 0
    assert metric(text, "pagedserve:kv_cache_usage_perc") == 0
