"""The OpenAI wire format: request validation, error bodies, and requests -> SamplingParams.

Every client mistake becomes an ApiError whose body is OpenAI's

    {"error": {"message": ..., "type": ..., "param": <field or null>, "code": <str or null>}}

Requests are plain JSON dicts checked field by field (bool is never accepted where a number is
expected). Range checks live in one place, SamplingParams.__post_init__; its ValueError
("SamplingParams.<field> ...") is turned into a 400 naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from http import HTTPStatus

from ipc.sampling_params import SamplingParams

MAX_N = 16
"""Most outputs per prompt (n)."""
MAX_LOGPROBS = 20
"""Most alternatives per position: completions' `logprobs`, chat's `top_logprobs`."""
CHAT_ROLES = ("system", "user", "assistant")
_INT64 = 1 << 63

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 431: "invalid_request_error"}


class ApiError(Exception):
    """A request that fails with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        fallback = "server_error" if status >= 500 else HTTPStatus(status).phrase
        self.type = type or _ERROR_TYPES.get(status, fallback)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------- typed field reads

_KINDS = {
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "bool": ((bool,), "a boolean"),
    "str": ((str,), "a string"),
    "dict": ((dict,), "an object"),
    "list": ((list,), "an array"),
}


def read(body: dict, name: str, kind: str, default=None):
    """body[name] checked to be of `kind` (null counts as absent); ApiError(400) otherwise."""
    value = body.get(name)
    if value is None:
        return default
    types, words = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
        raise bad_request(f"'{name}' must be {words}, got {type(value).__name__}", name)
    if kind in ("int", "number") and not (math.isfinite(value) and abs(value) < _INT64):
        raise bad_request(f"'{name}' is out of range: {value}", name)
    return value


def read_stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop or None
    raise bad_request("'stop' must be a string or an array of strings", "stop")


def read_logit_bias(body: dict) -> dict[int, float] | None:
    bias = read(body, "logit_bias", "dict")
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out[token] = float(value)
    return out


def read_stream_options(body: dict, stream: bool) -> bool:
    """include_usage; stream_options is only valid with stream=true."""
    options = read(body, "stream_options", "dict")
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return include


_STRUCTURED_OUTPUT_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
"""vLLM's own constrained-decoding fields (extra_body): refused like response_format's JSON modes."""


def refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields whose request this server cannot honour become a 400, never a silently different answer:
    constrained decoding (response_format json_object / json_schema, vLLM's guided_* fields) and, on
    chat, tool calling (tools with a tool_choice other than "none", as vLLM answers without
    --enable-auto-tool-choice)."""
    response_format = read(body, "response_format", "dict")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise bad_request(f"response_format {response_format.get('type')!r} is not supported: this server has "
                          "no structured-output (constrained decoding) backend; only 'text' is", "response_format")
    for name in _STRUCTURED_OUTPUT_FIELDS:
        if body.get(name) is not None:
            raise bad_request(f"'{name}' is not supported: this server has no structured-output (constrained "
                              "decoding) backend", name)
    if not chat:
        return
    tools = read(body, "tools", "list")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto", "required") and not isinstance(tool_choice, dict):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a named tool", "tool_choice")
    if (tools or body.get("functions") or tool_choice not in (None, "none")) and tool_choice != "none":
        raise bad_request("tool calling is not supported by this server: send 'tool_choice': 'none' (the "
                          "tools are then ignored) or leave 'tools' out", "tool_choice" if tool_choice else "tools")


def read_sampling(body: dict) -> dict:
    """The SamplingParams keywords shared by both endpoints (max_tokens and logprobs aside),
    type-checked and range-checked."""
    n = read(body, "n", "int", 1)
    if n > MAX_N:
        raise bad_request(f"'n' must be at most {MAX_N}, got {n}", "n")
    kwargs = dict(
        n=n, temperature=float(read(body, "temperature", "number", 1.0)),
        top_p=float(read(body, "top_p", "number", 1.0)), top_k=read(body, "top_k", "int", 0),
        min_p=float(read(body, "min_p", "number", 0.0)),
        presence_penalty=float(read(body, "presence_penalty", "number", 0.0)),
        frequency_penalty=float(read(body, "frequency_penalty", "number", 0.0)),
        repetition_penalty=float(read(body, "repetition_penalty", "number", 1.0)),
        seed=read(body, "seed", "int"), stop=read_stop(body),
        stop_token_ids=read(body, "stop_token_ids", "list"),
        include_stop_str_in_output=read(body, "include_stop_str_in_output", "bool", False),
        min_tokens=read(body, "min_tokens", "int", 0), ignore_eos=read(body, "ignore_eos", "bool", False),
        skip_special_tokens=read(body, "skip_special_tokens", "bool", True),
        logit_bias=read_logit_bias(body), allowed_token_ids=read(body, "allowed_token_ids", "list"))
    make_sampling_params(kwargs, None)  # range checks now, before any tokenization
    return kwargs


def make_sampling_params(kwargs: dict, max_tokens: int | None, logprobs: int | None = None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        message = str(e).removeprefix("SamplingParams.")
        raise bad_request(message, message.split(" ", 1)[0]) from None


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """vLLM's default (the rest of the context) and its limit check."""
    if requested is not None and requested < 1:
        raise bad_request(f"'{param}' must be at least 1, got {requested}", param)
    max_tokens = requested if requested is not None else max_model_len - prompt_len
    if max_tokens < 1 or prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, {max(max_tokens, 1)} for "
            f"the completion). Please reduce the length of the prompt or the completion.",
            param if requested is not None else "prompt", "context_length_exceeded")
    return max_tokens


# ---------------------------------------------------------------- the two generation requests


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions, validated."""

    model: str | None
    prompts: list[str | list[int]]
    """One entry per prompt: text, or token ids."""
    sampling: dict
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    """Outputs to sample per prompt, of which the n with the highest cumulative logprob are returned
    (None: n)."""
    prompt_logprobs: int | None = None
    """vLLM's extra field: each prompt position's logprob and this many alternatives."""


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions, validated; message contents are joined into strings."""

    model: str | None
    messages: list[dict]
    sampling: dict
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """vLLM's extra field: the last (assistant) message is left open for the model to continue."""
    prompt_logprobs: int | None = None
    extra: dict = field(default_factory=dict)
    """chat_template_kwargs: extra variables for the chat template."""
    max_tokens_param: str = "max_tokens"
    """Which field max_tokens came from (max_completion_tokens wins), for error messages."""


def read_logprobs_count(body: dict, name: str) -> int | None:
    value = read(body, name, "int")
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"'{name}' must be in [0, {MAX_LOGPROBS}], got {value}", name)
    return value


def read_prompt_logprobs(body: dict, stream: bool) -> int | None:
    prompt_logprobs = read_logprobs_count(body, "prompt_logprobs")
    if prompt_logprobs is not None and stream:
        raise bad_request("'prompt_logprobs' is not available with 'stream': true", "prompt_logprobs")
    return prompt_logprobs


def read_best_of(body: dict, n: int, stream: bool) -> int | None:
    """OpenAI's best_of: at least n, at most MAX_N, not streamed; None where it changes nothing."""
    best_of = read(body, "best_of", "int")
    if best_of is None or best_of == n:
        return None
    if not n <= best_of <= MAX_N:
        raise bad_request(f"'best_of' must be in [n, {MAX_N}] (n = {n}), got {best_of}", "best_of")
    if stream:
        raise bad_request("'best_of' cannot be used with 'stream': true", "best_of")
    return best_of


def parse_completion(body: dict) -> CompletionRequest:
    stream = read(body, "stream", "bool", False)
    logprobs = read_logprobs_count(body, "logprobs")
    read(body, "user", "str")
    if read(body, "suffix", "str"):
        raise bad_request("'suffix' is not supported", "suffix")
    refuse_unsupported(body, chat=False)
    sampling = read_sampling(body)
    return CompletionRequest(
        read(body, "model", "str"), parse_prompts(body.get("prompt")), sampling,
        read(body, "max_tokens", "int"), stream, read_stream_options(body, stream),
        read(body, "echo", "bool", False), logprobs, read_best_of(body, sampling["n"], stream),
        read_prompt_logprobs(body, stream))


def parse_prompts(prompt) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts, none of them empty."""
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_token_id(t) for t in p)
                                                     for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("'prompt' must be a non-empty string, array of strings, array of token ids, "
                          "or array of token-id arrays", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise bad_request("'prompt' must not be empty", "prompt")
    return prompts


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (size {vocab_size})", param)


def parse_chat(body: dict) -> ChatRequest:
    stream = read(body, "stream", "bool", False)
    logprobs = read(body, "logprobs", "bool", False)
    top_logprobs = read_logprobs_count(body, "top_logprobs")
    if top_logprobs is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = read(body, max_tokens_param, "int")
    read(body, "user", "str")
    refuse_unsupported(body, chat=True)
    add_generation_prompt = read(body, "add_generation_prompt", "bool", True)
    continue_final_message = read(body, "continue_final_message", "bool", False)
    if add_generation_prompt and continue_final_message:
        raise bad_request("'continue_final_message' needs 'add_generation_prompt': false", "continue_final_message")
    return ChatRequest(
        read(body, "model", "str"), parse_messages(body.get("messages")), read_sampling(body), max_tokens,
        stream, read_stream_options(body, stream), logprobs, top_logprobs, add_generation_prompt,
        continue_final_message, read_prompt_logprobs(body, stream), read(body, "chat_template_kwargs", "dict", {}),
        max_tokens_param)


def parse_messages(messages) -> list[dict]:
    """[{role, content}] with content a string or text parts -> [{role, content: str}]."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                              "messages")
        out.append({"role": role, "content": _message_text(msg.get("content"), role, i)})
    return out


def _message_text(content, role: str, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                  "other content types are not supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts", "messages")
