"""SamplingParams: the user-facing knobs of one request, with vLLM's names and defaults.

It is a msgspec Struct so it crosses ZeroMQ as it is (the scheduler reads max_tokens / stop_token_ids,
the worker reads the sampling fields); it carries no tensors.
"""

from __future__ import annotations

import msgspec

_GREEDY_EPS = 1e-5


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    n: int = 1
    """Number of output sequences to return for the prompt (they share the prompt's KV blocks)."""
    temperature: float = 1.0
    """0 means greedy; higher is more random."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or output; 1 disables."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] | str | None = None
    """Strings that end generation; not included in the text unless include_stop_str_in_output."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (the token is kept in token_ids)."""
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    """Most tokens to generate per output; None means up to max_model_len."""
    min_tokens: int = 0
    """Tokens to generate before EOS or stop_token_ids may end the output."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives per position."""
    prompt_logprobs: int | None = None
    """Return logprobs of each prompt token plus this many top alternatives."""
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before sampling (OpenAI's logit_bias)."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled (every other logit is set to -inf first)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 (disabled) or at least 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be greater than 0, got {self.repetition_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs",
               f"must be non-negative, got {self.logprobs}")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
               f"must be non-negative, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in (self.stop or [])), "stop",
               "must be a non-empty string or a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in (self.stop_token_ids or [])),
               "stop_token_ids", "must be a list of non-negative token ids")
        _check(self.allowed_token_ids is None or (
            bool(self.allowed_token_ids) and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids", "must be a non-empty list of non-negative token ids")
        if self.seed is not None:
            _check(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """A presence, frequency or repetition penalty: sampling reads the token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {message}")
