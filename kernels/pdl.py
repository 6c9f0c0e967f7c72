"""Programmatic dependent launch (PDL; Hopper, sm_90, and later) for the decode path's small kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still draining;
it waits (griddepcontrol.wait) before its first load, so it never reads what that kernel has not yet
written, and a boundary costs less than a whole launch gap. Each of our kernels that takes USE_PDL then
releases its own dependents at once (griddepcontrol.launch_dependents): the next PDL kernel is queued
early and waits for this one to finish in the same way.

    GEMM ──► rms_norm ──► GEMM ──► rotary+KV ──► decode attention ──► GEMM ...
             (waits)               (waits)       (queued early by rotary, waits)

A batch-1 decode step of Llama-8B runs ~160 of these boundaries (5 a layer). Off by default until a
GPU run shows the gain: $PAGEDSERVE_PDL=1 turns it on (CUDA, sm_90+; never under the interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ipc import envs


@functools.lru_cache(maxsize=None)
def use_pdl(device: torch.device) -> bool:
    """Launch with PDL on this device: asked for ($PAGEDSERVE_PDL=1), CUDA sm_90+, not interpreted.
    Decided once per device (eager steps call the wrappers ~5 times a layer)."""
    return (device.type == "cuda" and envs.pdl() and not envs.triton_interpret()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the previous kernel, then let the next one queue."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
