"""EngineArgs: the user's options (LLM(...) keywords, CLI flags), resolved into an EngineConfig.

Resolution reads the checkpoint's config.json, generation_config.json and tokenizer, so the
scheduler and workers receive concrete values (dtype, max_model_len, EOS ids), never "auto".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ipc import envs
from ipc.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig,
                        WorkerConfig)
from ipc.sockets import IpcPaths


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    device: str = "auto"
    enforce_eager: bool = False
    ipc_dir: str | None = None

    def resolve_model_path(self) -> str:
        if self.model is None:
            from frontend.default_model import default_model_path
            return default_model_path()
        from gpu_workers.loader import resolve_model_path
        return resolve_model_path(self.model)

    def create_engine_config(self, model_path: str, tokenizer) -> EngineConfig:
        hf = _read_json(Path(model_path) / "config.json")
        _check_architecture(hf)
        device = self.device if self.device != "auto" else _default_device()
        max_len = _derive_max_model_len(hf, self.max_model_len)
        model = ModelConfig(
            model=model_path, dtype=_resolve_dtype(self.dtype, hf, device), max_model_len=max_len,
            load_format=self.load_format, eos_token_ids=_eos_token_ids(model_path, hf, tokenizer),
            vocab_size=int(hf.get("vocab_size") or len(tokenizer)))
        cache = CacheConfig(self.block_size, self.gpu_memory_utilization, self.num_gpu_blocks_override,
                            self.enable_prefix_caching, envs.cpu_kv_cache_bytes())
        batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        return EngineConfig(model, cache, SchedulerConfig(self.max_num_seqs, batched),
                            self.create_parallel_config(hf),
                            WorkerConfig(device, self.attention_backend, self.seed, self.enforce_eager),
                            IpcPaths.create(self.ipc_dir).root)

    def create_parallel_config(self, hf: dict) -> ParallelConfig:
        """Checks the model splits over the ranks before any process starts."""
        if self.node_rank != 0:
            raise ValueError(f"node_rank {self.node_rank}: the frontend runs on node 0; the other nodes run "
                             f"`python -m gpu_workers.node --node-rank N ...`")
        parallel = ParallelConfig(self.tensor_parallel_size, self.nnodes, self.node_rank, self.master_addr,
                                  self.master_port)
        from gpu_workers.models.parallel_layers import check_tensor_parallel
        heads = hf["num_attention_heads"]
        check_tensor_parallel(heads, hf.get("num_key_value_heads") or heads, hf["intermediate_size"],
                              parallel.tensor_parallel_size)
        return parallel


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"model directory has no {path.name}: {path.parent}")
    return json.loads(path.read_text())


def _check_architecture(hf: dict) -> None:
    from gpu_workers.models import MODEL_REGISTRY
    archs = hf.get("architectures") or []
    if not any(a in MODEL_REGISTRY for a in archs):
        raise ValueError(f"model architecture {archs} is not supported; supported: {sorted(MODEL_REGISTRY)}")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, hf: dict, device: str) -> str:
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16", "half", "float"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return {"half": "float16", "float": "float32"}.get(dtype, dtype)
    if device == "cpu":
        return "float32"
    ckpt = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    return ckpt if ckpt in ("float32", "bfloat16", "float16") else "bfloat16"


def _derive_max_model_len(hf: dict, requested: int | None) -> int:
    limit = hf.get("max_position_embeddings") or hf.get("max_sequence_length") or 2048
    if requested is None:
        return int(limit)
    if requested > limit and not os.environ.get("PAGEDSERVE_ALLOW_LONG_MAX_MODEL_LEN"):
        raise ValueError(f"max_model_len {requested} exceeds the model's max_position_embeddings ({limit})")
    return requested


def _eos_token_ids(model_path: str, hf: dict, tokenizer) -> list[int]:
    """EOS ids as transformers' generate uses them: generation_config.json first, then config.json,
    then the tokenizer."""
    gen_path = Path(model_path) / "generation_config.json"
    for source in ((_read_json(gen_path) if gen_path.exists() else {}), hf):
        eos = source.get("eos_token_id")
        if eos is not None:
            return sorted(set(eos if isinstance(eos, list) else [eos]))
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
