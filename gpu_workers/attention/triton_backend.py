"""The Triton attention backend: paged KV-cache write, then decode or varlen-prefill attention.

    forward(q, k, v, k_cache, v_cache, meta, scale)
      1. write_kv_cache(k, v -> caches at meta.slot_mapping)     the step's own K/V first, so that
      2. meta.is_decode_only ? decode_attention                  both kernels read the whole context
                             : prefill_attention                 (prefix, earlier chunks, this step)
                               from the cache alone.

A mixed batch (prefills and decodes) goes through prefill_attention, which treats a decode as q_len 1.
"""

from __future__ import annotations

import torch

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata
from kernels import decode_attention, prefill_attention, write_kv_cache


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if query.dim() != 3 or query.shape[0] != meta.num_tokens or key.shape[0] != meta.num_tokens:
            raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} must have "
                             f"meta.num_tokens={meta.num_tokens} rows")
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        if meta.is_decode_only:
            if meta.num_tokens != meta.num_seqs:
                raise ValueError(f"is_decode_only needs one token per sequence, got {meta.num_tokens} "
                                 f"tokens for {meta.num_seqs} sequences")
            return decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                    meta.max_seq_len, scale, out=out)
        return prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                 meta.seq_lens, meta.max_query_len, scale, out=out)
