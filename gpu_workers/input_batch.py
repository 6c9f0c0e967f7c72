"""Per-request state a worker keeps between steps, and the flat tensors of one step's batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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
    num_pending: int = 0
    """Tokens sampled by launched steps but not yet appended to token_ids (still on the device)."""
    pending_row: int = 0
    """The row of the latest of those tokens in its step's sampled-token tensor."""

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
    def num_tokens(self) -> int:
        """Prompt and output tokens, counting those still on the device."""
        return len(self.token_ids) + self.num_pending

    @property
    def samples_this_step(self) -> bool:
        """The step computes the last token, so its logits give the next token."""
        return self.num_computed_tokens + self.num_scheduled_tokens == self.num_tokens


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
    feed_rows: tuple[torch.Tensor, torch.Tensor] | None
    """(rows of input_ids, rows of the step in flight's sampled tokens): inputs whose token is still on
    the device, to copy there before the forward; None when every input token is known."""


class HostStaging:
    """Reused host buffers (pinned on CUDA) through which a step's index arrays reach the device in
    one copy per dtype. Before refilling, wait for the previous copy: a step that samples nothing
    never synchronizes, so that copy may still be queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.copied: dict[torch.dtype, torch.cuda.Event] = {}

    def to_device(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < total:
            buf = torch.empty(max(total, 4096), dtype=dtype, pin_memory=self.device.type == "cuda")
            self.buffers[dtype] = buf
        elif dtype in self.copied:
            self.copied[dtype].synchronize()
        host = buf[:total]
        np.concatenate([a.ravel() for a in arrays], out=host.numpy())
        if self.device.type == "cuda":
            dev = host.to(self.device, non_blocking=True)
            self.copied[dtype] = torch.cuda.Event()
            self.copied[dtype].record()
        else:
            dev = host.clone()
        return list(dev.split(sizes))


def prepare_inputs(reqs: list[CachedRequestState], block_size: int, device: torch.device,
                   staging: HostStaging | None = None) -> StepInputs:
    """Lay the scheduled tokens of `reqs` end to end and build the attention metadata. Index math is
    vectorized numpy (no Python loop per token); everything reaches the device in two copies."""
    staging = staging or HostStaging(device)
    num_seqs = len(reqs)
    q_lens = np.fromiter((r.num_scheduled_tokens for r in reqs), np.int64, num_seqs)
    starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, num_seqs)
    query_start = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(q_lens, out=query_start[1:])
    num_tokens = int(query_start[-1])
    max_q = int(q_lens.max())
    # A request whose last scheduled token is still being sampled on the device (the step in flight)
    # gets a 0 there; feed_rows tells the runner where to copy the real one from.
    fed = [i for i, r in enumerate(reqs) if r.num_computed_tokens + r.num_scheduled_tokens > len(r.token_ids)]
    if max_q == 1:  # decode: one token each
        input_ids = np.fromiter((r.token_ids[r.num_computed_tokens] if r.num_computed_tokens < len(r.token_ids)
                                 else 0 for r in reqs), np.int64, num_seqs)
    else:
        input_ids = np.zeros(num_tokens, np.int64)
        for i, r in enumerate(reqs):
            known = r.token_ids[r.num_computed_tokens:r.num_computed_tokens + r.num_scheduled_tokens]
            input_ids[query_start[i]:query_start[i] + len(known)] = known
    seq_lens = starts + q_lens
    seq_index = np.repeat(np.arange(num_seqs), q_lens)  # [num_tokens]
    pos = starts[seq_index] + np.arange(num_tokens) - query_start[:-1][seq_index]  # [num_tokens]
    table = np.zeros((num_seqs, max(len(r.block_ids) for r in reqs)), np.int32)  # [num_seqs, max_blocks]
    for i, req in enumerate(reqs):
        table[i, :len(req.block_ids)] = req.block_ids
    slots = table[seq_index, pos // block_size].astype(np.int64) * block_size + pos % block_size

    sampling = [r for r in reqs if r.samples_this_step]
    sample_rows = np.array([query_start[i + 1] - 1 for i, r in enumerate(reqs) if r.samples_this_step], np.int64)
    prompt_lp = _prompt_logprob_slices(reqs, query_start)
    feed_dst = np.array([query_start[i + 1] - 1 for i in fed], np.int64)
    feed_src = np.array([reqs[i].pending_row for i in fed], np.int64)
    ids_d, pos_d, slots_d, rows_d, dst_d, src_d = staging.to_device(
        [input_ids, pos, slots, sample_rows, feed_dst, feed_src], torch.int64)
    qsl_d, seq_lens_d, table_d = staging.to_device(
        [query_start.astype(np.int32), seq_lens.astype(np.int32), table], torch.int32)
    meta = AttentionMetadata(
        num_seqs=num_seqs, num_tokens=num_tokens, max_query_len=max_q, max_seq_len=int(seq_lens.max()),
        slot_mapping=slots_d, query_start_loc=qsl_d, seq_lens=seq_lens_d,
        block_tables=table_d.view(num_seqs, -1), query_start_loc_cpu=query_start.tolist(),
        seq_lens_cpu=seq_lens.tolist(), is_decode_only=max_q == 1)
    return StepInputs(ids_d, pos_d, meta, rows_d, sampling, prompt_lp, (dst_d, src_d) if fed else None)


def _prompt_logprob_slices(reqs: list[CachedRequestState], query_start: np.ndarray) -> list[PromptLogprobsSlice]:
    slices = []
    for i, req in enumerate(reqs):
        start, n = req.num_computed_tokens, req.num_scheduled_tokens
        if req.want_prompt_logprobs and start < req.num_prompt_tokens:
            end = min(start + n, req.num_prompt_tokens - 1)  # rows whose next token is in the prompt
            first = int(query_start[i])
            rows = torch.arange(first, first + max(end - start, 0))
            targets = torch.tensor(req.token_ids[start + 1:end + 1], dtype=torch.int64)
            slices.append(PromptLogprobsSlice(req, rows, targets, start == 0))
    return slices
