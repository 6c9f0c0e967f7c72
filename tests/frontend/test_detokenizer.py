"""Incremental detokenization with the bundled model's byte-level BPE tokenizer: multi-byte characters
split across tokens never leak as U+FFFD, the streamed pieces add up to the full decode, and a stop
string never appears, even partly, in what was streamed."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from frontend.detokenizer import IncrementalDetokenizer
from ipc.sampling_params import SamplingParams

TEXTS = [
    "Grüße aus Köln! 你好，世界。 Emoji: 🚀🔥 and a family 👨‍👩‍👧 — done.",
    "   leading spaces, tabs\tand\nnewlines\n\n",
    "naïve café – “quotes” ‘single’ ½ ∑ π ≈ 3.14159",
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    pieces = []
    for token in token_ids:
        detok.add_tokens([token])
        pieces.append(detok.new_text(finished=False))
    pieces.append(detok.new_text(finished=True))
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_valid_text_and_add_up(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text == TEXTS[1]  # bytes split over tokens
    pieces = stream(IncrementalDetokenizer(tokenizer, prompt, SamplingParams()), ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hello<|im_end|> there", add_special_tokens=False)
    skipped = "".join(stream(IncrementalDetokenizer(tokenizer, [], SamplingParams()), ids))
    kept = "".join(stream(IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False)), ids))
    assert "<|im_end|>" not in skipped and "<|im_end|>" in kept
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_never_leaks_into_the_stream(tokenizer, include):
    text = "The answer is 42. STOP HERE and never print this."
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=["STOP HERE"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    pieces = []
    for token in ids:
        detok.add_tokens([token])
        pieces.append(detok.new_text(finished=False))
        streamed = "".join(pieces)
        if not include:  # no prefix of the stop string may have been handed out before the match
            assert not any(streamed.endswith("STOP HERE"[:k]) for k in range(2, 10)) or detok.stop_reason
        if detok.stop_reason:
            break
    pieces.append(detok.new_text(finished=True))
    expected = "The answer is 42. STOP HERE" if include else "The answer is 42. "
    assert detok.stop_reason == "STOP HERE"
    assert "".join(pieces) == expected
