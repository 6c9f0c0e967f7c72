"""Neox-style rotary embedding (rotate_half, as HF Llama/Qwen), optionally after Qwen3's per-head
q/k RMSNorm, for q and k in one launch: one program per token.

    head of size D = [ x1 (D/2) | x2 (D/2) ]     pos = positions[t]
    out = [ x1 * cos[pos] - x2 * sin[pos] | x2 * cos[pos] + x1 * sin[pos] ]

cos_cache/sin_cache are gpu_workers.models.layers.RotaryEmbedding's float32 buffers
[max_position, D/2]; the math is float32 and the result is rounded to q's dtype once. With norm
weights, each head is first RMS-normalized over its D values (float32 statistics, rounded to the
dtype, times the weight, rounded again), exactly the torch path's q_norm/k_norm followed by RoPE.

apply_rotary_and_write_kv also does write_kv_cache's job in the same program: the rotated k and the
step's v go straight to their paged-cache slots (slot < 0: a padding token, nothing stored), so a
layer's attention needs no separate cache-write launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import (SUPPORTED_DTYPES, check_int_dtype, check_kv_cache, check_last_dim_contiguous,
                              check_same_device, check_slot_rows, next_pow2)
from kernels.pdl import pdl_prologue, use_pdl


@triton.jit
def _rotate_heads(
    src, dst, w_ptr, stride_sh, stride_dh,  # src/dst: this token's first head; strides between heads
    cos, sin,  # [BLOCK_HALF] float32
    num_heads, half, eps, store,  # store: False skips the stores (a padding token's cache slot)
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (d[None, :] < half)  # [BLOCK_H, BLOCK_HALF]
    x_ptrs = src + heads[:, None] * stride_sh + d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    if HAS_NORM:
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)  # [BLOCK_H]
        inv_rms = tl.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + half + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]
    d_ptrs = dst + heads[:, None] * stride_dh + d[None, :]
    tl.store(d_ptrs, (x1 * cos - x2 * sin).to(dtype), mask=mask & store)
    tl.store(d_ptrs + half, (x2 * cos + x1 * sin).to(dtype), mask=mask & store)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr,
    v_ptr, v_out_ptr, slot_mapping_ptr,  # WRITE_KV: k_out/v_out are the caches, rows found by slot
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # inputs: token, head (head_dim contiguous)
    stride_qot, stride_qoh, stride_kot, stride_koh,  # outputs: token (cache: slot), head
    stride_cos, stride_sin,  # caches: position
    num_heads, num_kv_heads, half, eps,
    HAS_NORM: tl.constexpr, WRITE_KV: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d < half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, q_w_ptr, stride_qh, stride_qoh,
                  cos, sin, num_heads, half, eps, True, HAS_NORM, BLOCK_HQ, BLOCK_HALF)
    if WRITE_KV:  # rotated K and plain V straight into the paged caches; slot < 0: padding, skipped
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        row = tl.maximum(slot, 0)  # a flat [num_blocks * block_size] row index (the caches' strides
        # are contiguous over (block, offset)), kept in bounds for padding tokens whose stores are masked
        _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + row * stride_kot, k_w_ptr, stride_kh, stride_koh,
                      cos, sin, num_kv_heads, half, eps, slot >= 0, HAS_NORM, BLOCK_HK, BLOCK_HALF)
        heads = tl.arange(0, BLOCK_HK)
        vd = tl.arange(0, 2 * BLOCK_HALF)
        v_mask = (heads[:, None] < num_kv_heads) & (vd[None, :] < 2 * half)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + vd[None, :], mask=v_mask)
        tl.store(v_out_ptr + row * stride_kot + heads[:, None] * stride_koh + vd[None, :],
                 v.to(v_out_ptr.dtype.element_ty), mask=v_mask & (slot >= 0))
    else:
        _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, k_w_ptr, stride_kh, stride_koh,
                      cos, sin, num_kv_heads, half, eps, True, HAS_NORM, BLOCK_HK, BLOCK_HALF)


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
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps)
    return q_out, k_out


def apply_rotary_and_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64 (int32 accepted)
    cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (int32 accepted); < 0 means skip
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """apply_rotary and write_kv_cache in one launch: returns the rotated q (a new tensor); the rotated
    k and the unchanged v go straight to their cache slots (block_id * block_size + offset), as
    write_kv_cache would store them. One launch per layer fewer, and k is never written back."""
    _check_inputs(q, k, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight)
    check_kv_cache(k_cache, v_cache)
    check_last_dim_contiguous("v", v, 3)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v {tuple(v.shape)} {v.dtype} must match k {tuple(k.shape)} {k.dtype}")
    cache_heads, cache_dim = k_cache.shape[2:]
    if (cache_heads, cache_dim) != tuple(k.shape[1:]) or k_cache.dtype != k.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} does not fit a cache of {cache_heads} KV heads of size "
                         f"{cache_dim} ({k_cache.dtype})")
    check_slot_rows(k_cache)
    if slot_mapping.shape != (q.shape[0],):
        raise ValueError(f"slot_mapping must be [{q.shape[0]}], got {tuple(slot_mapping.shape)}")
    check_int_dtype("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    check_same_device(q.device, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, q_out, k_cache, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
            kv=(v, v_cache, slot_mapping.contiguous()))
    return q_out


def _launch(q, k, q_out, k_out, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, kv=None):
    """One program per token. k_out is a [num_tokens, num_kv_heads, head_dim] tensor, or with `kv` =
    (v, v_cache, slot_mapping) the K cache, addressed as rows of block_size * num_blocks slots."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    block_hq, block_hk, block_half = next_pow2(num_heads), next_pow2(num_kv_heads), next_pow2(half)
    num_warps = min(max(block_hq * block_half // 256, 1), 8)
    v, v_out, slots = kv if kv is not None else (k, k_out, positions)  # unused without kv
    pdl = use_pdl(q.device)
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_cache, sin_cache,
        q_norm_weight if has_norm else cos_cache, k_norm_weight if has_norm else cos_cache,  # unused without norm
        v, v_out, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1),
        k_out.stride(1) if kv is not None else k_out.stride(0), k_out.stride(-2),
        cos_cache.stride(0), sin_cache.stride(0),
        num_heads, num_kv_heads, half, float(eps),
        HAS_NORM=has_norm, WRITE_KV=kv is not None,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        USE_PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
