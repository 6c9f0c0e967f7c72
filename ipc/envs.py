"""Every environment variable pagedserve reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live: $PAGEDSERVE_CACHE, else ~/.cache/pagedserve."""
    return Path(os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve")


def cpu_kv_cache_bytes() -> int:
    """KV-cache budget on CPU: $PAGEDSERVE_CPU_KVCACHE_SPACE GiB (default 1)."""
    return int(float(os.environ.get("PAGEDSERVE_CPU_KVCACHE_SPACE", "1")) * (1 << 30))


def api_key() -> str | None:
    return os.environ.get("PAGEDSERVE_API_KEY") or None


def step_stuck_seconds() -> float:
    """$PAGEDSERVE_STEP_STUCK_S (default 120): a step in flight longer than this makes /health 503."""
    return float(os.environ.get("PAGEDSERVE_STEP_STUCK_S", "120"))


def log_level() -> str:
    return os.environ.get("PAGEDSERVE_LOG_LEVEL", "WARNING").upper()


def pin_collectives_to_loopback() -> None:
    """Single-node tensor parallelism: keep gloo's and NCCL's bootstrap sockets on the loopback
    interface ($GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME win when the user set them)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def cpu_threads(tensor_parallel_size: int) -> int:
    """Torch threads of each CPU worker: $PAGEDSERVE_CPU_THREADS, else the cores left after the
    frontend and scheduler, shared by the ranks (oversubscribed OpenMP threads spin and stall)."""
    value = os.environ.get("PAGEDSERVE_CPU_THREADS")
    if value:
        return max(int(value), 1)
    return max(((os.cpu_count() or 1) - 1) // max(tensor_parallel_size, 1), 1)



def triton_elementwise() -> str | None:
    """$PAGEDSERVE_TRITON_ELEMENTWISE: where RMSNorm, RoPE (+ q/k norm) and SiLU-and-mul run.
    Unset: fused Triton kernels on CUDA, torch ops on CPU. "1": also on CPU tensors when
    $TRITON_INTERPRET=1 (tests). "0": torch ops everywhere (the reference path, for comparison)."""
    value = os.environ.get("PAGEDSERVE_TRITON_ELEMENTWISE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_TRITON_ELEMENTWISE must be 0 or 1, not {value!r}")
    return {"": None, "0": "torch", "1": "triton"}[value]


def overlap_steps(device_type: str) -> bool:
    """$PAGEDSERVE_OVERLAP_STEPS: whether a worker launches step n+1 before step n's tokens reach the
    host (feeding them on the device). Unset: on CUDA only (the CPU computes synchronously, so nothing
    overlaps there). "0": never (the A/B baseline); "1": also on CPU (tests of the overlapped path)."""
    value = os.environ.get("PAGEDSERVE_OVERLAP_STEPS", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_OVERLAP_STEPS must be 0 or 1, not {value!r}")
    return device_type == "cuda" if value == "" else value == "1"


def custom_all_reduce(device_type: str, nnodes: int) -> bool:
    """$PAGEDSERVE_CUSTOM_ALL_REDUCE: whether tensor-parallel ranks all-reduce messages up to 8 MiB
    over torch symmetric memory (one-shot / two-shot kernels over NVLink, gpu_workers/symm_all_reduce.py)
    instead of NCCL. Unset or "1": on for CUDA ranks on one node (it needs peer access between the
    GPUs; it falls back to NCCL by itself when set-up fails), never on CPU or across nodes.
    "0": NCCL for every all-reduce (the A/B baseline)."""
    value = os.environ.get("PAGEDSERVE_CUSTOM_ALL_REDUCE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_CUSTOM_ALL_REDUCE must be 0 or 1, not {value!r}")
    return value != "0" and device_type == "cuda" and nnodes == 1


def fused_all_reduce() -> bool:
    """$PAGEDSERVE_FUSED_ALL_REDUCE: where the symmetric-memory all-reduce is on, whether the partial
    sums of o_proj and down_proj are reduced in one launch with the residual add and RMSNorm after
    them (kernels/all_reduce_rms_norm.py). On unless "0" (the A/B baseline: reduce, then norm)."""
    value = os.environ.get("PAGEDSERVE_FUSED_ALL_REDUCE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_FUSED_ALL_REDUCE must be 0 or 1, not {value!r}")
    return value == "1"


def fused_all_reduce_lamport() -> bool:
    """$PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT: whether the fused all-reduce + RMSNorm polls the pushed
    rows themselves (empty slots hold a sentinel) rather than flags behind a release fence
    (kernels/all_reduce_rms_norm.py). On unless "0" (the flags: the A/B baseline)."""
    value = os.environ.get("PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT must be 0 or 1, not {value!r}")
    return value == "1"


def row_parallel_gemv() -> bool:
    """$PAGEDSERVE_ROW_PARALLEL_GEMV=0: row-parallel matmuls (o_proj, down_proj) always run on cuBLAS, and
    at TP > 1 the fused all-reduce after them pushes their rows itself. By default, at 1-64 token rows
    of a model of hidden size >= 2048 under PDL, they run on kernels/gemv.py, whose epilogue at TP > 1
    also pushes the rows into the peers' staging slot (kernels.gemv.takes_row_parallel)."""
    value = os.environ.get("PAGEDSERVE_ROW_PARALLEL_GEMV", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_ROW_PARALLEL_GEMV must be 0 or 1, not {value!r}")
    return value == "1"


def gated_gemv() -> bool | None:
    """$PAGEDSERVE_GATED_GEMV: whether a gated MLP's gate_up matmul and SiLU-and-mul run as one launch of
    kernels/gemv.py (`gated_gemv`) at decode sizes. "1": at 1-64 token rows, "0": never (cuBLAS, then
    kernels/activation.py), unset (None): where kernels.gemv.takes_gated measured it faster."""
    value = os.environ.get("PAGEDSERVE_GATED_GEMV", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_GATED_GEMV must be 0 or 1, not {value!r}")
    return None if value == "" else value == "1"


def qkv_rope_gemv() -> bool | None:
    """$PAGEDSERVE_QKV_ROPE_GEMV: whether an attention layer's qkv projection runs with RoPE and the K/V
    cache write in its epilogue (kernels.qkv_rope.qkv_rope_gemv), the rotary launch gone. "1": at 1-64 token
    rows, "0": never, unset (None): where kernels.qkv_rope.takes_qkv_rope measured it faster."""
    value = os.environ.get("PAGEDSERVE_QKV_ROPE_GEMV", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_QKV_ROPE_GEMV must be 0 or 1, not {value!r}")
    return None if value == "" else value == "1"


def reduce_in_matmul() -> bool | None:
    """$PAGEDSERVE_REDUCE_IN_MATMUL: whether tensor-parallel decode steps sum the ranks' o_proj and down_proj
    rows in those matmuls' epilogues, adding the residual there (kernels.gemv.reduce_gemv), with a plain
    RMSNorm after them, instead of the fused all-reduce + RMSNorm launch. "1": at 1-64 token rows, "0":
    never, unset (None): kernels.gemv.takes_reduce's default (REDUCE_BY_DEFAULT)."""
    value = os.environ.get("PAGEDSERVE_REDUCE_IN_MATMUL", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_REDUCE_IN_MATMUL must be 0 or 1, not {value!r}")
    return None if value == "" else value == "1"


def torch_profiler_dir() -> str | None:
    """$PAGEDSERVE_TORCH_PROFILER_DIR: profile a window of worker steps with torch.profiler and write
    the per-kernel table there (gpu_workers/step_profiler.py)."""
    return os.environ.get("PAGEDSERVE_TORCH_PROFILER_DIR") or None


def torch_profiler_steps() -> tuple[int, int]:
    """$PAGEDSERVE_TORCH_PROFILER_STEPS = "start,count" (default "100,50"): which steps are profiled."""
    value = os.environ.get("PAGEDSERVE_TORCH_PROFILER_STEPS", "100,50")
    try:
        start, count = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"PAGEDSERVE_TORCH_PROFILER_STEPS must be START,COUNT, not {value!r}") from None
    if start < 0 or count < 1:
        raise ValueError(f"PAGEDSERVE_TORCH_PROFILER_STEPS needs START >= 0 and COUNT >= 1, got {value!r}")
    return start, count


def triton_sampling() -> str | None:
    """$PAGEDSERVE_TRITON_SAMPLING: where random rows are filtered and drawn (kernels/sampling.py).
    Unset or "0": torch ops. "1": the Triton kernel on CUDA, and on CPU under $TRITON_INTERPRET=1
    (tests). Off by default: on an H200 the kernel (one program per row) was 1.8-7x slower than the
    torch ops at batch 1-64 (BENCHMARKS.md)."""
    value = os.environ.get("PAGEDSERVE_TRITON_SAMPLING", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_TRITON_SAMPLING must be 0 or 1, not {value!r}")
    return {"": None, "0": "torch", "1": "triton"}[value]


def top_p_search() -> str:
    """$PAGEDSERVE_TOP_P_SEARCH: how the torch sampling path finds top-p's threshold. Unset: by
    kernels/top_p.py's search on CUDA, by a vocabulary sort on CPU. "1": the search on CPU too, under
    $TRITON_INTERPRET=1 (tests). "0": the sort everywhere."""
    value = os.environ.get("PAGEDSERVE_TOP_P_SEARCH", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_TOP_P_SEARCH must be 0 or 1, not {value!r}")
    return value


def gumbel_race() -> str:
    """$PAGEDSERVE_GUMBEL_RACE: how the torch sampling path draws a random row's token. Unset: by
    kernels/gumbel.py's race on CUDA, by torch's exponential race on CPU. "1": the kernel on CPU too,
    under $TRITON_INTERPRET=1 (tests). "0": torch everywhere."""
    value = os.environ.get("PAGEDSERVE_GUMBEL_RACE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_GUMBEL_RACE must be 0 or 1, not {value!r}")
    return value


def pdl() -> bool:
    """$PAGEDSERVE_PDL: launch the decode path's Triton kernels with programmatic dependent launch
    (kernels/pdl.py; NVIDIA sm_90+). On unless "0" (H200: Llama-8B batch 1 4.80 -> 4.74 ms a token)."""
    value = os.environ.get("PAGEDSERVE_PDL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_PDL must be 0 or 1, not {value!r}")
    return value == "1"


def gemv_split_k() -> int:
    """$PAGEDSERVE_GEMV_SPLIT_K=N (default 1): kernels/gemv.py splits K over N programs wherever its
    column tiles alone give an SM fewer than two programs (an experiment: on an H200, split 2 took the
    GEMV's Llama-8B batch-1 decode from 5.04 to 4.86 ms/token, still behind cuBLAS's 4.58; BENCHMARKS.md)."""
    value = os.environ.get("PAGEDSERVE_GEMV_SPLIT_K", "1")
    if not value.isdigit() or not 1 <= int(value) <= 16:
        raise ValueError(f"PAGEDSERVE_GEMV_SPLIT_K must be an integer from 1 to 16, not {value!r}")
    return int(value)


def small_gemv() -> bool | None:
    """$PAGEDSERVE_SMALL_GEMV: whether the linear layers of steps with at most 16 token rows (decode at
    small batch) run through kernels/gemv.py on CUDA bf16/fp16 weights instead of cuBLAS. "1": always,
    "0": never, unset (None): the measured default of elementwise.small_gemv_default."""
    value = os.environ.get("PAGEDSERVE_SMALL_GEMV", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"PAGEDSERVE_SMALL_GEMV must be 0 or 1, not {value!r}")
    return None if value == "" else value == "1"


def small_gemv_rows() -> int:
    """$PAGEDSERVE_SMALL_GEMV_ROWS=N (default 16, at most 64): where the GEMV is on, the most token rows a
    step may have to go through it. Over 16 rows its launch is autotuned (kernels/gemv.py)."""
    value = os.environ.get("PAGEDSERVE_SMALL_GEMV_ROWS", "16")
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"PAGEDSERVE_SMALL_GEMV_ROWS must be an integer from 1 to 64, not {value!r}")
    return int(value)


def prefetch_mb() -> int:
    """$PAGEDSERVE_PREFETCH_MB (default 32): at most this many MiB of the next matmul's weight are
    prefetched into L2 by the latency-bound kernel before it (kernels/prefetch.py); 0 turns it off."""
    value = os.environ.get("PAGEDSERVE_PREFETCH_MB", "32")
    if not value.isdigit() or int(value) > 1024:
        raise ValueError(f"PAGEDSERVE_PREFETCH_MB must be an integer from 0 to 1024, not {value!r}")
    return int(value)


def rope_in_attention() -> bool:
    """$PAGEDSERVE_ROPE_IN_ATTENTION=0: a decode-only step's RoPE and K/V cache write always run as their
    own launch before attention (kernels/rotary.py). By default the decode attention kernel does them
    itself in steps whose (sequence, KV head) programs fit the SMs (kernels.decode_attention.rope_inside_pays)."""
    value = os.environ.get("PAGEDSERVE_ROPE_IN_ATTENTION", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_ROPE_IN_ATTENTION must be 0 or 1, not {value!r}")
    return value == "1"


def prefetch_in_attention() -> bool:
    """$PAGEDSERVE_PREFETCH_ATTENTION=1: decode attention also prefetches o_proj's weight (off by default:
    on 2 x H100 it slowed TP=1 batch-64 decode, 7.27 -> 7.40 ms a step; kernels/prefetch.py)."""
    value = os.environ.get("PAGEDSERVE_PREFETCH_ATTENTION", "0")
    if value not in ("0", "1"):
        raise ValueError(f"PAGEDSERVE_PREFETCH_ATTENTION must be 0 or 1, not {value!r}")
    return value == "1"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
