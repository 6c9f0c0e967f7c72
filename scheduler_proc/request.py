"""The scheduler's view of one output sequence of a request."""

from __future__ import annotations

import enum

from ipc.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence the scheduler runs. A request with n > 1 runs as one parent until its prefill
    completes, then forks into n children (`{client_id}#{index}`) that share the prompt's blocks."""

    def __init__(self, request_id: str, client_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, max_tokens: int, arrival_time: float = 0.0,
                 index: int = 0, num_samples: int = 1) -> None:
        self.request_id = request_id
        self.client_id = client_id
        self.prompt_token_ids = prompt_token_ids
        self.all_token_ids = list(prompt_token_ids)  # prompt then outputs, appended in place
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.arrival_time = arrival_time
        self.index = index
        self.num_samples = num_samples
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.on_worker = False  # the workers hold this request's state
        self.num_blocks_on_worker = 0
        self.table_replaced = False  # copy-on-write changed a block the workers already know
        self.prompt_logprobs_sent = sampling_params.prompt_logprobs is None
        self.num_prompt_logprobs = 0  # prompt positions whose logprobs reached the frontend
        self.finish_reason: str | None = None
        self.first_scheduled_time: float | None = None
        self.num_pending_samples = 0  # planned steps that sample this request, results not back yet

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, computed={self.num_computed_tokens}"
                f"/{self.num_tokens})")
