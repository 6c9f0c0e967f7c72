"""Triton kernels of pagedserve: paged KV-cache writes and attention over the paged cache, the fused
per-token elementwise ops of the decoder layers (RMSNorm + residual add, RoPE + q/k norm, SiLU-and-mul),
sampling without a vocabulary sort (sampling.py), the tensor-parallel all-reduce fused with the residual
add and RMSNorm (all_reduce_rms_norm.py; the buffers and row helpers it shares with the GEMV in
peer_rows.py), programmatic dependent launch (pdl.py), L2 prefetch of the next matmul's weight from the
latency-bound kernels before it (prefetch.py) and a few-row GEMV (gemv.py) for decode steps, which for
row-parallel layers under tensor parallelism also pushes its rows into that all-reduce's buffers, and
for a gated MLP's gate_up projection applies SiLU-and-mul in its epilogue."""

from kernels.activation import silu_and_mul
from kernels.decode_attention import choose_num_splits, decode_attention
from kernels.kv_cache import write_kv_cache
from kernels.prefill_attention import prefill_attention
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary, apply_rotary_and_write_kv

__all__ = ["apply_rotary", "apply_rotary_and_write_kv", "choose_num_splits", "decode_attention", "prefill_attention", "rms_norm",
           "silu_and_mul", "write_kv_cache"]
