"""SiLU-and-mul: the gated MLP's activation in one launch.

    x [num_tokens, 2 * d] = [ gate (d) | up (d) ]   (the merged gate_up projection's layout)
    out [num_tokens, d]   = silu(gate) * up

grid = (num_tokens, cdiv(d, BLOCK)): a row is split into column tiles because d is large (14336 for
Llama-3.1-8B) and decode batches are small, so one program per row would leave most SMs idle.
silu runs in float32 and is rounded to x's dtype before the product, as torch's F.silu(gate) * up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import SUPPORTED_DTYPES, cdiv, check_last_dim_contiguous, check_same_device, next_pow2
from kernels.pdl import pdl_prologue, use_pdl

MAX_BLOCK = 1024  # columns per program


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, d,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * d]
    out: torch.Tensor | None = None,  # [num_tokens, d], x's dtype, last dim contiguous
) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:]. Rows of x may be strided; its last dim must be contiguous. Returns `out`."""
    check_last_dim_contiguous("x", x, 2)
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x's last dim {width} must be even ([gate | up])")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    d = width // 2
    if out is None:
        out = torch.empty((num_tokens, d), dtype=x.dtype, device=x.device)
    check_last_dim_contiguous("out", out, 2)
    if out.shape != (num_tokens, d) or out.dtype != x.dtype:
        raise ValueError(f"out must be {(num_tokens, d)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_same_device(x.device, out=out)
    if num_tokens == 0 or d == 0:
        return out
    block = min(next_pow2(d), MAX_BLOCK)
    pdl = use_pdl(x.device)
    _silu_and_mul_kernel[(num_tokens, cdiv(d, block))](
        x, out, x.stride(0), out.stride(0), d,
        BLOCK=block, num_warps=4 if block >= 512 else 1, USE_PDL=pdl, launch_pdl=pdl,
    )
    return out
