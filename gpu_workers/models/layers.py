"""Building blocks shared by our decoder-only models (Llama, Mistral, Qwen2, Qwen3): norms, rotary
embedding, the MLP and attention. The tensor-parallel linear and vocabulary layers live in
parallel_layers.py.

Every layer works on a flat batch of tokens (`[num_tokens, ...]`, no batch dimension): the attention
backend knows which tokens belong to which request through `AttentionMetadata`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.attention.base import AttentionBackend, AttentionMetadata
from gpu_workers.distributed import get_tp_group
from gpu_workers.models import elementwise
from gpu_workers.models.parallel_layers import (MergedColumnParallelLinear, QKVParallelLinear, Reduced,
                                                RowParallelLinear, default_weight_loader)
from ipc import envs

class RMSNorm(nn.Module):
    """RMSNorm computed in float32. With `residual`, adds it first and also returns the sum (the new
    residual stream), saving one read of the hidden states per layer."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.tp = get_tp_group()  # reduces partial inputs (see forward)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # Cast back before scaling, as the HF reference does, so low-precision outputs match it.
        return self.weight * x.to(orig_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False, slot: int | None = None,
        prefetch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """partial: x is this rank's partial sums of a row-parallel layer, summed over the ranks first
        (in one launch with the add and the norm where the symmetric-memory all-reduce takes it; `slot`
        as in TPGroup.all_reduce_add_rms_norm; that launch also prefetches the weight `prefetch` of the
        matmul after it into L2 while it waits for its peers). x must then come from a RowParallelLinear
        whose push_slot is `slot`: where TPGroup.matmul_push says so, that matmul pushed x to the peers
        itself, and only this call empties the slot again."""
        if partial:
            pushed = x.dim() == 2 and self.tp.matmul_push(*x.shape, x, slot) is not None
            if pushed and residual is None:
                raise ValueError("pushed partial sums need the fused add + norm, which takes a residual")
            fused = None if residual is None else self.tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps,
                                                                                  slot, prefetch, pushed)
            if fused is not None:
                return fused
            x = self.tp.all_reduce(x)
        if x.dim() == 2 and elementwise.use_triton(x):  # fused Triton kernel (see elementwise.py)
            return elementwise.rms_norm(x, self.weight, self.eps, residual)
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
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul; at decode sizes on the GPU
    that matmul and the activation are one launch (kernels.gemv.gated_gemv, where takes_gated)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear.split_evenly(
            hidden_size, {0: intermediate_size, 1: intermediate_size}, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, reduce_results)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | Reduced:
        """`residual`: down_proj's (RowParallelLinear.forward)."""
        from kernels import gemv

        weight, bias = self.gate_up_proj.weight, self.gate_up_proj.bias
        if (x.dim() == 2 and gemv.takes_gated(x.shape[0], weight.shape[0] // 2, x.dtype, x.device)
                and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)):
            # a decode step: the matmul and the activation in one launch (kernels/gemv.py, gated)
            return self.down_proj(gemv.gated_gemv(x.contiguous(), weight, bias), residual)
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size / tp]
        if elementwise.use_triton(gate_up):  # fused Triton kernel (see elementwise.py)
            return self.down_proj(elementwise.silu_and_mul(gate_up), residual)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, residual)  # [num_tokens, hidden_size]


class Attention(nn.Module):
    """Self-attention: merged qkv projection, optional per-head q/k RMSNorm (Qwen3), RoPE, then the
    paged attention backend, then o_proj (whose partial sums, with reduce_results=False, the caller
    reduces). On the GPU the K/V cache write joins the rotary launch, or at decode sizes the qkv
    matmul's epilogue together with RoPE (kernels.qkv_rope.qkv_rope_gemv), or for small decode steps
    decode attention itself."""

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
        reduce_results: bool = True,
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
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, reduce_results)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.rotary_emb = rotary_emb  # one instance shared by every layer
        self.attn_backend = attn_backend
        self.prefetch_o_proj = envs.prefetch_in_attention()
        self.rope_in_attention = envs.rope_in_attention()

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | Reduced:
        """`residual`: o_proj's (RowParallelLinear.forward)."""
        k_cache, v_cache = kv_cache
        if self._qkv_takes_rope(hidden_states, meta):
            # one launch: the qkv matmul, RoPE, and the K/V cache write in its epilogue (kernels/qkv_rope.py)
            from kernels import qkv_rope

            q = qkv_rope.qkv_rope_gemv(hidden_states.contiguous(), self.qkv_proj.weight, self.qkv_proj.bias,
                                       positions.contiguous(), self.rotary_emb.cos_cache, self.rotary_emb.sin_cache,
                                       k_cache, v_cache, meta.slot_mapping.contiguous(), self.num_heads,
                                       self.num_kv_heads)  # [num_tokens, num_heads, head_dim], rotated
            prefetch = self.o_proj.weight if self.prefetch_o_proj else None
            out = self.attn_backend.attend(q, k_cache, v_cache, meta, self.scale, prefetch=prefetch)
            return self.o_proj(out.reshape(-1, self.q_size), residual)
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if elementwise.use_triton(q) and self.attn_backend.kv_write_fusable:
            # ($PAGEDSERVE_PREFETCH_ATTENTION=1: a decode step's attention also prefetches o_proj's weight)
            prefetch = self.o_proj.weight if self.prefetch_o_proj else None
            if self.rope_in_attention and self.attn_backend.new_tokens_fusable(meta, self.num_kv_heads, q.device):
                # a small decode step: RoPE, K/V write and attention in one launch
                out = self.attn_backend.attend_new_tokens(q, k, v, positions, k_cache, v_cache, meta, self.scale,
                                                          self.rotary_emb, self.q_norm, self.k_norm, prefetch)
                return self.o_proj(out.reshape(-1, self.q_size), residual)
            # one Triton kernel: q/k norm (Qwen3), RoPE, and the K/V cache write; then attention alone
            q = elementwise.rotary_and_write_kv(self.rotary_emb, positions, q, k, v, k_cache, v_cache,
                                                meta.slot_mapping, self.q_norm, self.k_norm)
            out = self.attn_backend.attend(q, k_cache, v_cache, meta, self.scale, prefetch=prefetch)
            return self.o_proj(out.reshape(-1, self.q_size), residual)
        if elementwise.use_triton(q):  # one fused Triton kernel: q/k norm (Qwen3) + RoPE
            q, k = elementwise.rotary(self.rotary_emb, positions, q, k, self.q_norm, self.k_norm)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn_backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size), residual)  # [num_tokens, hidden_size]

    def _qkv_takes_rope(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step's qkv matmul also applies RoPE and writes K/V (kernels.qkv_rope.qkv_rope_gemv):
        on the fused path with a backend that takes written caches, no q/k norm (Qwen3's needs a whole
        head in one program), a step whose decode attention would not rotate inside itself, and rows
        kernels.qkv_rope.takes_qkv_rope takes."""
        from kernels import qkv_rope

        weight, bias = self.qkv_proj.weight, self.qkv_proj.bias
        return (self.q_norm is None and x.dim() == 2 and elementwise.use_triton(x)
                and self.attn_backend.kv_write_fusable
                and qkv_rope.takes_qkv_rope(x.shape[0], weight.shape[0], self.head_dim, x.dtype, x.device)
                and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
                and not (self.rope_in_attention
                         and self.attn_backend.new_tokens_fusable(meta, self.num_kv_heads, x.device)))
