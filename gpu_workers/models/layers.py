"""Building blocks shared by our decoder-only models (Llama, Mistral, Qwen2, Qwen3).

Every layer works on a flat batch of tokens (`[num_tokens, ...]`, no batch dimension): the attention
backend knows which tokens belong to which request through `AttentionMetadata`.

Tensor parallelism (Megatron-style, over `get_tp_group()`; all of it vanishes at size 1): each rank
keeps its heads' slice of qkv_proj and its slice of gate_up_proj (column-parallel), the matching
input columns of o_proj and down_proj (row-parallel, one all-reduce each), and its rows of the
vocabulary (embedding: masked lookup + all-reduce; LM head: all-gather of the logits). Weights are
plain parameters with a `weight_loader(param, loaded, shard_id)` attribute that reads only this
rank's slice of the checkpoint tensor. Merged projections keep each shard's slice contiguous:

    qkv_proj.weight rows (rank r): [ q: r's heads | k: r's kv heads | v: r's kv heads ]
    gate_up_proj.weight rows (rank r): [ gate: r's intermediate slice | up: same slice ]
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata
from gpu_workers.distributed import get_tp_group

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], None]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Copies a whole checkpoint tensor into `param` (casting dtype, moving device).

    `loaded` is a torch.Tensor or a lazy checkpoint slice (gpu_workers.loader.SafetensorsSlice): both
    have `.shape` and `.narrow(dim, start, length)`, and only what is narrowed gets read."""
    assert shard_id is None, f"unsharded parameter got shard_id {shard_id!r}"
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded.narrow(0, 0, loaded.shape[0]))


def _new_param(*shape: int) -> nn.Parameter:
    # Uninitialized on purpose: the loader overwrites every value, and skipping init keeps
    # construction of a multi-billion-parameter model fast.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


# ---------------------------------------------------------------- tensor-parallel splits


class HeadSplit(NamedTuple):
    """The attention heads one rank keeps."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    """Index of this rank's first KV head in the checkpoint."""


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """ValueError naming the numbers when a model cannot be split over tp_size ranks."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide num_attention_heads {num_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} must be a multiple or a divisor of "
                         f"tensor_parallel_size {tp_size}")
    if intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide intermediate_size {intermediate_size}")


def split_heads(num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> HeadSplit:
    """Query heads are split evenly. KV heads are split too when there are at least tp_size of them;
    otherwise each is replicated on tp_size // num_kv_heads consecutive ranks, the ones whose query
    heads attend to it:

        8 q heads, 2 kv heads, tp 4:  rank 0: q0 q1 | kv0   rank 1: q2 q3 | kv0
                                      rank 2: q4 q5 | kv1   rank 3: q6 q7 | kv1
    """
    if num_kv_heads >= tp_size:
        local_kv = num_kv_heads // tp_size
        return HeadSplit(num_heads // tp_size, local_kv, tp_rank * local_kv)
    return HeadSplit(num_heads // tp_size, 1, tp_rank * num_kv_heads // tp_size)


# ---------------------------------------------------------------- linear layers


class Linear(nn.Module):
    """y = x W^T (+ b), W [output_size, input_size], replicated on every rank. The parallel variants
    below keep only this rank's slice of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp = get_tp_group()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = _new_param(output_size, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnShard(NamedTuple):
    """Where one checkpoint tensor's slice lands in a merged column-parallel weight."""

    offset: int
    """First row in this rank's merged weight."""
    size: int
    """Rows this rank keeps."""
    source_start: int
    """First row this rank reads from the checkpoint tensor."""
    full_size: int
    """Rows of the whole checkpoint tensor."""


class MergedColumnParallelLinear(Linear):
    """Several projections of the same input fused into one matmul, output columns split across
    ranks; this rank's slices of the shards are laid end to end (gate_up: [gate_r | up_r])."""

    def __init__(self, input_size: int, shards: dict[Any, ColumnShard], bias: bool = False):
        super().__init__(input_size, sum(s.size for s in shards.values()), bias)
        self.shards = shards
        self.weight.shard_ids = tuple(shards)
        if self.bias is not None:
            self.bias.shard_ids = tuple(shards)

    @classmethod
    def split_evenly(cls, input_size: int, output_sizes: dict[Any, int], bias: bool = False):
        """Each shard's rows divided evenly over the ranks, in rank order."""
        rank, size = get_tp_group().rank, get_tp_group().world_size
        shards, offset = {}, 0
        for shard_id, full in output_sizes.items():
            local = full // size
            shards[shard_id] = ColumnShard(offset, local, rank * local, full)
            offset += local
        return cls(input_size, shards, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None and self.tp.world_size == 1:  # a checkpoint that already stores the merged tensor
            default_weight_loader(param, loaded)
            return
        if shard_id not in self.shards:
            raise ValueError(f"merged checkpoint tensors cannot be split across ranks (shard {shard_id!r})")
        shard = self.shards[shard_id]
        if loaded.shape[0] != shard.full_size or tuple(loaded.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"shard {shard_id!r}: checkpoint shape {tuple(loaded.shape)} does not fit "
                             f"{shard.full_size} rows x {tuple(param.shape[1:])}")
        param.data.narrow(0, shard.offset, shard.size).copy_(loaded.narrow(0, shard.source_start, shard.size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """The merged q/k/v projection of this rank's heads (see split_heads):

        weight rows: [ q: local heads * head_dim | k: local kv heads * head_dim | v: same ]
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_tp_group()
        split = split_heads(num_heads, num_kv_heads, tp.rank, tp.world_size)
        q_size, kv_size = split.num_heads * head_dim, split.num_kv_heads * head_dim
        kv_start = split.kv_head_start * head_dim
        super().__init__(hidden_size, {
            "q": ColumnShard(0, q_size, tp.rank * q_size, num_heads * head_dim),
            "k": ColumnShard(q_size, kv_size, kv_start, num_kv_heads * head_dim),
            "v": ColumnShard(q_size + kv_size, kv_size, kv_start, num_kv_heads * head_dim),
        }, bias)
        self.split = split


class RowParallelLinear(Linear):
    """Input columns split across ranks (the input is already this rank's slice: its heads' attention
    output, or its slice of the MLP); the partial products are summed with one all-reduce, then the
    (replicated) bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size // get_tp_group().world_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if param is self.bias or self.tp.world_size == 1:
            default_weight_loader(param, loaded, shard_id)
            return
        local = self.input_size
        if tuple(loaded.shape) != (self.output_size, local * self.tp.world_size):
            raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != "
                             f"{(self.output_size, local * self.tp.world_size)}")
        param.data.copy_(loaded.narrow(1, self.tp.rank * local, local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))  # [num_tokens, output_size]
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding table split by vocabulary rows: rank r keeps rows [r*V', (r+1)*V') of the
    table padded to V' * tp_size rows (padding rows are zero). A token outside this rank's rows
    looks up zeros, so the all-reduce of the ranks' lookups is the full embedding."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.world_size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.weight = _new_param(self.rows_per_rank, hidden_size)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if self.tp.world_size == 1:
            default_weight_loader(param, loaded, shard_id)
            return
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != {(self.vocab_size, param.shape[1])}")
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        param.data[rows:].zero_()
        if rows:
            param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden_size]
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)  # [num_tokens, hidden_size]
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with the embedding's vocabulary split (so a tied head is the same table);
    every rank gathers the full logits, so all ranks sample the same tokens."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)  # [num_tokens, rows_per_rank]
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, :self.vocab_size]  # [num_tokens, vocab_size]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. With `residual`, adds it first and also returns the sum (the new
    residual stream), saving one read of the hidden states per layer."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # Cast back before scaling, as the HF reference does, so low-precision outputs match it.
        return self.weight * x.to(orig_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def rope_parameters(hf_config) -> tuple[float, dict]:
    """(rope_theta, scaling dict with a "rope_type" key) from a transformers v5 (`rope_parameters`)
    or v4 (`rope_theta` + `rope_scaling`) config."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = getattr(hf_config, "rope_theta", 10000.0)
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency remap: long wavelengths are slowed by `factor`, short ones kept, and the
    band between blends the two smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_context_len / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < old_context_len / high_freq_factor, inv_freq, out)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate the two halves of head_dim), cos/sin precomputed in float32 for every
    position up to `max_position`."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict):
        super().__init__()
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        self.head_dim = head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta ** exponents)  # [head_dim // 2]
        if rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
        # Non-persistent: never in a checkpoint, and kept float32 whatever the model dtype.
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)  # [num_tokens, heads, head_dim // 2] each
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [num_tokens, num_heads, head_dim], key [num_tokens, num_kv_heads, head_dim]."""
        cos = self.cos_cache[positions].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
        sin = self.sin_cache[positions].unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


class SiluAndMulMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear.split_evenly(
            hidden_size, {0: intermediate_size, 1: intermediate_size}, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size / tp]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # [num_tokens, hidden_size]


class Attention(nn.Module):
    """Self-attention: merged qkv projection, optional per-head q/k RMSNorm (Qwen3), RoPE, then the
    paged attention backend, then o_proj."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias)
        self.num_heads = self.qkv_proj.split.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.split.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.rotary_emb = rotary_emb  # one instance shared by every layer
        self.attn_backend = attn_backend

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        k_cache, v_cache = kv_cache
        out = self.attn_backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))  # [num_tokens, hidden_size]
