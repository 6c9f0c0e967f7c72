"""An attention layer's merged qkv projection with RoPE and the K/V cache write in its epilogue, on
kernels/gemv.py's kernel (ROPE; the epilogue is kernels/gemv_epilogues.py's _store_rope): one launch
instead of the qkv matmul and kernels/rotary.py's apply_rotary_and_write_kv, at decode sizes."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ipc import envs
from kernels.decode_attention import _num_sms
from kernels.gemv import MAX_ROWS, ROW_PARALLEL_MIN_N, Config, _launch
from kernels.kv_cache import SUPPORTED_DTYPES, check_int_dtype, check_kv_cache, check_same_device, check_slot_rows
from kernels.pdl import use_pdl


class Rope(NamedTuple):
    """qkv_rope_gemv's operands besides the matmul's (kernels.gemv._launch reads them)."""

    positions: torch.Tensor  # [M] int
    cos_cache: torch.Tensor  # [max_position, head_dim / 2] float32
    sin_cache: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [M] int, < 0: not stored
    num_heads: int
    num_kv_heads: int
    head_dim: int


def qkv_rope_config(rows: int, n: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                    ) -> tuple[Config, int]:
    """(config, block_m) of `qkv_rope_gemv`'s launch: BLOCK_N features of each half of a head a program
    (so its columns hold both features of every RoPE pair): 32 where the n / 64 programs still cover
    two thirds of the SMs (Llama-8B at TP=1: 96), else 16 (a TP=2 rank: 96 programs of 2 x 16), the
    tile widths sweep_gemv.py found best for these shapes (session 19, qkv_proj at 64 rows: TP=1 64
    columns a program 18.65 us, cuBLAS 18.40; a TP=2 rank 32 columns 11.54-11.60, cuBLAS 11.73, each
    with the RMSNorm before it). 128-wide K tiles in 6 stages on 4 warps (float32: 64-wide, 8 warps);
    the dot tile 64 rows over 16."""
    half = head_dim // 2
    block_n = 32 if half % 32 == 0 and n // 64 >= 2 * _num_sms(device) // 3 else 16
    block_k, warps = (128, 4) if dtype.itemsize <= 2 else (64, 8)
    return (block_n, block_k, warps, 6, 1), (64 if rows > 16 else 16)


QKV_ROPE_MIN_ROWS = 17
"""Unless $PAGEDSERVE_QKV_ROPE_GEMV says otherwise, the fewest token rows a step needs for its qkv_proj to
take `qkv_rope_gemv` (smaller decode steps mostly rotate inside decode attention instead). One H200,
ms a step on / off, alternating (BENCHMARKS.md, session 19): Llama-8B TP=1 batch 64 5.102 / 5.151,
5.091 / 5.148; batch 32 4.640 / 4.705, 4.647 / 4.742; one TP=2 rank's work (8b-rank2) at batch 64,
five pairs, 2.957 / 2.956 on average (no change)."""


def takes_qkv_rope(rows: int, n: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a qkv_proj of `rows` token rows into `n` features runs as `qkv_rope_gemv`:
    QKV_ROPE_MIN_ROWS-64 rows ($PAGEDSERVE_QKV_ROPE_GEMV=1: 1-64; =0: never), n >= 2048, a head_dim
    that is a multiple of 32, a CUDA device under PDL. Shape, dtype and device kind only."""
    forced = envs.qkv_rope_gemv()
    if forced is False or not (0 < rows <= MAX_ROWS and n >= ROW_PARALLEL_MIN_N and dtype in SUPPORTED_DTYPES
                               and head_dim % 32 == 0):
        return False
    return device.type == "cuda" and use_pdl(device) and (forced or rows >= QKV_ROPE_MIN_ROWS)


def qkv_rope_gemv(
    x: torch.Tensor,  # [M, hidden]
    weight: torch.Tensor,  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]: [ q | k | v ]
    bias: torch.Tensor | None,
    positions: torch.Tensor,  # [M] int64 / int32
    cos_cache: torch.Tensor,  # [max_position, head_dim / 2] float32
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [M] int64 / int32; < 0: a padding token, nothing stored
    num_heads: int,
    num_kv_heads: int,
    config: Config | None = None,
) -> torch.Tensor:
    """An attention layer's merged qkv projection with RoPE and the K/V cache write in its epilogue:
    returns the rotated q [M, num_heads, head_dim]; k (rotated) and v go straight to their cache slots.
    What F.linear then kernels/rotary.py's apply_rotary_and_write_kv compute, rounded alike, in one
    launch and with no [M, qkv] intermediate. Each program computes the same BLOCK_N features of both
    halves of one head (the rotation's pairs), as the gated launch computes gate and up:

        program of head h, features d..d+BLOCK_N:  K loop ──► x1 = y[:, h, d:], x2 = y[:, h, D/2 + d:]
            query head: rotate, store q        key head: rotate, store at the slots        value: store"""
    head_dim = 2 * cos_cache.shape[1]
    if weight.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 32:
        raise ValueError(f"weight {tuple(weight.shape)} is not [({num_heads} + 2 * {num_kv_heads}) * {head_dim}, K] "
                         f"with a head_dim that is a multiple of 32")
    check_kv_cache(k_cache, v_cache)
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim) or k_cache.dtype != x.dtype:
        raise ValueError(f"the caches {tuple(k_cache.shape)} {k_cache.dtype} must hold {num_kv_heads} KV heads of "
                         f"{head_dim} in {x.dtype}")
    check_slot_rows(k_cache)
    if cos_cache.dtype != torch.float32 or sin_cache.shape != cos_cache.shape or cos_cache.stride(1) != 1 \
            or sin_cache.stride() != cos_cache.stride():
        raise ValueError("cos_cache and sin_cache must be alike float32 [max_position, head_dim / 2], rows contiguous")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        check_int_dtype(name, t, (torch.int64, torch.int32))
        if t.shape != (x.shape[0],) or t.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [{x.shape[0]}], got {tuple(t.shape)}")
    check_same_device(x.device, positions=positions, cos_cache=cos_cache, sin_cache=sin_cache, k_cache=k_cache,
                      slot_mapping=slot_mapping)
    rope = Rope(positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    config, block_m = (config, None) if config is not None else qkv_rope_config(x.shape[0], weight.shape[0], head_dim,
                                                                                 x.dtype, x.device)
    q = _launch(x, weight, bias, config, 2, None, block_m, False, rope=rope)
    return q.view(x.shape[0], num_heads, head_dim)
