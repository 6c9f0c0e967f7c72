"""Engine configuration: one frozen dataclass per process, composed into EngineConfig.

EngineConfig crosses into child processes as msgspec JSON (no pickle). Each field's docstring is the
text of its CLI flag's --help. Environment variables are read in ipc/envs.py only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    """Local directory of a Hugging Face-format checkpoint (config.json + *.safetensors)."""
    dtype: str = "float32"
    """Weights and activations dtype, resolved (never "auto" here)."""
    max_model_len: int = 2048
    """Most tokens (prompt + output) of one request."""
    load_format: str = "auto"
    """"auto" reads *.safetensors; "dummy" makes random weights from config.json alone."""
    eos_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation unless ignore_eos (from generation_config / tokenizer)."""
    vocab_size: int = 0

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES[1:], "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len >= 2, "max_model_len", f"must be at least 2, got {self.max_model_len}")
        _require(self.load_format in ("auto", "dummy"), "load_format",
                 f"must be 'auto' or 'dummy', got {self.load_format!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Token slots per KV-cache block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use (weights, activations and KV cache)."""
    num_gpu_blocks_override: int | None = None
    """Use exactly this many KV-cache blocks instead of sizing from memory."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of earlier requests' identical prefixes."""
    cpu_kv_cache_bytes: int = 1 << 30
    """KV-cache memory budget when running on CPU."""

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", f"must be positive, got {self.block_size}")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
                 "num_gpu_blocks_override", f"must be positive, got {self.num_gpu_blocks_override}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests in one step's batch."""
    max_num_batched_tokens: int = 8192
    """Most tokens (prefill chunks + decodes) in one step; longer prompts are chunked."""

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be positive, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 f"must be positive, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor-parallel ranks, possibly spread over several hosts ("nodes"):

        node 0: frontend + scheduler + ranks 0..k-1      (k = tensor_parallel_size // nnodes)
        node i: `python -m gpu_workers.node` + ranks i*k..(i+1)*k-1

    Ports on master_addr: master_port is torch.distributed's TCP store (hosted by rank 0),
    master_port + 1 the scheduler's ZeroMQ port that the other nodes connect to. With nnodes 1
    neither is used: the ranks meet through a file in the engine's private directory.
    """

    tensor_parallel_size: int = 1
    """Number of GPU ranks the model is split across (one worker process each)."""
    nnodes: int = 1
    """Number of hosts the ranks run on (tensor_parallel_size is the total over all of them)."""
    node_rank: int = 0
    """This host's index; 0 runs the frontend and scheduler, the others `python -m gpu_workers.node`."""
    master_addr: str = "127.0.0.1"
    """Address of node 0 that the other nodes reach (multi-node only)."""
    master_port: int = 0
    """torch.distributed TCP-store port on master_addr; master_port + 1 is the scheduler's port for
    the other nodes (multi-node only, where it must be given)."""

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 f"must be positive, got {self.tensor_parallel_size}")
        _require(self.nnodes >= 1, "nnodes", f"must be positive, got {self.nnodes}")
        _require(self.tensor_parallel_size % self.nnodes == 0, "tensor_parallel_size",
                 f"{self.tensor_parallel_size} must be a multiple of nnodes {self.nnodes} (equal ranks per node)")
        _require(0 <= self.node_rank < self.nnodes, "node_rank",
                 f"must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        _require(0 <= self.master_port < 65535, "master_port", f"must be in [0, 65535), got {self.master_port}")
        _require(self.nnodes == 1 or self.master_port > 0, "master_port",
                 f"must be given when nnodes is {self.nnodes} (every node needs the same port)")

    @property
    def scheduler_port(self) -> int:
        """The scheduler's ZeroMQ port for the other nodes' agents."""
        return self.master_port + 1


@dataclass(frozen=True)
class WorkerConfig:
    device: str = "cpu"
    """"cuda" or "cpu"."""
    attention_backend: str = "auto"
    """"torch" (portable), "triton" (GPU kernels) or "auto" (triton on CUDA, torch on CPU)."""
    seed: int = 0
    """Seed of the worker's random generator (requests without their own seed)."""
    enforce_eager: bool = False
    """Never use CUDA graphs (decode steps run eagerly)."""

    def __post_init__(self) -> None:
        _require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                 f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ipc_root: str = ""
    """Private directory of this engine's ipc:// sockets."""

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> "EngineConfig":
        return msgspec.json.decode(data, type=cls)
