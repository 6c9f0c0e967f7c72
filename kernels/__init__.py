"""Triton kernels of pagedserve: paged KV-cache writes and attention over the paged cache."""

from kernels.decode_attention import choose_num_splits, decode_attention
from kernels.kv_cache import write_kv_cache
from kernels.prefill_attention import prefill_attention

__all__ = ["choose_num_splits", "decode_attention", "prefill_attention", "write_kv_cache"]
