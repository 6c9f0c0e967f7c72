"""Destructive server tests, each on its own server: the request queue limit and a SIGTERM drain;
model aliases, a custom chat template, a stopped worker (/health 503), then SIGKILL of the worker
process mid-stream."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.frontend.server_harness import ServerProcess, http, metric

MODEL = "SmolLM2-135M-Instruct"
LONG = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0}


def _open_stream(url: str, body: dict):
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def _events(resp):
    """The `data:` payloads of an SSE response, as they arrive."""
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: "):]


def _wait_for_metric(url: str, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(http("GET", f"{url}/metrics")[1], name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_queue_limit_then_sigterm_drains_in_flight_requests():
    server = ServerProcess("--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-timeout", "120")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        running = _open_stream(server.url, LONG)
        events = _events(running)
        first = next(events)  # A runs (max_num_seqs=1) ...
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.completions.create, model=MODEL, prompt="Hi", max_tokens=3,
                                 temperature=0)  # ... B waits ...
            _wait_for_metric(server.url, "pagedserve:num_requests_waiting", 1)
            status, body = http("POST", f"{server.url}/v1/completions", {"prompt": "Hi", "max_tokens": 2})
            assert status == 503 and body["error"]["code"] == "queue_full"  # ... C is refused

            server.signal(signal.SIGTERM)
            rest = list(events)
            assert rest[-1] == "[DONE]"
            chunks = [json.loads(e) for e in [first, *rest[:-1]]]
            finishes = [c["choices"][0]["finish_reason"] for c in chunks]
            assert [f for f in finishes if f] == ["length"]
            assert queued.result(timeout=120).usage.completion_tokens == 3
        assert server.wait(120) == 0
        with pytest.raises(urllib.error.URLError):  # no longer listening
            urllib.request.urlopen(f"{server.url}/health", timeout=5)
        assert server.alive_processes() == []
    finally:
        server.kill()


TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def custom_server():
    """--served-model-name and --chat-template; a step unanswered for 3 s makes /health 503; the last
    test of this module kills its worker."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDSERVE_STEP_STUCK_S", "3")
        server = ServerProcess("--served-model-name", "alias-a", "alias-b", "--chat-template", TEMPLATE)
    yield server
    server.kill()


def test_served_model_names_and_chat_template(custom_server):
    url = custom_server.url
    _, models = http("GET", f"{url}/v1/models")
    assert [m["id"] for m in models["data"]] == ["alias-a", "alias-b"]
    messages = [{"role": "user", "content": "hi"}]
    status, body = http("POST", f"{url}/v1/chat/completions", {"model": "alias-b", "messages": messages,
                                                              "max_tokens": 2})
    assert status == 200 and body["model"] == "alias-a"
    _, tokens = http("POST", f"{url}/tokenize", {"messages": messages})
    _, text = http("POST", f"{url}/detokenize", {"tokens": tokens["tokens"]})
    assert text["prompt"] == "[user] hi\n[assistant]"
    assert body["usage"]["prompt_tokens"] == tokens["count"]
    assert http("POST", f"{url}/v1/completions", {"model": MODEL, "prompt": "x"})[0] == 404


def _health(url: str) -> int:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_stopped_worker_turns_health_503_until_it_resumes(custom_server):
    server = custom_server
    [worker] = server.worker_processes()
    assert _health(server.url) == 200
    events = _events(_open_stream(server.url, {**LONG, "max_tokens": 100}))
    next(events)
    worker.suspend()  # alive, but it answers no step: the process check alone would say healthy
    try:
        deadline = time.monotonic() + 30
        while _health(server.url) != 503:
            assert time.monotonic() < deadline, "/health stayed 200 with a stopped worker"
            time.sleep(0.5)
    finally:
        worker.resume()
    assert list(events)[-1] == "[DONE]"  # the request completes once the worker runs again
    assert _health(server.url) == 200


def test_worker_sigkill_ends_streams_with_error_and_exits(custom_server):
    server = custom_server
    try:
        [worker] = server.worker_processes()
        streams = [_events(_open_stream(server.url, {**LONG, "max_tokens": 400})) for _ in range(2)]
        for events in streams:
            next(events)  # both are running

        health: list[int] = []

        def poll_health() -> None:
            while server.proc.poll() is None:
                try:
                    health.append(urllib.request.urlopen(f"{server.url}/health", timeout=5).status)
                except urllib.error.HTTPError as e:
                    health.append(e.code)
                except (urllib.error.URLError, ConnectionError):
                    break
                time.sleep(0.05)

        worker.kill()
        poller = threading.Thread(target=poll_health)
        poller.start()
        for events in streams:
            rest = list(events)
            assert rest[-1] == "[DONE]"
            error = json.loads(rest[-2])["error"]
            assert error["code"] == "engine_dead" and error["message"]
        assert server.wait(60) != 0
        poller.join(10)
        assert 503 in health
        assert server.alive_processes() == []
    finally:
        server.kill()
