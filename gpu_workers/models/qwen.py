"""Qwen2 / Qwen2.5 and Qwen3 dense models: the Llama body with different attention options.

    Qwen2: biases on q/k/v (never on o_proj).
    Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim, biases only if attention_bias.
"""

from __future__ import annotations

from gpu_workers.models.llama import LlamaForCausalLM


def _reject_sliding_layers(hf_config) -> None:
    # Qwen configs mark windowed layers in layer_types (only when use_sliding_window is on).
    layer_types = getattr(hf_config, "layer_types", None) or []
    if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError("use_sliding_window=True (sliding-window attention layers) is not supported")


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True

    @staticmethod
    def o_bias(hf_config) -> bool:
        return False

    @staticmethod
    def check_sliding_window(hf_config) -> None:
        _reject_sliding_layers(hf_config)


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    @staticmethod
    def check_sliding_window(hf_config) -> None:
        _reject_sliding_layers(hf_config)
