"""Per-request state a worker keeps between steps, and the flat tensors of one step's batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress
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
    slot: int = -1
    """Its row in the runner's BlockTable, which mirrors block_ids."""
    argmax_only: bool = field(init=False)
    """Every draw is the argmax, whatever the position (see argmax_only): no sampler rows needed."""

    def __post_init__(self) -> None:
        self.argmax_only = argmax_only(self.sampling_params)

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


def greedy_without_processors(params: SamplingParams) -> bool:
    """Greedy with no penalty, logit bias, allowed-token list or logprobs: the sampler would just take the
    argmax, unless min_tokens blocks some tokens at this position."""
    return (params.greedy and params.logit_bias is None and params.allowed_token_ids is None
            and params.logprobs is None and not params.has_penalties)


def argmax_only(params: SamplingParams) -> bool:
    """greedy_without_processors, and min_tokens never blocks a token: it is 0, or EOS is ignored and
    there are no stop tokens (so the blocked list is empty even before min_tokens)."""
    return greedy_without_processors(params) and (
        params.min_tokens == 0 or (params.ignore_eos and not params.stop_token_ids))


class BlockTable:
    """The block ids of every request the worker holds, one row per slot, kept from step to step and
    updated from the plan's diffs, so that a step's table is one numpy gather, not a rebuild from lists.

        slot 0: [12 13 14  0  0]   num_blocks 3
        slot 1: [ 0  0  0  0  0]   free
        slot 2: [ 7  8  9 10 11]   num_blocks 5

    Invariant: entries past a row's num_blocks are 0 (the padding a step's table has), also in free
    rows. Rows and columns grow when needed."""

    def __init__(self, num_slots: int = 16, max_blocks: int = 16) -> None:
        self.table = np.zeros((max(num_slots, 1), max(max_blocks, 1)), np.int32)  # [num_slots, max_blocks]
        self.num_blocks = np.zeros(len(self.table), np.int64)  # [num_slots]
        self.free_slots = list(range(len(self.table) - 1, -1, -1))  # pop() hands out low slots first

    def add(self, block_ids: list[int]) -> int:
        """A row for a new request; returns its slot."""
        if not self.free_slots:
            self._grow_rows()
        slot = self.free_slots.pop()
        self.append(slot, block_ids)
        return slot

    def append(self, slot: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[slot])
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            self.table = np.pad(self.table, ((0, 0), (0, max(end, 2 * self.table.shape[1]) - self.table.shape[1])))
        self.table[slot, start:end] = block_ids
        self.num_blocks[slot] = end

    def replace(self, slot: int, block_ids: list[int]) -> None:
        self._clear(slot)
        self.append(slot, block_ids)

    def free(self, slot: int) -> None:
        self._clear(slot)
        self.free_slots.append(slot)

    def _clear(self, slot: int) -> None:
        self.table[slot, :self.num_blocks[slot]] = 0
        self.num_blocks[slot] = 0

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """[len(slots), most blocks among them] int32: the slots' block ids, padded with 0."""
        width = int(self.num_blocks[slots].max()) if len(slots) else 0
        return self.table[slots, :width]

    def _grow_rows(self) -> None:
        old = len(self.table)
        self.table = np.pad(self.table, ((0, old), (0, 0)))
        self.num_blocks = np.pad(self.num_blocks, (0, old))
        self.free_slots.extend(range(2 * old - 1, old - 1, -1))


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


def host_to_device(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(data, dtype=dtype) on `device` without waiting for the GPU. On CUDA a plain
    torch.tensor(data, device=...) or .to(device) copies from pageable memory and synchronizes the
    stream: the host would stall until the step's forward pass, queued before it, had run, and the
    next step could not be prepared meanwhile. Staged in pinned memory instead (the caching host
    allocator keeps that block until the copy has run), the copy is queued like a kernel."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostStaging:
    """Reused host buffers (pinned on CUDA) through which a step's index arrays reach the device in
    one copy per dtype. Before refilling, wait for the previous copy: a step that samples nothing
    never synchronizes, so that copy may still be queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.copied: dict[torch.dtype, torch.cuda.Event] = {}

    def to_device(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """The arrays as device tensors of `dtype`, views of one copy. Each view starts 16-byte aligned:
        Triton specializes kernels on pointer alignment, so an unaligned view (its offset depending on
        the batch size) would compile another variant of a kernel, about a second, mid-run."""
        align = max(16 // dtype.itemsize, 1)
        sizes = [-(-a.size // align) * align for a in arrays]
        total = sum(sizes)
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < total:
            buf = torch.empty(max(total, 4096), dtype=dtype, pin_memory=self.device.type == "cuda")
            self.buffers[dtype] = buf
        elif dtype in self.copied:
            self.copied[dtype].synchronize()
        host = buf[:total]
        host_np, at = host.numpy(), 0
        for a, size in zip(arrays, sizes):
            host_np[at:at + a.size] = a.ravel()
            at += size
        if self.device.type == "cuda":
            dev = host.to(self.device, non_blocking=True)
            self.copied[dtype] = torch.cuda.Event()
            self.copied[dtype].record()
        else:
            dev = host.clone()
        return [part[:a.size] for part, a in zip(dev.split(sizes), arrays)]


def prepare_inputs(reqs: list[CachedRequestState], block_table: BlockTable, block_size: int, device: torch.device,
                   staging: HostStaging | None = None) -> StepInputs:
    """Lay the scheduled tokens of `reqs` end to end and build the attention metadata. Index math is
    vectorized numpy (a few passes over the requests, no Python loop per token); the block tables
    are gathered from `block_table` (rows req.slot); everything reaches the device in two copies."""
    staging = staging or HostStaging(device)
    num_seqs = len(reqs)
    q_lens = np.fromiter((r.num_scheduled_tokens for r in reqs), np.int64, num_seqs)
    starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, num_seqs)
    num_known = np.fromiter((len(r.token_ids) for r in reqs), np.int64, num_seqs)  # tokens on the host
    num_pending = np.fromiter((r.num_pending for r in reqs), np.int64, num_seqs)
    query_start = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(q_lens, out=query_start[1:])
    last_rows = query_start[1:] - 1  # [num_seqs] each request's last token in the batch
    num_tokens = int(query_start[-1])
    max_q = int(q_lens.max())
    seq_lens = starts + q_lens
    # A request whose last scheduled token is still being sampled on the device (the step in flight)
    # gets a 0 there; feed_rows tells the runner where to copy the real one from.
    fed = seq_lens > num_known  # [num_seqs] bool
    # The step computes a request's last token, so its logits give the next one.
    samples = seq_lens == num_known + num_pending  # [num_seqs] bool
    input_ids = _input_ids(reqs, q_lens, query_start, max_q)
    seq_index = np.repeat(np.arange(num_seqs), q_lens)  # [num_tokens]
    pos = starts[seq_index] + np.arange(num_tokens) - query_start[:-1][seq_index]  # [num_tokens]
    table = block_table.rows(np.fromiter((r.slot for r in reqs), np.int64, num_seqs))  # [num_seqs, max_blocks]
    slots = table[seq_index, pos // block_size].astype(np.int64) * block_size + pos % block_size

    sampling = list(compress(reqs, samples.tolist()))
    sample_rows = last_rows[samples]
    prompt_lp = _prompt_logprob_slices(reqs, query_start)
    feed_dst = last_rows[fed]
    feed_src = np.fromiter((r.pending_row for r in compress(reqs, fed.tolist())), np.int64, len(feed_dst))
    ids_d, pos_d, slots_d, rows_d, dst_d, src_d = staging.to_device(
        [input_ids, pos, slots, sample_rows, feed_dst, feed_src], torch.int64)
    int32 = [query_start.astype(np.int32), seq_lens.astype(np.int32), table]
    mixed = max_q > 1 and q_lens.min() == 1
    if mixed:  # decodes beside prefills: each kind goes to its own attention kernel
        int32 += [np.flatnonzero(q_lens == 1).astype(np.int32), np.flatnonzero(q_lens > 1).astype(np.int32)]
    qsl_d, seq_lens_d, table_d, *kinds_d = staging.to_device(int32, torch.int32)
    meta = AttentionMetadata(
        num_seqs=num_seqs, num_tokens=num_tokens, max_query_len=max_q, max_seq_len=int(seq_lens.max()),
        slot_mapping=slots_d, query_start_loc=qsl_d, seq_lens=seq_lens_d,
        block_tables=table_d.view(num_seqs, -1), query_start_loc_cpu=query_start.tolist(),
        seq_lens_cpu=seq_lens.tolist(), is_decode_only=max_q == 1,
        decode_seq_ids=kinds_d[0] if mixed else None, prefill_seq_ids=kinds_d[1] if mixed else None)
    return StepInputs(ids_d, pos_d, meta, rows_d, sampling, prompt_lp, (dst_d, src_d) if len(feed_dst) else None)


def _input_ids(reqs: list[CachedRequestState], q_lens: np.ndarray, query_start: np.ndarray,
               max_q: int) -> np.ndarray:
    """[num_tokens] the scheduled tokens, 0 where a token is still on the device. One pass for the
    first token of every request (a decode's only one), then one slice per multi-token request."""
    first = np.fromiter((r.token_ids[r.num_computed_tokens] if r.num_computed_tokens < len(r.token_ids) else 0
                         for r in reqs), np.int64, len(reqs))
    if max_q == 1:  # decode: one token each
        return first
    input_ids = np.zeros(int(query_start[-1]), np.int64)
    single = q_lens == 1
    input_ids[query_start[:-1][single]] = first[single]
    for i in np.flatnonzero(q_lens > 1).tolist():
        r = reqs[i]
        known = r.token_ids[r.num_computed_tokens:r.num_computed_tokens + r.num_scheduled_tokens]
        input_ids[query_start[i]:query_start[i] + len(known)] = known
    return input_ids


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
