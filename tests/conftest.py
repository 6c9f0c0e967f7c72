"""Shared fixtures: tiny random-weight checkpoints (built once per session) and process hygiene."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.checkpoints import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """{"llama": path, "qwen2": path, "qwen3": path}: small random float32 models with tokenizers."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama"),
        "qwen2": make_tiny_checkpoint("qwen2", root / "qwen2", tie_word_embeddings=True),
        "qwen3": make_tiny_checkpoint("qwen3", root / "qwen3"),
    }


@pytest.fixture(scope="session")
def default_model() -> str:
    """The bundled SmolLM2-135M-Instruct, converted once into the pagedserve cache."""
    from frontend.default_model import default_model_path
    return default_model_path()
