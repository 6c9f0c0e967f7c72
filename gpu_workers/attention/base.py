"""The attention-backend interface: what a model's attention layer calls, whatever the kernel.

A step's batch is flat: `num_tokens` query tokens from `num_seqs` requests laid end to end. Request i
owns queries `query_start_loc[i]:query_start_loc[i+1]`; they are the LAST q_len_i positions of a
context of `seq_lens[i]` tokens (earlier positions are already in the paged KV cache: computed in an
earlier step, a prefix-cache hit, or an earlier prefill chunk). Attention is causal inside the context.

    request 0: context [c c c c c q q]   seq_len 7, q_len 2 (a chunk over a cached prefix)
    request 1: context [c c c c q]       seq_len 5, q_len 1 (a decode)

KV cache of one layer: two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`; token t of request
i lives in block `block_tables[i, t // block_size]` at offset `t % block_size`. New K/V for the step's
tokens are written first at `slot_mapping` (block_id * block_size + offset), then read back with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    slot_mapping: torch.Tensor  # [num_tokens] int64, on the model's device
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on device
    seq_lens: torch.Tensor  # [num_seqs] int32, on device
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, on device, padded with 0
    query_start_loc_cpu: list[int]  # the same numbers as Python lists, for host-side loops
    seq_lens_cpu: list[int]
    is_decode_only: bool = False  # every request has q_len == 1
    # A mixed batch (q_len 1 and q_len > 1 requests): the indices of each kind, int32 on device, so a
    # backend can run its decode kernel on the first and its prefill kernel on the second; else None.
    decode_seq_ids: torch.Tensor | None = None
    prefill_seq_ids: torch.Tensor | None = None


class AttentionBackend:
    """Writes the step's K/V into the paged cache, then attends. Shapes:
    query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads, head_dim],
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; returns [num_tokens, num_heads, head_dim].
    num_heads is a multiple of num_kv_heads (GQA: query head h reads KV head h // (num_heads // num_kv_heads)).
    """

    name: str = "base"
    kv_write_fusable: bool = False
    """True when `attend` exists: attention over caches that already hold the step's K/V."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        raise NotImplementedError
