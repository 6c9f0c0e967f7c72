"""RMSNorm with the residual add fused in: one program per token row.

    x, residual [num_tokens, hidden]  ──►  h = x + residual          (rounded to x's dtype: the new residual)
                                           out = weight * (h / sqrt(mean(h²) + eps)).to(dtype)

The statistics are float32 whatever the dtype. The normalized row is rounded to the input dtype
before the weight multiplies it, as gpu_workers.models.layers.RMSNorm (and HF Llama) do, so fp16/bf16
outputs round the same way as the torch path. Decode-sized batches are launch-bound: fusing the add,
the square-mean, the rsqrt, two casts and the scale into one launch is the whole point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import SUPPORTED_DTYPES, check_last_dim_contiguous, check_same_device, next_pow2
from kernels.pdl import pdl_prologue, use_pdl

MAX_HIDDEN = 65536  # one row per program: the whole row lives in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,  # row strides (last dims contiguous)
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(dtype)  # the sum the torch path would hold in x's dtype
        tl.store(residual_out_ptr + row * stride_ro + cols, h, mask=mask)
        x = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)  # round before scaling, like the reference
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(dtype), mask=mask)


def _num_warps(block: int) -> int:
    # ~8 elements (16 bytes of bf16) per thread: one vector load per operand, and the row's sum is
    # one warp-shuffle tree plus a small shared-memory step.
    return min(max(block // 256, 1), 16)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], x's dtype
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (of x + residual when given). Returns `out` [num_tokens, hidden], or
    `(out, new_residual)` where new_residual = x + residual; both are new contiguous tensors in x's
    dtype (inputs are never written: a residual may alias a CUDA graph's static buffer).

    Rows may be strided (e.g. a view into a wider buffer); the last dim must be contiguous."""
    check_last_dim_contiguous("x", x, 2)
    num_tokens, hidden = x.shape
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    if weight.dim() != 1 or weight.shape[0] != hidden or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{hidden}], got shape {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} > {MAX_HIDDEN} is not supported")
    if residual is not None:
        check_last_dim_contiguous("residual", residual, 2)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype}, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
        check_same_device(x.device, weight=weight, residual=residual)
    else:
        check_same_device(x.device, weight=weight)

    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else None
    if num_tokens > 0:
        block = next_pow2(hidden)
        pdl = use_pdl(x.device)
        res_in = residual if residual is not None else x  # unused when HAS_RESIDUAL is off
        res_out = new_residual if new_residual is not None else out
        _rms_norm_kernel[(num_tokens,)](
            x, res_in, weight, out, res_out,
            x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
            USE_PDL=pdl, launch_pdl=pdl,
        )
    return out if new_residual is None else (out, new_residual)
