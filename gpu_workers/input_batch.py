"""Per-request state a worker keeps between steps, and the flat tensors of one step's batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from gpu_workers.attention.base import AttentionMetadata
from ipc.messages import NewRequestData
from ipc.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    request_id: str
    token_ids: list[int]  # prompt then outputs; the worker appends what it samples
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    output_index: int
    num_samples: int
    want_prompt_logprobs: bool

    @classmethod
    def from_new(cls, data: NewRequestData) -> "CachedRequestState":
        return cls(data.request_id, data.prompt_token_ids + data.output_token_ids,
                   len(data.prompt_token_ids), data.sampling_params, list(data.block_ids),
                   data.num_computed_tokens, data.num_scheduled_tokens, data.output_index,
                   data.num_samples, data.want_prompt_logprobs and data.sampling_params.prompt_logprobs is not None)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def samples_this_step(self) -> bool:
        """The step computes the last known token, so its logits give the next token."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self.token_ids)


class PromptLogprobsSlice(NamedTuple):
    request: CachedRequestState
    hidden_rows: torch.Tensor  # [k] indices into the step's hidden states
    target_ids: torch.Tensor  # [k] the prompt tokens those rows score
    leading_none: bool  # the slice starts at prompt position 0, which has no logprob


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampling_requests] indices of the last token of each
    sampling_requests: list[CachedRequestState]
    prompt_logprobs: list[PromptLogprobsSlice]


def prepare_inputs(reqs: list[CachedRequestState], block_size: int, device: torch.device) -> StepInputs:
    """Lay the scheduled tokens of `reqs` end to end and build the attention metadata. Slot mapping is
    computed with tensor ops (no Python loop per token)."""
    input_ids: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    sampling: list[CachedRequestState] = []
    prompt_lp: list[PromptLogprobsSlice] = []
    for req in reqs:
        start, n = req.num_computed_tokens, req.num_scheduled_tokens
        input_ids.extend(req.token_ids[start:start + n])
        if req.want_prompt_logprobs and start < req.num_prompt_tokens:
            end = min(start + n, req.num_prompt_tokens - 1)  # rows whose next token is in the prompt
            rows = torch.arange(query_start[-1], query_start[-1] + end - start)
            targets = torch.tensor(req.token_ids[start + 1:end + 1])
            prompt_lp.append(PromptLogprobsSlice(req, rows, targets, start == 0))
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        if req.samples_this_step:
            sample_rows.append(query_start[-1] - 1)
            sampling.append(req)

    max_blocks = max(len(r.block_ids) for r in reqs)
    table = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)  # [num_seqs, max_blocks]
    for i, req in enumerate(reqs):
        table[i, :len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int32)
    q_lens = torch.tensor([r.num_scheduled_tokens for r in reqs])
    starts = torch.tensor([r.num_computed_tokens for r in reqs])
    seq_index = torch.repeat_interleave(torch.arange(len(reqs)), q_lens)  # [num_tokens]
    first_row = torch.tensor(query_start[:-1])
    pos = starts[seq_index] + torch.arange(len(input_ids)) - first_row[seq_index]  # [num_tokens]
    slots = table[seq_index, pos // block_size].to(torch.int64) * block_size + pos % block_size

    max_q = int(q_lens.max())
    meta = AttentionMetadata(
        num_seqs=len(reqs), num_tokens=len(input_ids), max_query_len=max_q, max_seq_len=max(seq_lens),
        slot_mapping=slots.to(device), query_start_loc=torch.tensor(query_start, dtype=torch.int32).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device), block_tables=table.to(device),
        query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens, is_decode_only=max_q == 1)
    return StepInputs(torch.tensor(input_ids, dtype=torch.int64).to(device), pos.to(device), meta,
                      torch.tensor(sample_rows, dtype=torch.int64).to(device), sampling, prompt_lp)
