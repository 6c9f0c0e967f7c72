"""Every message that crosses ZeroMQ, grouped in one Union per receiving process.

    frontend --AddRequest/AbortRequests-->  scheduler  --ExecuteStep-->  worker rank 0..N-1
    frontend <--RequestOutputs----------    scheduler  <--StepResult---  worker rank 0
                                                       <--WorkerReady--  every rank
                                            scheduler  <--NodeHello--->  node agent (other hosts;
                                                           StartNode,    relays ToWorker to its ranks)

Rules (docs/STYLE.md): frozen tagged Structs, new fields go last with defaults, only ids and small
metadata (never tensors), one encoder/decoder per socket direction (see ipc/sockets.py).
"""

from __future__ import annotations

from typing import Union

import msgspec

from ipc.config import EngineConfig
from ipc.sampling_params import SamplingParams


class _Msg(msgspec.Struct, frozen=True, tag=True, array_like=True, omit_defaults=True, gc=False):
    """Base of all IPC messages: tagged by class name, encoded as arrays."""


class _Data(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """Base of payload structs nested inside messages (not tagged)."""


class Logprobs(_Data):
    """Logprobs at one position: entry 0 is the chosen (sampled or prompt) token, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int = 0
    """1-based rank of the chosen token in the distribution."""


# ---------------------------------------------------------------- to the scheduler


class AddRequest(_Msg):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    client_index: int = 0
    """Which connected client gets the outputs (0: the process that started the engine)."""


class ClientHello(_Msg):
    """An embedded EngineClient joins a running engine; the scheduler answers with EngineReady."""

    client_index: int
    address: str


class AbortRequests(_Msg):
    request_ids: list[str]


class WorkerReady(_Msg):
    """A rank has loaded its weights and measured how many KV blocks fit in its memory."""

    rank: int
    num_blocks: int


class StepResult(_Msg):
    """Rank 0's result of one ExecuteStep, in the order of the step's requests that sampled.

    `sampled_token_ids[i]` has one token, or n tokens for a request whose prefill just completed with
    n > 1 (the scheduler forks it into n outputs).
    """

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[list[Logprobs] | None] | None = None
    prompt_logprob_request_ids: list[str] | None = None
    prompt_logprobs: list[list[Logprobs | None]] | None = None
    prompt_logprob_starts: list[int] | None = None
    """Prompt position of each prompt_logprobs list's first entry."""


class WorkerFailed(_Msg):
    rank: int
    message: str


class Shutdown(_Msg):
    pass


class ClientBye(_Msg):
    client_index: int


class HealthCheck(_Msg):
    """Is the engine able to serve? The scheduler answers HealthStatus to the asking client."""

    client_index: int
    check_id: int


class NodeHello(_Msg):
    """A node agent (multi-node tensor parallelism) joined; `address` is its tcp:// inbox."""

    node_rank: int
    address: str


ToScheduler = Union[AddRequest, AbortRequests, ClientHello, ClientBye, HealthCheck, WorkerReady, StepResult,
                    WorkerFailed, Shutdown, NodeHello]


# ---------------------------------------------------------------- to the workers


class NewRequestData(_Data):
    """A request the worker has not seen (or must forget and rebuild: preempted, forked), in full."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    output_index: int = 0
    """Which of the n outputs this is (seeds per-output random draws)."""
    num_samples: int = 1
    """Tokens to sample when this step completes the prefill (n for a request about to fork)."""
    want_prompt_logprobs: bool = True


class CachedRequestData(_Data):
    """A request the worker already holds: only what changed since its last step."""

    request_id: str
    num_computed_tokens: int
    num_scheduled_tokens: int
    new_block_ids: list[int] = []
    replace_block_ids: bool = False
    """True when new_block_ids is the whole table (copy-on-write replaced a block)."""


class InitKVCache(_Msg):
    num_blocks: int


class ExecuteStep(_Msg):
    """One iteration's plan, identical for every rank. Tokens are laid out cached requests first,
    then new requests, each contributing num_scheduled_tokens consecutive positions."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    finished_request_ids: list[str] = []
    blocks_to_copy: list[tuple[int, int]] = []


ToWorker = Union[InitKVCache, ExecuteStep, Shutdown]


# ---------------------------------------------------------------- to a node agent (gpu_workers/node.py)


class StartNode(_Msg):
    """The engine's config: the agent starts its node's ranks with it, then relays ToWorker messages."""

    config: EngineConfig


ToNode = Union[StartNode, InitKVCache, ExecuteStep, Shutdown]


# ---------------------------------------------------------------- to the frontend


class RequestDelta(_Data):
    """What one output of one request gained this step."""

    request_id: str
    new_token_ids: list[int]
    index: int = 0
    finish_reason: str | None = None
    """"stop" (EOS or a stop token), "length", or "abort"; None while running."""
    logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0
    stop_token_id: int | None = None
    queue_time: float | None = None
    """Seconds from arrival to first scheduling; set on the first delta with tokens."""


class SchedulerStats(_Data):
    """The scheduler's gauges and counters after a step (for /metrics and tests)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class EngineReady(_Msg):
    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    model: str = ""
    """The checkpoint directory (clients load its tokenizer)."""


class RequestOutputs(_Msg):
    outputs: list[RequestDelta]
    stats: SchedulerStats | None = None


class RequestFailed(_Msg):
    request_id: str
    message: str


class EngineDead(_Msg):
    message: str


class HealthStatus(_Msg):
    check_id: int
    ok: bool
    message: str = ""


ToFrontend = Union[EngineReady, RequestOutputs, RequestFailed, EngineDead, HealthStatus]


def _check_names() -> None:
    """Import-time guard: every member of a Union is a tagged _Msg with a unique tag."""
    for union in (ToScheduler, ToWorker, ToNode, ToFrontend):
        for cls in union.__args__:
            assert issubclass(cls, _Msg), f"{cls.__name__} must derive from _Msg"


_check_names()
