"""The sampler: turns one step's logits into token ids (and logprobs), on the worker's device.

One row per sample to draw (a request about to fork into n outputs has n rows with the same logits).
Each row goes through vLLM's order:

    raw logits ──► logprobs = log_softmax(raw)         (only when requested; the model's own view)
        │
        ├─ allowed_token_ids (all others -inf), logit_bias (+), blocked tokens (-inf)
        │                                              (blocked: min_tokens not reached: EOS, stop_token_ids)
        ├─ penalties: repetition (prompt + output), frequency and presence (output)
        ├─ greedy rows (temperature < 1e-5) ──► argmax
        └─ random rows ──► / temperature ──► min_p ──► top_k ──► top_p ──► argmax(probs / q), q ~ Exp(1)

The last step is the exponential race: argmax(p_i / q_i) with q_i i.i.d. Exp(1) picks token i with
probability p_i, and needs no cumsum or multinomial. Unseeded rows draw q from one engine-wide generator;
a seeded row draws its q from a generator seeded with mix(seed, output_index, position), so the same
request gives the same tokens whatever else is in the batch, in any row order, and after preemption
recomputes it; outputs of an n > 1 request differ through output_index.

The torch stages run by default, on CUDA too, where two kernels stand in for the costliest of them:
top-p takes its threshold from kernels/top_p.py instead of sorting the vocabulary (a row without
top_k; `use_top_p_search`), the same kept set found by a search over many programs a row; and the
draw is kernels/gumbel.py's race (`use_gumbel_race`): argmax(y + Gumbel noise) over the kept tokens,
the same distribution as the exponential race, in one read of the logits (of the raw logits in their
own dtype, scaled in the kernel, for a row with temperature alone; with top-p's threshold applied in
the race, not by a masked copy), its noise keyed like the Triton kernel's below. With
$PAGEDSERVE_TRITON_SAMPLING=1 the random rows' stages (temperature to the draw) run as one Triton
kernel instead (kernels/sampling.py: thresholds by pivot search, one program a row,
a Gumbel race on Philox noise keyed by the same mix(seed, output_index, position), or by a fresh
engine-generator draw when unseeded); `use_triton_sampling` says which runs. A seed's tokens are the
same on either GPU path wherever they keep the same tokens; torch's exponential race (the CPU's)
draws other tokens for the same seed.

The torch stages themselves (min-p, top-k / top-p, the logprobs) live in gpu_workers/sampling_ops.py,
and the start-up checks of the kernels against them in gpu_workers/sampler_checks.py.

Everything stays on the device until the final `.tolist()`: only ids and small metadata leave the worker,
and nothing but logprobs waits for the GPU (host lists reach it through pinned memory, `host_to_device`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gpu_workers.input_batch import host_to_device
from gpu_workers.logit_edits import apply_logit_bias_and_blocks, apply_penalties
from gpu_workers.sampler_checks import check_gumbel_race, check_kernel_against_torch, check_top_p_search
from gpu_workers.sampling_ops import apply_min_p, apply_top_k_top_p, apply_top_p_by_search, gather_logprobs
from ipc import envs
from ipc.messages import Logprobs
from ipc.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5
"""Rows with temperature below this are greedy (the same threshold as SamplingParams.greedy)."""
_MASK64 = (1 << 64) - 1
logger = logging.getLogger(__name__)


def use_top_p_search(device: torch.device) -> bool:
    """$PAGEDSERVE_TOP_P_SEARCH (see ipc/envs.py): top-p's threshold by the kernels/top_p.py search
    instead of a vocabulary sort, by default on CUDA; on CPU when set to 1 under the interpreter."""
    return _kernel_by_default(envs.top_p_search(), device)


def use_gumbel_race(device: torch.device) -> bool:
    """$PAGEDSERVE_GUMBEL_RACE (see ipc/envs.py): random rows drawn by kernels/gumbel.py, by default on
    CUDA; on CPU when set to 1 under the interpreter."""
    return _kernel_by_default(envs.gumbel_race(), device)


def _kernel_by_default(setting: str, device: torch.device) -> bool:
    """A kernel the torch stages use unless `setting` is "0": on CUDA, and on CPU under the interpreter
    when it is "1"."""
    if setting == "0":
        return False
    return device.type == "cuda" or (setting == "1" and envs.triton_interpret())


def use_triton_sampling(device: torch.device) -> bool:
    """$PAGEDSERVE_TRITON_SAMPLING=1 (see ipc/envs.py): the Triton kernel on CUDA, and on CPU under the
    interpreter; torch ops otherwise (the default: faster on an H200 up to batch 64)."""
    if envs.triton_sampling() != "triton":
        return False
    return device.type == "cuda" or envs.triton_interpret()


class RowInfo(NamedTuple):
    """What SamplingBatch.build needs to know about one row (one sample to draw this step)."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens this output generated so far; its length is the position of this draw."""
    output_index: int = 0
    """Which of the request's n outputs this row samples for."""
    blocked_token_ids: list[int] = []
    """Token ids forbidden this step (EOS and stop_token_ids while min_tokens is not reached)."""
    position: int | None = None
    """Output tokens generated before this draw, when output_token_ids is left empty (no penalty
    needs the history, so the caller need not copy it every step)."""


@dataclass
class SamplingBatch:
    """The sampling state of one step, S rows. Tensors live on the sampler's device; the rest is host
    metadata. The flags let the sampler skip whole stages without reading tensors back from the device.
    """

    temperature: torch.Tensor  # [S] float32; < 1e-5 means greedy
    top_p: torch.Tensor  # [S] float32; 1 disables
    top_k: torch.Tensor  # [S] int32; 0 disables
    min_p: torch.Tensor  # [S] float32; 0 disables
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    repetition_penalty: torch.Tensor  # [S] float32
    output_token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    logit_bias: list[dict[int, float] | None]
    blocked_token_ids: list[list[int]]
    seeds: list[int | None]
    output_indices: list[int]
    positions: list[int]
    """Per row: output tokens generated before this draw (seeds the row's noise with seed, index)."""
    num_logprobs: list[int | None]
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    # Extra fast-path facts (conservative defaults: a hand-built batch still samples correctly).
    no_repetition_penalty: bool = False
    no_min_p: bool = False
    no_top_k: bool = False
    no_top_p: bool = False
    max_top_k: int = 0
    """Largest top_k among rows that set one; 0 when unknown or none."""
    top_p_within_top_k: bool = False
    """Every row with top_p < 1 also sets top_k, so top-p only needs the max_top_k best candidates."""
    allowed_token_ids: list[list[int] | None] | None = None
    """Per row: the only tokens it may sample, or None; None for the whole batch when no row has a list."""

    @property
    def num_rows(self) -> int:
        return len(self.seeds)

    @classmethod
    def build(cls, rows: list[RowInfo], device: torch.device | str) -> SamplingBatch:
        """Gathers the rows' parameters into device tensors (two host-to-device copies in all, queued
        without waiting for the GPU)."""
        params = [row.sampling_params for row in rows]
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]  # -1 and 0 both disable
        floats = host_to_device(
            [[p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
              p.repetition_penalty] for p in params], torch.float32, device,
        ).reshape(len(params), 6).T.contiguous()  # [6, S]
        temperature, top_p, min_p, presence, frequency, repetition = floats.unbind(0)
        greedy = [p.greedy for p in params]
        no_repetition = all(p.repetition_penalty == 1.0 for p in params)
        no_top_p = all(p.top_p >= 1.0 for p in params)
        return cls(
            temperature=temperature,
            top_p=top_p,
            top_k=host_to_device(top_ks, torch.int32, device),
            min_p=min_p,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            output_token_ids=[row.output_token_ids for row in rows],
            prompt_token_ids=[row.prompt_token_ids for row in rows],
            logit_bias=[p.logit_bias for p in params],
            blocked_token_ids=[list(row.blocked_token_ids) for row in rows],
            seeds=[p.seed for p in params],
            output_indices=[row.output_index for row in rows],
            positions=[len(row.output_token_ids) if row.position is None else row.position for row in rows],
            num_logprobs=[p.logprobs for p in params],
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=no_repetition and all(
                p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params),
            no_repetition_penalty=no_repetition,
            no_min_p=all(p.min_p == 0.0 for p in params),
            no_top_k=not any(top_ks),
            no_top_p=no_top_p,
            max_top_k=max(top_ks, default=0),
            top_p_within_top_k=all(p.top_p >= 1.0 or k > 0 for p, k in zip(params, top_ks)),
            allowed_token_ids=([p.allowed_token_ids for p in params]
                               if any(p.allowed_token_ids for p in params) else None),
        )


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    """[S] sampled token ids, as a Python list (they cross ZeroMQ)."""
    logprobs: list[Logprobs | None]
    """Per row: the sampled token's raw logprob and rank, then the top-k; None where not requested."""


class Sampler:
    """Samples one token per row. Holds the engine-wide generator for unseeded random rows.

    `sampler(logits [S, V] float32, batch) -> SamplerOutput`; the incoming logits are never modified.
    `sampler.sample(...)` is the same with the token ids left on the device (the worker feeds them to
    the next step before they reach the host).
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu", use_triton: bool | None = None,
                 top_p_search: bool | None = None, race: bool | None = None) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._row_generator = torch.Generator(device=self.device)  # re-seeded for each seeded row
        self.use_triton = use_triton_sampling(self.device) if use_triton is None else use_triton
        """Random rows go through kernels/sampling.py (else the torch stages below)."""
        self.top_p_search = use_top_p_search(self.device) if top_p_search is None else top_p_search
        """The torch stages take top-p's threshold from kernels/top_p.py where they would sort the
        whole vocabulary (top-p on a row without top-k)."""
        self.race = use_gumbel_race(self.device) if race is None else race
        """The torch stages draw with kernels/gumbel.py (one read of the kept logits) instead of a
        softmax, exponential noise and an argmax."""

    def warm_up(self, vocab_size: int, logits_dtype: torch.dtype = torch.bfloat16) -> None:
        """Compile the sampling kernels, so no compile lands in a user's step: the top-p search, and
        the Triton sampler for both logit dtypes it sees (the model's, and float32 once penalties or a
        logit bias apply), whose kept sets are also checked against the torch filters on this device.
        Should a kernel not build, or disagree, log the error and keep the torch path."""
        if self.top_p_search:
            try:
                check_top_p_search(vocab_size, self.device)
            except Exception:  # noqa: BLE001 - any failure: the sort still filters correctly
                logger.exception("the top-p search kernel failed its start-up check; top-p sorts the "
                                 "vocabulary instead (set PAGEDSERVE_TOP_P_SEARCH=0 to skip this check)")
                self.top_p_search = False
        if self.race:
            try:
                check_gumbel_race(vocab_size, logits_dtype, self.device)
            except Exception:  # noqa: BLE001 - any failure: torch's race still draws correctly
                logger.exception("the Gumbel race kernel failed its start-up check; random rows are drawn by "
                                 "torch ops instead (set PAGEDSERVE_GUMBEL_RACE=0 to skip this check)")
                self.race = False
        if not self.use_triton:
            return
        try:
            for dtype in {logits_dtype, torch.float32}:
                check_kernel_against_torch(vocab_size, dtype, self.device)
        except Exception:  # noqa: BLE001 - any failure: the torch path still samples correctly
            logger.exception("the Triton sampling kernel failed its start-up check; sampling through torch "
                             "ops (set PAGEDSERVE_TRITON_SAMPLING=0 to skip this check)")
            self.use_triton = False

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        token_ids, logprobs = self.sample(logits, batch)
        return SamplerOutput(token_ids.tolist(), logprobs)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list[Logprobs | None]]:
        """Token ids [S] int64 on the device, and per row its logprobs (on the host) or None."""
        wants_logprobs = any(k is not None for k in batch.num_logprobs)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None  # [S, V]
        edits_logits = (any(batch.logit_bias) or any(batch.blocked_token_ids) or not batch.no_penalties
                        or batch.allowed_token_ids is not None)
        if edits_logits or not (self.use_triton or self.race):  # the kernels read bf16 logits themselves
            logits = logits.float()  # [S, V]
        logits = apply_logit_bias_and_blocks(logits, batch.logit_bias, batch.blocked_token_ids,
                                             batch.allowed_token_ids)
        if not batch.no_penalties:
            logits = apply_penalties(logits, batch)
        token_ids = self._sample(logits, batch)  # [S] int64
        logprobs: list[Logprobs | None] = [None] * batch.num_rows
        if raw_logprobs is not None:
            rows = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
            index = host_to_device(rows, torch.int64, logits.device)
            gathered = gather_logprobs(raw_logprobs[index], token_ids[index],
                                       [batch.num_logprobs[i] for i in rows])
            for row, entry in zip(rows, gathered):
                logprobs[row] = entry
        return token_ids, logprobs

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Greedy rows take the argmax of the penalized logits; random rows race. Returns [S] int64."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)  # [S]
        if self.use_triton:  # one launch: greedy rows take the first argmax there too
            from kernels.sampling import sample

            return sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p,
                          self._row_seeds(batch), _GREEDY_EPS).token_ids
        greedy = None if batch.all_random else logits.argmax(dim=-1)  # [S]
        is_greedy = batch.temperature < _GREEDY_EPS  # [S]
        temperature = torch.where(is_greedy, 1.0, batch.temperature)  # [S]; avoids dividing by 0
        if self.race and batch.no_min_p and batch.no_top_k and batch.no_top_p:  # temperature alone
            from kernels.gumbel import gumbel_race

            sampled = gumbel_race(logits, self._row_seeds(batch), temperature)  # scales the logits itself
            return sampled if batch.all_random else torch.where(is_greedy, greedy, sampled)
        logits = logits / temperature[:, None]  # [S, V] float32, whatever the logits' dtype
        threshold = None  # [S]: top-p's cut, left to the race to apply (no masked copy of the logits)
        if not batch.no_min_p:
            logits = apply_min_p(logits, batch.min_p)
        if not (batch.no_top_k and batch.no_top_p):
            full_sort = not (batch.no_top_p or batch.top_p_within_top_k)
            if full_sort and self.top_p_search:  # top-k alone by `topk`, then top-p by the search
                if not batch.no_top_k:
                    logits = apply_top_k_top_p(logits, batch.top_k, torch.ones_like(batch.top_p),
                                               batch.max_top_k, no_top_p=True)
                if self.race:
                    from kernels.top_p import top_p_thresholds

                    threshold = top_p_thresholds(logits, batch.top_p)  # [S]; -inf where top_p >= 1
                else:
                    logits = apply_top_p_by_search(logits, batch.top_p)
            else:
                logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p, 0 if full_sort else batch.max_top_k,
                                           batch.no_top_p)
        if self.race:
            from kernels.gumbel import gumbel_race

            sampled = gumbel_race(logits, self._row_seeds(batch), threshold=threshold)  # [S]
        else:
            probs = torch.softmax(logits, dim=-1)  # [S, V]; filtered tokens are exactly 0
            q = self._exponential_noise(probs.shape, batch)  # [S, V]
            sampled = probs.div_(q).argmax(dim=-1)  # [S]
        return sampled if batch.all_random else torch.where(is_greedy, greedy, sampled)

    def _exponential_noise(self, shape: torch.Size, batch: SamplingBatch) -> torch.Tensor:
        """Exp(1) noise [S, V]: the global generator for all rows, then seeded rows overwritten."""
        q = torch.empty(shape, device=self.device).exponential_(generator=self.generator)  # [S, V]
        vocab_size = shape[1]
        for row, seed in enumerate(batch.seeds):  # only seeded rows do device work here
            if seed is None:
                continue
            self._row_generator.manual_seed(
                row_seed(seed, batch.output_indices[row], batch.positions[row]))
            q[row] = torch.empty(vocab_size, device=self.device).exponential_(
                generator=self._row_generator)  # [V], drawn alone so its values never depend on S
        return q.clamp_min_(1e-20)  # an exact 0 would turn a filtered token's 0 / q into NaN

    def _row_seeds(self, batch: SamplingBatch) -> torch.Tensor:
        """[S] int64 Philox seeds for the kernel: a fresh engine-generator draw per unseeded row, and
        row_seed(seed, output_index, position) per seeded row (so its tokens depend on it alone)."""
        seeds = torch.randint(0, 1 << 62, (batch.num_rows,), generator=self.generator, device=self.device)
        rows = [i for i, seed in enumerate(batch.seeds) if seed is not None]
        if rows:
            values = [row_seed(batch.seeds[i], batch.output_indices[i], batch.positions[i]) for i in rows]
            seeds[host_to_device(rows, torch.int64, self.device)] = host_to_device(values, torch.int64, self.device)
        return seeds  # [S]


def row_seed(seed: int, output_index: int, position: int) -> int:
    """A 63-bit generator seed for one draw: splitmix64 chained over (seed, output_index, position)."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (output_index & _MASK64))
    x = _splitmix64(x ^ (position & _MASK64))
    return x >> 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
