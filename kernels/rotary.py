"""Neox-style rotary embedding (rotate_half, as HF Llama/Qwen), optionally after Qwen3's per-head
q/k RMSNorm, for q and k in one launch: one program per token.

    head of size D = [ x1 (D/2) | x2 (D/2) ]     pos = positions[t]
    out = [ x1 * cos[pos] - x2 * sin[pos] | x2 * cos[pos] + x1 * sin[pos] ]

cos_cache/sin_cache are gpu_workers.models.layers.RotaryEmbedding's float32 buffers
[max_position, D/2]; the math is float32 and the result is rounded to q's dtype once. With norm
weights, each head is first RMS-normalized over its D values (float32 statistics, rounded to the
dtype, times the weight, rounded again), exactly the torch path's q_norm/k_norm followed by RoPE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import (SUPPORTED_DTYPES, check_int_dtype, check_last_dim_contiguous, check_same_device,
                              next_pow2)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, w_ptr, token, stride_xt, stride_xh, stride_ot, stride_oh,
    cos, sin,  # [BLOCK_HALF] float32
    num_heads, half, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (d[None, :] < half)  # [BLOCK_H, BLOCK_HALF]
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if HAS_NORM:
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)  # [BLOCK_H]
        inv_rms = tl.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + half + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,  # inputs: token, head (head_dim contiguous)
    stride_qot, stride_qoh, stride_kot, stride_koh,  # outputs: token, head
    stride_cos, stride_sin,  # caches: position
    num_heads, num_kv_heads, half, eps,
    HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d < half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, q_w_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh,
                  cos, sin, num_heads, half, eps, HAS_NORM, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, k_w_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh,
                  cos, sin, num_kv_heads, half, eps, HAS_NORM, BLOCK_HK, BLOCK_HALF)


def _check_inputs(q, k, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight) -> None:
    check_last_dim_contiguous("q", q, 3)
    check_last_dim_contiguous("k", k, 3)
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share num_tokens and head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q/k dtypes ({q.dtype}, {k.dtype}) must match and be one of {SUPPORTED_DTYPES}")
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
    check_int_dtype("positions", positions, (torch.int64, torch.int32))
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        check_last_dim_contiguous(name, cache, 2)
        if cache.shape[1] != head_dim // 2 or cache.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [max_position, {head_dim // 2}], got "
                             f"{cache.dtype} {tuple(cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight come together (Qwen3 normalizes both)")
    if q_norm_weight is not None:
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            if w.shape != (head_dim,) or w.stride(0) != 1 or w.dtype != q.dtype:
                raise ValueError(f"{name} must be a contiguous [{head_dim}] {q.dtype}, got "
                                 f"{tuple(w.shape)} {w.dtype} strides {w.stride()}")
        check_same_device(q.device, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    check_same_device(q.device, k=k, positions=positions, cos_cache=cos_cache, sin_cache=sin_cache)


def apply_rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64 (int32 accepted)
    cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    q_norm_weight: torch.Tensor | None = None,  # [head_dim], q's dtype (Qwen3)
    k_norm_weight: torch.Tensor | None = None,  # [head_dim], q's dtype (Qwen3)
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k by their tokens' positions (after the per-head RMSNorm when norm weights are
    given). Returns (q_out, k_out): new contiguous tensors, or q and k themselves with `inplace`.

    q and k may be strided views (e.g. slices of the merged qkv projection) as long as head_dim is
    contiguous. Positions are not bounds-checked on the device (that would need a sync)."""
    _check_inputs(q, k, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    block_hq, block_hk, block_half = next_pow2(num_heads), next_pow2(num_kv_heads), next_pow2(half)
    num_warps = min(max(block_hq * block_half // 256, 1), 8)
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_cache, sin_cache,
        q_norm_weight if has_norm else cos_cache, k_norm_weight if has_norm else cos_cache,  # unused without norm
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        num_heads, num_kv_heads, half, float(eps),
        HAS_NORM=has_norm, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out
