"""A decode step's own tokens, for decode attention to finish in its launch (decode_attention's `rope=`):
the inputs (NewTokens), their checks, and the RoPE math the kernel applies to its query group and to
the new key, which is kernels/rotary.py's: element d of a head pairs with element d +- head_dim / 2,

    out[d] = x[d] * cos[d % half] + sign[d] * x[partner[d]] * sin[d % half]     sign = -1 for d < half, +1 after

in float32, after Qwen3's per-head RMSNorm when the weights are given, rounded to the dtype once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_int_dtype, check_last_dim_contiguous, check_same_device
from kernels.rotary import _check_inputs as check_rotary


class NewTokens(NamedTuple):
    """A decode step's own tokens for decode_attention to finish in the same launch (`rope=`): the query
    it gets is raw, and it norms (Qwen3's q/k norm, with the weights) and rotates q and this key, stores
    the key and value in the caches at slot_mapping, and attends to the cached context plus this token.
    kernels/rotary.py's apply_rotary_and_write_kv, then decode_attention, in one launch."""

    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], not rotated (head_dim contiguous)
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor  # [num_tokens] int64 / int32
    cos_cache: torch.Tensor  # [max_position, head_dim // 2] float32 (RotaryEmbedding's)
    sin_cache: torch.Tensor  # [max_position, head_dim // 2] float32
    slot_mapping: torch.Tensor  # [num_tokens] int64 / int32: the cache row of each token; < 0: not stored
    q_norm_weight: torch.Tensor | None = None  # [head_dim] (Qwen3), with k_norm_weight
    k_norm_weight: torch.Tensor | None = None
    eps: float = 1e-6


def check_new_tokens(rope: NewTokens, query: torch.Tensor, k_cache: torch.Tensor) -> None:
    """decode_attention's checks of `rope=` (shapes, dtypes, strides, devices), before any launch."""
    check_rotary(query, rope.key, rope.positions, rope.cos_cache, rope.sin_cache, rope.q_norm_weight,
                 rope.k_norm_weight)
    check_last_dim_contiguous("value", rope.value, 3)
    if rope.key.shape[1:] != k_cache.shape[2:] or rope.value.shape != rope.key.shape or rope.value.dtype != query.dtype:
        raise ValueError(f"key {tuple(rope.key.shape)} and value {tuple(rope.value.shape)} {rope.value.dtype} "
                         f"must be [{query.shape[0]}, {k_cache.shape[2]}, {k_cache.shape[3]}] {query.dtype}")
    if rope.cos_cache.stride(0) != rope.sin_cache.stride(0):
        raise ValueError("cos_cache and sin_cache must share their row stride")
    if rope.slot_mapping.shape != (query.shape[0],):
        raise ValueError(f"slot_mapping must be [{query.shape[0]}], got {tuple(rope.slot_mapping.shape)}")
    check_int_dtype("slot_mapping", rope.slot_mapping, (torch.int64, torch.int32))
    check_same_device(k_cache.device, value=rope.value, slot_mapping=rope.slot_mapping, key=rope.key)


@triton.jit
def rope_rows(ptr, rows, stride_h, d, partner, d_mask, cos, sin, sign, w_ptr, head_dim, eps,
              HAS_NORM: tl.constexpr):
    """Rows `rows` (heads, stride_h apart) of one token at `ptr`, each RMS-normed by w (HAS_NORM, Qwen3's
    q/k norm) and rotated neox-style, rounded to the dtype: kernels/rotary.py's math, where element d
    pairs with element `partner` (d +- head_dim / 2) and sign is -1 in the first half, +1 in the second."""
    dtype = ptr.dtype.element_ty
    mask = (rows[:, None] >= 0) & d_mask[None, :]
    base = ptr + rows[:, None] * stride_h
    x = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x = ((x * inv_rms).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
        xp = ((xp * inv_rms).to(dtype).to(tl.float32) * wp).to(dtype).to(tl.float32)
    return (x * cos[None, :] + sign[None, :] * xp * sin[None, :]).to(dtype)
