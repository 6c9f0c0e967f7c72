"""Writing a step's new K/V into the paged KV cache (vLLM calls this reshape_and_cache).

    key/value [num_tokens, num_kv_heads, head_dim]    slot_mapping [num_tokens]
          token t ──► slot s = block_id * block_size + offset  (s < 0: padding, skipped)
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]

One program per token copies all its KV heads. The shared argument checks used by every attention
wrapper (`check_kv_cache`, `check_last_dim_contiguous`) live here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain Python: triton.cdiv is a jit function, ~8 us per host call


def next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def check_last_dim_contiguous(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both caches: [num_blocks, block_size, num_kv_heads, head_dim], same dtype/device/shape/strides."""
    check_last_dim_contiguous("k_cache", k_cache, 4)
    check_last_dim_contiguous("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache strides {k_cache.stride()} differ from v_cache strides {v_cache.stride()}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cache dtypes must match and be one of {SUPPORTED_DTYPES}, "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.device != v_cache.device:
        raise ValueError(f"k_cache on {k_cache.device} but v_cache on {v_cache.device}")


def check_slot_rows(k_cache: torch.Tensor) -> None:
    """A cache [num_blocks, block_size, ...] whose (block, offset) dims are contiguous, so that slot
    block_id * block_size + offset is a row at stride(1): what kernels storing by slot_mapping need."""
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError(f"the caches must be contiguous over (block, offset) so a slot is a row; strides "
                         f"{k_cache.stride()}")


def check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the KV cache's device)")


def check_int_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


@triton.jit
def paged_kv_offsets(bt_row, pos, n_mask, d, kv_head, block_size, stride_cb, stride_co, stride_ch):
    """[len(pos), len(d)] offsets into a paged cache [num_blocks, block_size, num_kv_heads, head_dim] of
    the given context positions of one sequence (its block-table row at bt_row) and KV head."""
    block_ids = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
    return (block_ids[:, None] * stride_cb + (pos % block_size)[:, None] * stride_co
            + kv_head * stride_ch + d[None, :])


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,  # key/value: token, head (last dim contiguous)
    stride_cb, stride_co, stride_ch,  # cache: block, offset in block, head
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token: nothing to store
        return
    block_id = slot // block_size
    block_offset = slot % block_size

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]
    tok = token.to(tl.int64)
    k = tl.load(key_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    dst = block_id * stride_cb + block_offset * stride_co + heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (int32 accepted); < 0 means skip
) -> None:
    """Store each token's K/V at its slot (block_id * block_size + offset) in the paged caches, in place.

    The slots are not bounds-checked on the device (that would need a sync); callers own their validity.
    """
    check_kv_cache(k_cache, v_cache)
    check_last_dim_contiguous("key", key, 3)
    check_last_dim_contiguous("value", value, 3)
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    num_tokens, num_kv_heads, head_dim = key.shape
    _, block_size, cache_heads, cache_dim = k_cache.shape
    if (num_kv_heads, head_dim) != (cache_heads, cache_dim):
        raise ValueError(f"key has (num_kv_heads, head_dim)=({num_kv_heads}, {head_dim}) but the cache "
                         f"has ({cache_heads}, {cache_dim})")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"key/value dtypes ({key.dtype}, {value.dtype}) must match the cache's {k_cache.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    check_int_dtype("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    check_same_device(k_cache.device, key=key, value=value, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()

    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    num_warps = 4 if block_h * block_d >= 2048 else 1
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim, block_size,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )
