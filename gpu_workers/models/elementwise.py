"""Where the decoder layers' per-token elementwise ops run: fused Triton kernels, or torch ops.

    op (layers.py)                       Triton kernel (kernels/)          replaces, per layer
    RMSNorm(x, residual)                 rms_norm: add + norm, one launch  ~8 torch kernels, twice
    Attention: q/k norm + RotaryEmbedding apply_rotary (+ Qwen3 q/k norm)  ~20 (index, chunk, cat, casts)
      (Triton attention backend)         apply_rotary_and_write_kv          + the KV-cache write launch
    SiluAndMulMLP activation             silu_and_mul                      3 (chunk views, silu, mul)

Decode steps are launch-bound (~3 us per tiny kernel on an H200), so fewer launches is most of the gain.
The torch code in layers.py stays the reference and the CPU path: CPU outputs do not change.

Choice, per call (`use_triton(x)`):
  1. MODE, when set ("torch" / "triton"): a module-level switch for tests and benchmarks;
  2. $PAGEDSERVE_TRITON_ELEMENTWISE=0: torch everywhere (the reference, for comparisons);
     =1: Triton for CUDA tensors and for CPU tensors under $TRITON_INTERPRET=1 (tests);
  3. unset: Triton for CUDA tensors, torch on CPU.
The environment is read once, at import. Kernels are imported on first use: triton is optional on
CPU installs, and must not be imported before a test has set TRITON_INTERPRET.
"""

from __future__ import annotations

import torch

from ipc import envs

MODE: str | None = None
""""torch" or "triton" forces a path (set it from tests or benchmarks); None: environment, then device."""


_ENV_MODE = envs.triton_elementwise()


def use_triton(x: torch.Tensor) -> bool:
    if MODE is not None:
        return MODE == "triton"
    if _ENV_MODE == "torch":
        return False
    return x.is_cuda or (_ENV_MODE == "triton" and envs.triton_interpret())


_SMALL_GEMV = bool(envs.small_gemv())
"""Whether `linear` sends few-row steps to kernels.gemv; set per model by configure_small_gemv."""
_SMALL_GEMV_ROWS = envs.small_gemv_rows()
"""... and the most token rows such a step has."""
_GEMV_DTYPES = (torch.bfloat16, torch.float16)
_GEMV_MAX_HIDDEN = 2048


def small_gemv_default(hidden_size: int, pdl: bool) -> bool:
    """The GEMV for a model's few-row steps unless $PAGEDSERVE_SMALL_GEMV says otherwise: only with PDL
    (its weight prefetch runs under the previous kernel) and hidden sizes up to 2048. On an H200 it took
    Qwen3-0.6B (hidden 1024) batch 1 from 1.44 to 1.19 ms a token; Llama-8B (4096) went from 4.74 to
    5.18, cuBLAS being as fast or faster on every one of its projections (BENCHMARKS.md)."""
    forced = envs.small_gemv()
    if forced is not None:
        return forced
    return pdl and hidden_size <= _GEMV_MAX_HIDDEN


def configure_small_gemv(hidden_size: int, device: torch.device) -> bool:
    """Decide `linear`'s route for the model this process serves (called once, at model load)."""
    from kernels.gemv import reserve_split_k_counters
    from kernels.pdl import use_pdl

    global _SMALL_GEMV, _SMALL_GEMV_ROWS
    _SMALL_GEMV = device.type == "cuda" and small_gemv_default(hidden_size, use_pdl(device))
    _SMALL_GEMV_ROWS = envs.small_gemv_rows()
    if _SMALL_GEMV or (device.type == "cuda" and use_pdl(device) and envs.row_parallel_gemv()):
        reserve_split_k_counters(device)  # before CUDA graph capture, which may not allocate them
    return _SMALL_GEMV


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or kernels.gemv for CUDA half-precision steps of at most $PAGEDSERVE_SMALL_GEMV_ROWS
    (16) token rows where configure_small_gemv chose it (see small_gemv_default)."""
    if (_SMALL_GEMV and x.dim() == 2 and x.shape[0] <= _SMALL_GEMV_ROWS and x.is_cuda and x.dtype in _GEMV_DTYPES
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.stride(0) == 1))):  # else cuBLAS, never an error
        from kernels.gemv import gemv

        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """kernels.rms_norm: out, or (out, x + residual)."""
    from kernels.rms_norm import rms_norm as kernel

    return kernel(x, weight, eps, residual)


def rotary(rotary_emb, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm=None, k_norm=None):
    """kernels.apply_rotary with a RotaryEmbedding's cos/sin caches and, when given, the RMSNorm
    modules of Qwen3's per-head q/k norm. Returns new (q, k), contiguous."""
    from kernels.rotary import apply_rotary

    if q_norm is None:
        return apply_rotary(q, k, positions, rotary_emb.cos_cache, rotary_emb.sin_cache)
    return apply_rotary(q, k, positions, rotary_emb.cos_cache, rotary_emb.sin_cache,
                        q_norm.weight, k_norm.weight, q_norm.eps)


def rotary_and_write_kv(rotary_emb, positions, q, k, v, k_cache, v_cache, slot_mapping, q_norm=None, k_norm=None):
    """kernels.apply_rotary_and_write_kv: like `rotary`, but k (rotated) and v go straight into the
    paged caches at slot_mapping. Returns the rotated q."""
    from kernels.rotary import apply_rotary_and_write_kv

    norm = {} if q_norm is None else dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=q_norm.eps)
    return apply_rotary_and_write_kv(q, k, v, positions, rotary_emb.cos_cache, rotary_emb.sin_cache,
                                     k_cache, v_cache, slot_mapping, **norm)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """kernels.silu_and_mul: [num_tokens, 2 * d] -> [num_tokens, d]."""
    from kernels.activation import silu_and_mul as kernel

    return kernel(gate_up)


def greedy_keys(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """[rows] int64 keys of each row's argmax (parallel_layers.greedy_keys_torch says how they pack):
    kernels/greedy.py's one launch, or torch's argmax, gather and packing ops."""
    if use_triton(logits):
        from kernels.greedy import greedy_keys as kernel
        return kernel(logits, vocab_start)
    from gpu_workers.models.parallel_layers import greedy_keys_torch
    return greedy_keys_torch(logits, vocab_start)
