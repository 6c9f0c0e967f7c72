"""pagedserve's caller-side API: `from frontend import LLM, SamplingParams`."""

from ipc.errors import EngineDeadError
from frontend.llm import LLM
from frontend.outputs import CompletionOutput, Logprob, RequestOutput
from ipc.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineDeadError"]
