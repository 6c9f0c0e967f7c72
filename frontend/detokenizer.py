"""Incremental, UTF-8-safe detokenization with stop strings.

Decoding only the newest tokens would break multi-byte characters and word-leading spaces, and
decoding everything each step is quadratic. So, like vLLM, each output keeps two offsets into its
token list: text is decode(tokens[prefix:]) minus decode(tokens[prefix:read]); a delta that ends in
an incomplete character (U+FFFD) waits for the next token.

Stop strings: the text is cut before the first match (kept with include_stop_str_in_output), and while
streaming, the last len(longest stop) - 1 characters are held back so a stop string never leaks partly.
"""

from __future__ import annotations

from ipc.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop = params.stop or []
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.tokens = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.num_context = len(context)
        self.text = ""
        self.num_emitted = 0  # characters of self.text already handed out
        self.stop_reason: str | None = None

    def add_tokens(self, token_ids: list[int]) -> None:
        """Append tokens, extending the text; sets stop_reason if a stop string appeared."""
        for token_id in token_ids:
            if self.stop_reason is not None:
                return
            self.tokens.append(token_id)
            self._decode_step()

    def _decode_step(self) -> None:
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special)
        full = decode(self.tokens[self.prefix_offset:], skip_special_tokens=self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for more bytes
        new_text = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        start = max(len(self.text) - self.hold, 0)
        self.text += new_text
        if self.stop:
            self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        for stop in self.stop:
            idx = self.text.find(stop, start)
            if idx >= 0:
                self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
                self.stop_reason = stop
                return

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_context:]

    def new_text(self, finished: bool) -> str:
        """Text not handed out yet; while running, minus the held-back tail."""
        end = len(self.text) if finished or self.stop_reason else max(len(self.text) - self.hold, self.num_emitted)
        delta = self.text[self.num_emitted:end]
        self.num_emitted = end
        return delta
