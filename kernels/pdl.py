"""Programmatic dependent launch (PDL; Hopper, sm_90, and later) for the decode path's small kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still draining;
it waits (griddepcontrol.wait) before its first load, so it never reads what that kernel has not yet
written, and a boundary costs less than a whole launch gap. Each of our kernels that takes USE_PDL then
releases its own dependents at once (griddepcontrol.launch_dependents): the next PDL kernel is queued
early and waits for this one to finish in the same way.

    GEMM ──► rms_norm ──► GEMM ──► rotary+KV ──► decode attention ──► GEMM ...
             (waits)               (waits)       (queued early by rotary, waits)

A batch-1 decode step of Llama-8B runs ~160 of these boundaries (5 a layer). On an H200 this took
Llama-8B batch 1 from 4.80 to 4.74 ms a token and Qwen3-0.6B from 1.47 to 1.44 (BENCHMARKS.md). On by
default on NVIDIA sm_90+ (never under the interpreter, nor on ROCm); $PAGEDSERVE_PDL=0 turns it off.
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
    """Launch with PDL on this device: not turned off ($PAGEDSERVE_PDL=0), NVIDIA sm_90+ (ROCm reports
    its own capability numbers), not interpreted. Decided once per device (eager steps call the
    wrappers ~5 times a layer)."""
    return (device.type == "cuda" and torch.version.hip is None and envs.pdl() and not envs.triton_interpret()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the previous kernel, then let the next one queue."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
