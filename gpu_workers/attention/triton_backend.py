"""The Triton attention backend: paged KV-cache write, then decode or varlen-prefill attention.

    forward(q, k, v, k_cache, v_cache, meta, scale)
      1. write_kv_cache(k, v -> caches at meta.slot_mapping)     the step's own K/V first, so that
      2. meta.is_decode_only ? decode_attention                  both kernels read the whole context
                             : prefill_attention                 (prefix, earlier chunks, this step)
                               from the cache alone.

A mixed batch (prefills and decodes) runs both kernels: decode_attention on meta.decode_seq_ids (GQA-aware:
each KV head read once per group, where the prefill kernel would read it once per query head) and
prefill_attention on meta.prefill_seq_ids, each writing its own rows of one output.

`kv_write_fusable`: the model's attention layer may write K/V in its rotary kernel instead
(kernels.apply_rotary_and_write_kv) and call `attend`, one launch fewer per layer; and in a decode-only
step small enough (`new_tokens_fusable`) hand the raw q / k / v to `attend_new_tokens`, whose one
decode launch also does the RoPE (and Qwen3's q/k norm) and the K/V write
($PAGEDSERVE_ROPE_IN_ATTENTION=0: the two launches always).
"""

from __future__ import annotations

import torch

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata
from ipc import envs
from kernels import decode_attention, prefill_attention, write_kv_cache
from kernels.decode_attention import NewTokens, _num_sms, reserve_split_counters, rope_inside_pays


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    kv_write_fusable = True

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
        if key.shape[0] != meta.num_tokens:
            raise ValueError(f"key {tuple(key.shape)} must have meta.num_tokens={meta.num_tokens} rows")
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        return self.attend(query, k_cache, v_cache, meta, scale)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, prefetch: torch.Tensor | None = None) -> torch.Tensor:
        """Attention only: the step's K/V are already in the caches. A decode-only step's kernel also
        prefetches `prefetch` (o_proj's weight) into L2 (kernels/prefetch.py)."""
        if query.dim() != 3 or query.shape[0] != meta.num_tokens:
            raise ValueError(f"query {tuple(query.shape)} must have meta.num_tokens={meta.num_tokens} rows")
        out = torch.empty_like(query)
        if meta.is_decode_only:
            if meta.num_tokens != meta.num_seqs:
                raise ValueError(f"is_decode_only needs one token per sequence, got {meta.num_tokens} "
                                 f"tokens for {meta.num_seqs} sequences")
            return decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                    meta.max_seq_len, scale, out=out, prefetch_weight=prefetch)
        if meta.decode_seq_ids is not None:  # mixed: decodes read each KV head once, in the decode kernel
            decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                             out=out, seq_ids=meta.decode_seq_ids, query_start_loc=meta.query_start_loc)
        return prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                 meta.seq_lens, meta.max_query_len, scale, out=out, seq_ids=meta.prefill_seq_ids)

    def new_tokens_fusable(self, meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> bool:
        """Whether this step should go through attend_new_tokens: decode-only, and small enough that its
        attention launch has room for the RoPE (kernels.decode_attention.rope_inside_pays)."""
        return meta.is_decode_only and rope_inside_pays(meta.num_seqs, num_kv_heads, device)

    def attend_new_tokens(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                          rope, q_norm=None, k_norm=None, prefetch: torch.Tensor | None = None) -> torch.Tensor:
        """A decode-only step in one launch: the raw query and key rotated (after Qwen3's q/k norm
        modules q_norm / k_norm, if given), the key and value stored at meta.slot_mapping, attention
        over the cached context plus each sequence's own token (kernels.decode_attention's `rope=`).
        `rope`: the model's RotaryEmbedding (its float32 cos / sin tables)."""
        if not meta.is_decode_only or query.dim() != 3 or query.shape[0] != meta.num_seqs:
            raise ValueError(f"attend_new_tokens takes a decode-only step, one query row per sequence "
                             f"(query {tuple(query.shape)}, {meta.num_seqs} sequences)")
        norm = {} if q_norm is None else dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=q_norm.eps)
        new = NewTokens(key, value, positions, rope.cos_cache, rope.sin_cache, meta.slot_mapping, **norm)
        return decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                                out=torch.empty_like(query), prefetch_weight=prefetch, rope=new)

    def warm_up(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, max_num_seqs: int, rope_norm: bool | None = None) -> None:
        """Reserve the decode kernel's split counters (before CUDA graph capture), and compile every
        attention kernel variant a step can pick, on a throwaway cache: decode with and without splits,
        with few or many programs, alone or beside prefills, and (`rope_norm` not None) with the step's
        RoPE inside, with or without q/k norm as the model has it; prefill at each tile size, alone or
        beside decodes. Triton compiles each variant on first use, about a second, which would
        otherwise land in a user's first steps."""
        reserve_split_counters(device, max_num_seqs, num_kv_heads)
        block_size, context = 16, 256  # 256 tokens: two 128-token splits
        cache = torch.zeros(2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        # past 2 (seq, KV head) programs an SM the decode kernel takes its other tile size (_launch_config)
        many = -(-2 * _num_sms(device) // num_kv_heads) + 1

        def batch(q_lens: list[int]):
            n = len(q_lens)
            qsl = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
            seq_lens = torch.full((n,), context, dtype=torch.int32, device=device)
            table = torch.zeros(n, context // block_size, dtype=torch.int32, device=device)  # all block 0
            return torch.zeros(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device), qsl, seq_lens, table

        # the variant decode steps will run: prefetching o_proj's weight only where the model asks it to
        next_weight = torch.zeros(16, 64, dtype=dtype, device=device) if envs.prefetch_in_attention() else None
        rope_table = torch.zeros(context, head_dim // 2, dtype=torch.float32, device=device)  # cos = sin = 0
        for num_seqs in (1, many):
            for splits in (1, 2):
                q, qsl, seq_lens, table = batch([1] * num_seqs)
                decode_attention(q, cache, cache, table, seq_lens, context, 1.0, num_splits=splits,
                                 prefetch_weight=next_weight)
                if rope_norm is not None and rope_inside_pays(num_seqs, num_kv_heads, device):  # attend_new_tokens
                    k = torch.zeros(num_seqs, num_kv_heads, head_dim, dtype=dtype, device=device)
                    w = torch.ones(head_dim, dtype=dtype, device=device) if rope_norm else None
                    decode_attention(q, cache, cache, table, seq_lens, context, 1.0, num_splits=splits,
                                     prefetch_weight=next_weight,
                                     rope=NewTokens(k, k, seq_lens.long() - 1, rope_table, rope_table,
                                                    torch.full((num_seqs,), -1, device=device), w, w))
                q, qsl, seq_lens, table = batch([1] * num_seqs + [2])  # + a prefill: a mixed batch
                decode_attention(q, cache, cache, table, seq_lens, context, 1.0, num_splits=splits,
                                 seq_ids=torch.arange(num_seqs, dtype=torch.int32, device=device),
                                 query_start_loc=qsl)
        for q_len in (16, 17, 128):  # the three tile configurations (see kernels/prefill_attention.py)
            q, qsl, seq_lens, table = batch([q_len, 1])
            prefill_attention(q, cache, cache, table[:1], qsl[:2], seq_lens[:1], q_len, 1.0)
            prefill_attention(q, cache, cache, table, qsl, seq_lens, q_len, 1.0,
                              seq_ids=torch.zeros(1, dtype=torch.int32, device=device))
