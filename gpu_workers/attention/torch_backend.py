"""Pure-torch paged attention: the reference backend, and the one that runs on CPU.

Each step it (1) writes the new K/V at `slot_mapping` through a flat view of the caches, then
(2) attends:
  - decode requests (q_len == 1) are batched: their context blocks are gathered into one padded
    `[num_decodes, max_context, num_kv_heads, head_dim]` tensor and positions past each seq_len masked;
  - prefill chunks are handled one request at a time, queries split into row chunks so the float32
    score matrix stays bounded on long prompts.
Scores, softmax and the weighted sum run in float32 whatever the cache dtype.
GQA: queries are viewed as [num_kv_heads, group, ...] so no K/V copy is made per query head.
"""

from __future__ import annotations

import torch

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata

# Upper bound on float32 elements (scores, gathered K) materialized at once: 256 MiB.
_MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

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
        """query [num_tokens, num_heads, head_dim]; key/value [num_tokens, num_kv_heads, head_dim];
        returns [num_tokens, num_heads, head_dim] in query's dtype."""
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.num_tokens == 0:
            return torch.empty_like(query)
        if meta.is_decode_only:
            seq_ids = list(range(meta.num_seqs))
            return _decode_attention(query, k_cache, v_cache, meta, seq_ids, scale)
        q_lens = [meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i] for i in range(meta.num_seqs)]
        out = torch.empty_like(query)
        decode_ids = [i for i, n in enumerate(q_lens) if n == 1]
        if decode_ids:
            rows = torch.tensor([meta.query_start_loc_cpu[i] for i in decode_ids], device=query.device)
            out[rows] = _decode_attention(query[rows], k_cache, v_cache, meta, decode_ids, scale)
        for i, q_len in enumerate(q_lens):
            if q_len <= 1:
                continue
            start = meta.query_start_loc_cpu[i]
            seq_len = meta.seq_lens_cpu[i]
            k, v = _gather_context(k_cache, v_cache, meta.block_tables[i], seq_len)
            out[start:start + q_len] = _prefill_attention(query[start:start + q_len], k, v, seq_len - q_len, scale)
        return out


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores token j's K/V at flat slot slot_mapping[j] (= block_id * block_size + offset)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len cached tokens of one request: two [seq_len, num_kv_heads, head_dim]."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return k, v


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_start: int, scale: float):
    """Causal attention of q_len queries at positions context_start.. over seq_len keys.
    q [q_len, num_heads, head_dim], k/v [seq_len, num_kv_heads, head_dim] -> [q_len, num_heads, head_dim]."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    kf = k.float().transpose(0, 1)  # [num_kv_heads, seq_len, head_dim]
    vf = v.float().transpose(0, 1)
    out = torch.empty_like(q)
    rows_per_chunk = max(1, _MAX_SCORE_ELEMENTS // (num_heads * seq_len))
    key_pos = torch.arange(seq_len, device=q.device)
    for r0 in range(0, q_len, rows_per_chunk):
        r1 = min(q_len, r0 + rows_per_chunk)
        # Query head h = kv_head * group + g, so this view pairs each group with its KV head.
        qf = q[r0:r1].float().view(r1 - r0, num_kv_heads, group, head_dim)
        qf = qf.permute(1, 2, 0, 3).reshape(num_kv_heads, group * (r1 - r0), head_dim)
        scores = torch.bmm(qf, kf.transpose(1, 2)) * scale  # [num_kv_heads, group * rows, seq_len]
        query_pos = torch.arange(context_start + r0, context_start + r1, device=q.device)
        masked = key_pos[None, :] > query_pos[:, None]  # [rows, seq_len], True = in the future
        scores = scores.view(num_kv_heads, group, r1 - r0, seq_len).masked_fill(masked, float("-inf"))
        probs = scores.softmax(dim=-1).view(num_kv_heads, group * (r1 - r0), seq_len)
        o = torch.bmm(probs, vf)  # [num_kv_heads, group * rows, head_dim]
        o = o.view(num_kv_heads, group, r1 - r0, head_dim).permute(2, 0, 1, 3)
        out[r0:r1] = o.reshape(r1 - r0, num_heads, head_dim).to(q.dtype)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    seq_ids: list[int],
    scale: float,
) -> torch.Tensor:
    """One query per request, batched over requests `seq_ids` (q row j belongs to seq_ids[j]).
    q [n, num_heads, head_dim] -> [n, num_heads, head_dim]."""
    n, num_heads, head_dim = q.shape
    block_size, num_kv_heads, _ = k_cache.shape[1:]
    group = num_heads // num_kv_heads
    max_len = max(meta.seq_lens_cpu[i] for i in seq_ids)
    max_blocks = -(-max_len // block_size)
    ctx = max_blocks * block_size
    out = torch.empty_like(q)
    # Bound both the gathered float32 K (ctx * num_kv_heads * head_dim per row) and the scores.
    per_chunk = max(1, _MAX_SCORE_ELEMENTS // (ctx * max(num_heads, num_kv_heads * head_dim)))
    ids = torch.tensor(seq_ids, device=q.device)
    for c0 in range(0, n, per_chunk):
        c1 = min(n, c0 + per_chunk)
        tables = meta.block_tables[ids[c0:c1], :max_blocks].long()  # [rows, max_blocks]
        k = k_cache[tables].view(c1 - c0, ctx, num_kv_heads, head_dim).float()
        v = v_cache[tables].view(c1 - c0, ctx, num_kv_heads, head_dim).float()
        qf = q[c0:c1].float().view(c1 - c0, num_kv_heads, group, head_dim)
        scores = torch.matmul(qf, k.permute(0, 2, 3, 1)) * scale  # [rows, num_kv_heads, group, ctx]
        seq_lens = meta.seq_lens[ids[c0:c1]].long()
        padding = torch.arange(ctx, device=q.device)[None, :] >= seq_lens[:, None]  # [rows, ctx]
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        o = torch.matmul(scores.softmax(dim=-1), v.permute(0, 2, 1, 3))  # [rows, num_kv_heads, group, head_dim]
        out[c0:c1] = o.reshape(c1 - c0, num_heads, head_dim).to(q.dtype)
    return out
