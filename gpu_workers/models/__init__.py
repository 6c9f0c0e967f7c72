"""Our model implementations, looked up by the `architectures` entry of a HF config."""

from __future__ import annotations

from torch import nn

from gpu_workers.models.llama import LlamaForCausalLM
from gpu_workers.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(hf_config) -> type[nn.Module]:
    """The first architecture of `hf_config.architectures` we implement; ValueError otherwise."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture {architectures or '(none in config)'} is not supported; "
        f"supported architectures: {sorted(MODEL_REGISTRY)}"
    )
