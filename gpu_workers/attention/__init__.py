"""Attention backends: pick one by name (the `attention_backend` config field)."""

from __future__ import annotations

import torch

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata

ATTENTION_BACKENDS = ("auto", "torch", "triton")

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """"torch" (pure torch, any device), "triton" (CUDA kernels), or "auto": triton on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "torch":
        from gpu_workers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        # Imported lazily: triton is optional and absent on CPU-only installs.
        from gpu_workers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend {name!r} is not supported; choose one of {ATTENTION_BACKENDS}")
