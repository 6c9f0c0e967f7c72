"""Edits to a step's logits before sampling, in vLLM's order: allowed_token_ids (every other token to
-inf), logit_bias, blocked tokens (min_tokens not reached), then the repetition / frequency / presence
penalties. All out of place: the caller's logits (and the raw logprobs taken from them) stay as the
model produced them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpu_workers.input_batch import host_to_device

if TYPE_CHECKING:
    from gpu_workers.sampler import SamplingBatch


def apply_logit_bias_and_blocks(logits: torch.Tensor, logit_bias: list[dict[int, float] | None],
                                blocked_token_ids: list[list[int]],
                                allowed_token_ids: list[list[int] | None] | None = None) -> torch.Tensor:
    """Keeps only each row's allowed tokens (where it has a list), adds its logit_bias, then sets its
    blocked tokens to -inf (out of place).

    Token ids outside [0, V) are ignored: a bad request must not take the worker down.
    """
    vocab_size = logits.shape[1]
    if allowed_token_ids and any(allowed_token_ids):
        logits = _keep_only(logits, allowed_token_ids)
    if any(logit_bias):
        entries = [(row, int(token_id), float(value))
                   for row, bias in enumerate(logit_bias) if bias
                   for token_id, value in bias.items() if 0 <= int(token_id) < vocab_size]
        logits = _put(logits, entries, accumulate=True)
    if any(blocked_token_ids):
        entries = [(row, token_id, float("-inf"))
                   for row, blocked in enumerate(blocked_token_ids)
                   for token_id in blocked if 0 <= token_id < vocab_size]
        logits = _put(logits, entries, accumulate=False)
    return logits


def _keep_only(logits: torch.Tensor, allowed_token_ids: list[list[int] | None]) -> torch.Tensor:
    """-inf everywhere but the allowed tokens of the rows that list some (other rows untouched; as is a
    row whose list holds no token id of the vocabulary, which the frontends refuse: never a row of all
    -inf)."""
    vocab_size = logits.shape[1]
    rows = [row for row, allowed in enumerate(allowed_token_ids)
            if allowed and any(0 <= token_id < vocab_size for token_id in allowed)]
    entries = [(row, token_id) for row in rows for token_id in allowed_token_ids[row] if 0 <= token_id < vocab_size]
    drop = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # [S, V]
    drop[host_to_device(rows, torch.int64, logits.device)] = True
    if entries:
        index = tuple(host_to_device(list(col), torch.int64, logits.device) for col in zip(*entries))
        drop.index_put_(index, torch.zeros((), dtype=torch.bool, device=logits.device))
    return logits.masked_fill(drop, float("-inf"))  # [S, V]


def _put(logits: torch.Tensor, entries: list[tuple[int, int, float]], accumulate: bool) -> torch.Tensor:
    """Writes (row, token_id, value) entries into a copy of logits [S, V] in one index_put."""
    if not entries:
        return logits
    rows, cols, values = zip(*entries)
    index = (host_to_device(rows, torch.int64, logits.device), host_to_device(cols, torch.int64, logits.device))
    values_t = host_to_device(values, logits.dtype, logits.device)  # [num_entries]
    return logits.index_put(index, values_t, accumulate=accumulate)  # [S, V]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM's penalties, out of place. For each token t of row r:
    repetition: if t is in the prompt or the output, logit / rp when positive, logit * rp otherwise;
    then logit -= frequency_penalty * count_out(t) + presence_penalty * (count_out(t) > 0).
    """
    num_rows, vocab_size = logits.shape
    output_counts = token_counts(batch.output_token_ids, vocab_size, logits.device)  # [S, V]
    output_seen = output_counts > 0  # [S, V]
    if not batch.no_repetition_penalty:
        prompt_seen = token_counts(batch.prompt_token_ids, vocab_size, logits.device) > 0  # [S, V]
        penalty = batch.repetition_penalty[:, None]  # [S, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # [S, V]
        logits = torch.where(prompt_seen | output_seen, penalized, logits)  # [S, V]
    logits = logits - batch.frequency_penalty[:, None] * output_counts  # [S, V]
    return logits - batch.presence_penalty[:, None] * output_seen  # [S, V]


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How many times each token id occurs in each row's list, [S, V] float32, by one scatter_add
    over a padded [S, max_len] id tensor (padding and ids outside [0, V) count 0)."""
    counts = torch.zeros(len(token_ids), vocab_size, device=device)  # [S, V]
    max_len = max(map(len, token_ids), default=0)
    if max_len == 0:
        return counts
    padded = host_to_device([ids + [0] * (max_len - len(ids)) for ids in token_ids], torch.int64,
                            device)  # [S, max_len]
    lengths = host_to_device([len(ids) for ids in token_ids], torch.int64, device)  # [S]
    valid = torch.arange(max_len, device=device)[None, :] < lengths[:, None]  # [S, max_len]
    valid &= (padded >= 0) & (padded < vocab_size)
    return counts.scatter_add_(1, padded.clamp(0, vocab_size - 1), valid.float())  # [S, V]
