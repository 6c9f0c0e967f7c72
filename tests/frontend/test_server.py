"""The OpenAI-compatible server, driven like its users drive it: the official `openai` client
(sync and async, streaming and not) against scripts/launch.sh serving the bundled model."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.frontend.server_harness import API_KEY, MAX_MODEL_LEN, http, metric, shared_server, wait_for_idle

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(pytestconfig):
    return shared_server(pytestconfig)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model)


def _stream_texts(stream, kind: str = "completion") -> tuple[dict[int, str], dict[int, list[str]], set[str], list]:
    """Joined text per choice index, finish reasons per index, chunk ids, and the chunks."""
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    ids, chunks = set(), []
    for chunk in stream:
        chunks.append(chunk)
        ids.add(chunk.id)
        for choice in chunk.choices:
            piece = choice.text if kind == "completion" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes, ids, chunks


def test_health_version_models(server, client):
    assert http("GET", f"{server.url}/health", headers={"Authorization": ""})[0] == 200
    status, body = http("GET", f"{server.url}/version")
    assert status == 200 and body["version"]
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "pagedserve"
    assert model.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_completion_usage_matches_tokenizer(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6


def test_seeded_sampling_is_reproducible_and_stream_matches(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    texts, finishes, ids, _ = _stream_texts(client.completions.create(stream=True, **kwargs))
    assert texts == {0: first}
    assert finishes == {0: ["length"]} and len(ids) == 1


def test_prompt_lists_and_n(client, tokenizer):
    prompts = ["One, two,", "Red, green,"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: n copies agree
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 16
    # the same prompts as token ids, alone and as a list of lists
    ids = [tokenizer.encode(p) for p in prompts]
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=4, temperature=0)
    assert single.choices[0].text == by_index[0]
    listed = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert {c.index: c.text for c in listed.choices} == {0: by_index[0], 1: by_index[2]}
    # streamed: every index once finished, same texts
    stream = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0, stream=True)
    texts, finishes, ids_seen, _ = _stream_texts(stream)
    assert texts == by_index and len(ids_seen) == 1
    assert finishes == {i: ["length"] for i in range(4)}


def test_completion_logprobs_and_echo(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    # greedy: the chosen token is the most likely one
    assert all(top[tok] == pytest.approx(max(top.values())) for tok, top in zip(lp.tokens, lp.top_logprobs))

    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                     echo=True)
    choice = echo.choices[0]
    assert choice.text == PROMPT + out.choices[0].text
    n_prompt = len(tokenizer.encode(PROMPT))
    assert len(choice.logprobs.tokens) == n_prompt + 5
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_stop_string_cuts_text_stream_and_not(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = greedy.split()
    assert len(words) >= 3, greedy
    stop = " " + words[2]
    expected = greedy[:greedy.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    texts, finishes, _, _ = _stream_texts(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                  stream=True))
    assert texts == {0: expected} and finishes == {0: ["stop"]}


def test_chat_completion_stream_and_not(client, tokenizer):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    text = out.choices[0].message.content
    flat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    expected_prompt = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tokenizer.encode(expected_prompt, add_special_tokens=False))
    assert out.usage.completion_tokens == 8 or out.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    texts, finishes, ids, chunks = _stream_texts(stream, kind="chat")
    assert texts == {0: text} and len(ids) == 1
    assert finishes == {0: [out.choices[0].finish_reason]}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_allowed_token_ids_are_the_only_tokens_sampled(client, tokenizer):
    [paris] = tokenizer.encode(" Paris")
    out = client.completions.create(model=MODEL, prompt="Name a city:", max_tokens=3, temperature=1.0,
                                    extra_body={"allowed_token_ids": [paris]})
    assert out.choices[0].text == tokenizer.decode([paris] * 3) and out.usage.completion_tokens == 3


def test_best_of_returns_the_most_likely_of_its_samples(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11)
    every = client.completions.create(n=4, logprobs=0, **kw)  # the same four samples (one seed)
    cumulative = [sum(c.logprobs.token_logprobs) for c in every.choices]
    order = sorted(range(4), key=lambda i: cumulative[i], reverse=True)
    assert len({c.text for c in every.choices}) > 2
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [every.choices[i].text for i in order[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == sum(len(every.choices[i].logprobs.tokens) for i in order[:2])


def test_prompt_logprobs_equal_transformers(client, default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(default_model).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    positions = out.choices[0].model_extra["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    for pos, (token, entry) in enumerate(zip(ids[1:], positions[1:]), start=1):
        want = reference[pos - 1]
        assert abs(entry[str(token)]["logprob"] - want[token].item()) < 1e-3
        assert entry[str(token)]["rank"] == int((want > want[token]).sum()) + 1
        top = sorted((v["rank"], int(k)) for k, v in entry.items() if v["rank"] <= 2)
        assert [t for _, t in top][:2] == want.topk(2).indices.tolist()
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1, extra_body={"prompt_logprobs": 3})
    assert echoed.choices[0].logprobs.token_logprobs[1:len(ids)] == [
        entry[str(t)]["logprob"] for t, entry in zip(ids[1:], positions[1:])]
    assert all(len(alts) <= 2 for alts in echoed.choices[0].logprobs.top_logprobs[1:])  # logprobs=1, not 3


def test_chat_continues_the_final_message(client, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "prompt_logprobs": 0})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    assert rendered.endswith("The capital of France is")
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(prompt_ids) == len(out.model_extra["prompt_logprobs"])
    same = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == same.choices[0].text != ""


def test_text_format_and_unused_tools_are_served_json_mode_is_refused(client):
    messages = [{"role": "user", "content": "Name a color."}]
    tools = [{"type": "function", "function": {"name": "get_color", "parameters": {"type": "object"}}}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    same = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          response_format={"type": "text"}, tools=tools, tool_choice="none")
    assert same.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       response_format={"type": "json_object"})
    assert "response_format" in refused.value.message and refused.value.body["param"] == "response_format"


def test_chat_logprobs_and_n(client):
    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.9, seed=5,
                                         n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        content = choice.logprobs.content
        joined = "".join(entry.token for entry in content)
        assert joined == choice.message.content or choice.finish_reason == "stop"
        assert all(len(entry.top_logprobs) == 2 for entry in content)
        assert all(entry.bytes == list(entry.token.encode()) for entry in content)
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


async def test_concurrent_streams_equal_solo_outputs(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    prompts = [f"Fact number {i}: the" for i in range(32)]

    async def run(prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    solo = []
    for prompt in prompts:
        out = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        solo.append(out.choices[0].text)
    together = await asyncio.gather(*(run(p) for p in prompts))
    assert list(together) == solo
    await client.close()


def test_tokenize_and_detokenize(server, tokenizer):
    status, body = http("POST", f"{server.url}/tokenize", {"prompt": PROMPT})
    assert status == 200
    assert body == {"count": len(tokenizer.encode(PROMPT)), "max_model_len": MAX_MODEL_LEN,
                    "tokens": tokenizer.encode(PROMPT)}
    status, chat = http("POST", f"{server.url}/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["count"] > 5
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]
    status, open_ended = http("POST", f"{server.url}/tokenize", {"messages": messages, "add_generation_prompt": False,
                                                                 "continue_final_message": True})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    assert status == 200 and open_ended["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    status, body = http("POST", f"{server.url}/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and body == {"prompt": PROMPT}


def test_metrics_after_requests(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    text = wait_for_idle(server.url)
    for name in ("pagedserve:num_requests_running", "pagedserve:num_requests_waiting",
                 "pagedserve:kv_cache_usage_perc", "pagedserve:prefix_cache_queries_total",
                 "pagedserve:prefix_cache_hits_total", "pagedserve:num_preemptions_total"):
        metric(text, name)
    assert metric(text, "pagedserve:prompt_tokens_total") > 0
    assert metric(text, "pagedserve:generation_tokens_total") >= 3
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert metric(text, f"pagedserve:{name}_count") > 0
    assert metric(text, "pagedserve:kv_cache_usage_perc") == 0


def test_api_key_required_on_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, body = http("GET", f"{server.url}/v1/models", headers={"Authorization": "", **headers})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = http("POST", f"{server.url}/v1/completions", {"prompt": "x"}, headers={"Authorization": ""})
    assert status == 401
    assert http("GET", f"{server.url}/health", headers={"Authorization": ""})[0] == 200
    assert http("GET", f"{server.url}/metrics", headers={"Authorization": ""})[0] == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
