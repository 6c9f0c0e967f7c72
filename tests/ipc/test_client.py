"""The embeddable EngineClient against a real server started by scripts/launch.sh: a second client
on the same engine over ZeroMQ, no HTTP."""

from __future__ import annotations

import asyncio
import re

import pytest

from ipc.client import EngineClient
from ipc.sampling_params import SamplingParams
from tests.frontend.server_harness import http, metric, shared_server


@pytest.fixture(scope="module")
def server(pytestconfig):
    return shared_server(pytestconfig)


def _ipc_dir(server) -> str:
    for line in server.output:
        match = re.match(r"pagedserve: engine sockets in (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("the server did not print its socket directory")


async def test_embedded_client_generates_what_http_returns(server):
    status, body = http("POST", f"{server.url}/v1/completions",
                        {"model": body_model(server), "prompt": "The capital of France is", "max_tokens": 8,
                         "temperature": 0})
    assert status == 200
    client = EngineClient(_ipc_dir(server))
    await client.start()
    try:
        text = ""
        async for out in client.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0)):
            text += out.new_text[0]
        assert out.finished and out.outputs[0].text == text
        assert text == body["choices"][0]["text"]
    finally:
        await client.close()


async def test_cancelling_an_embedded_stream_aborts_the_request(server):
    client = EngineClient(_ipc_dir(server))
    await client.start()
    got_tokens = asyncio.Event()

    async def consume():
        async for _ in client.generate("Tell me a long story", SamplingParams(max_tokens=500, ignore_eos=True)):
            got_tokens.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_tokens.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        for _ in range(50):  # the abort frees the request's blocks within a second or two
            _, text = http("GET", f"{server.url}/metrics")
            if metric(text, "pagedserve:num_requests_running") == 0:
                break
            await asyncio.sleep(0.1)
        assert metric(text, "pagedserve:num_requests_running") == 0
        assert metric(text, "pagedserve:kv_cache_usage_perc") == 0
    finally:
        await client.close()


def body_model(server) -> str:
    _, models = http("GET", f"{server.url}/v1/models")
    return models["data"][0]["id"]
