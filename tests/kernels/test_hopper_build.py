"""Every Triton kernel builds for sm_90 (H100/H200), with programmatic dependent launch on, without a GPU.

The interpreter runs kernels as numpy and type-checks nothing the way the compiler does, and kernels/pdl.py's
branch never runs there at all. So each wrapper is called here once under the interpreter with small inputs
while its launch is recorded; the recorded arguments give the kernel's signature, and a process without
TRITON_INTERPRET compiles it ahead of time for sm_90 (triton's own ptxas, no device needed) with
USE_PDL=True, and reports registers and spills."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction

import kernels
from kernels.activation import silu_and_mul
from kernels.kv_cache import write_kv_cache
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary, apply_rotary_and_write_kv
from tests.triton_env import INTERPRET, paged_cache

pytestmark = pytest.mark.skipif(not INTERPRET, reason="records launches under the interpreter (CPU runs)")

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64"}

NAMES = ["rms_norm+residual", "silu_and_mul", "rotary+qk_norm", "rotary+kv_write", "write_kv_cache",
         "decode_attention", "decode_attention+splits", "decode_attention+8b", "decode_attention+prefetch",
         "decode_attention+rope", "decode_attention+rope_norm", "decode_attention+8b_rope",
         "prefill_attention", "sampling",
         "gemv", "gemv+bias", "gemv+splitk", "gemv+64rows", "gemv+row_parallel", "gemv+row_parallel_fp32",
         "gemv+row_parallel_split", "gemv+gated", "gemv+gated_fp32", "gemv+qkv_rope", "gemv+qkv_rope_16", "gemv+qkv_rope_fp32", "gemv+reduce", "gemv+reduce_fp32", "all_reduce_rms_norm", "all_reduce_rms_norm+slot", "all_reduce_rms_norm+pushed",
         "all_reduce_rms_norm+prefetch", "all_reduce_rms_norm+lamport", "all_reduce_rms_norm+lamport_fp32",
         "all_reduce_rms_norm+embedding"]

_COMPILE = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
results = []
for job in json.load(sys.stdin):
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    tl_dtype = lambda v: getattr(triton.language, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
    source = ASTSource(fn, job["signature"], {k: tl_dtype(v) for k, v in job["constants"].items()},
                       {(i,): attr for i, attr in job["attrs"]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=job["options"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    ptx = compiled.asm["ptx"]
    results.append({"name": job["name"], "report": report, "pdl": "griddepcontrol.wait" in ptx,
                    "ptx_head": ptx[:ptx.find("griddepcontrol.wait")],
                    "ptx": ptx if job["name"].startswith(("all_reduce_rms_norm", "gemv+reduce")) else "",
                    "prefetches": ptx.count("prefetch.global.L2"), "shared": compiled.metadata.shared})
print(json.dumps(results))
"""


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value)}")


def record(monkeypatch, module, kernel_name: str, jobs: list, name: str):
    """Replace module.kernel_name so its next launches are recorded as compile jobs (and still run)."""
    kernel = getattr(module, kernel_name)
    kernel = getattr(kernel, "kernel", kernel)  # recorded before: the original
    params = list(inspect.signature(kernel.fn).parameters.values())
    # the interpreter's function has no parameter specs: rebuild them as @triton.jit would
    jit_params = JITFunction(kernel.fn, **{k: v for k, v in getattr(kernel, "kwargs", {}).items()
                                           if k.startswith("do_not_specialize")}).params

    class Recorder:
        kernel = None

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
                values = defaults | dict(zip([p.name for p in params], args)) | kwargs
                signature, constants, attrs = {}, {}, []
                for i, p in enumerate(jit_params):
                    value = values[p.name]
                    if p.is_constexpr:  # a Triton dtype travels as "tl.<name>" (JSON)
                        is_dtype = isinstance(value, triton.language.dtype)
                        signature[p.name], constants[p.name] = "constexpr", f"tl.{value}" if is_dtype else value
                        continue
                    # as the launcher specializes: 16-aligned pointers and ints divisible by 16 get
                    # tt.divisibility (vector loads), an int equal to 1 becomes a constant
                    ty, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                                     not p.do_not_specialize_on_alignment)
                    if ty == "constexpr":
                        signature[p.name], constants[p.name] = "constexpr", key
                    else:
                        signature[p.name] = _type(value) if isinstance(value, torch.Tensor) else ty
                        if isinstance(key, str) and key:
                            attrs.append([i, BaseBackend.parse_attr(key)])
                if "USE_PDL" in constants:
                    constants["USE_PDL"] = True
                options = {k: values[k] for k in ("num_warps", "num_stages") if k in values}
                options["launch_pdl"] = "USE_PDL" in constants
                jobs.append({"name": name, "module": module.__name__, "kernel": kernel_name,
                             "signature": signature, "constants": constants, "attrs": attrs,
                             "options": options})
                return kernel[grid](*args, **kwargs)
            return launch

    recorder = Recorder()
    recorder.kernel = kernel
    monkeypatch.setattr(module, kernel_name, recorder)


def test_every_kernel_builds_for_hopper_with_pdl(monkeypatch):
    act_mod, kv_mod, rms_mod, rot_mod = (importlib.import_module(f"kernels.{name}")  # the package's
                                         for name in ("activation", "kv_cache", "rms_norm", "rotary"))  # names are functions
    decode_mod, prefill_mod, sampling_mod, gemv_mod, fused_mod, rope_mod = (
        importlib.import_module(f"kernels.{name}")
        for name in ("decode_attention", "prefill_attention", "sampling", "gemv", "all_reduce_rms_norm", "qkv_rope"))
    jobs: list[dict] = []
    dt = torch.bfloat16
    x = torch.randn(3, 64, dtype=dt)
    record(monkeypatch, rms_mod, "_rms_norm_kernel", jobs, "rms_norm+residual")
    rms_norm(x, torch.ones(64, dtype=dt), 1e-6, torch.randn_like(x))
    record(monkeypatch, act_mod, "_silu_and_mul_kernel", jobs, "silu_and_mul")
    silu_and_mul(torch.randn(3, 128, dtype=dt))

    q, k, v = torch.randn(3, 4, 32, dtype=dt), torch.randn(3, 2, 32, dtype=dt), torch.randn(3, 2, 32, dtype=dt)
    cos, sin = torch.randn(64, 16), torch.randn(64, 16)
    positions = torch.tensor([0, 5, 9])
    k_cache, v_cache, block_tables, _ = paged_cache([40, 150, 9], 16, 2, 32, dt)
    record(monkeypatch, rot_mod, "_rotary_kernel", jobs, "rotary+qk_norm")
    apply_rotary(q, k, positions, cos, sin, torch.ones(32, dtype=dt), torch.ones(32, dtype=dt), 1e-6)
    record(monkeypatch, rot_mod, "_rotary_kernel", jobs, "rotary+kv_write")
    apply_rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, torch.tensor([3, 17, -1]))
    record(monkeypatch, kv_mod, "_write_kv_cache_kernel", jobs, "write_kv_cache")
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([3, 17, -1]))

    seq_lens = torch.tensor([40, 150, 9], dtype=torch.int32)
    for name, splits in (("decode_attention", 1), ("decode_attention+splits", 2)):
        record(monkeypatch, decode_mod, "_decode_split_kernel", jobs, name)
        decode_mod.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 150, 0.2, num_splits=splits)
    # the decode step's RoPE (and Qwen3's q/k norm) and K/V write inside the attention launch
    for name, w in (("decode_attention+rope", None), ("decode_attention+rope_norm", torch.ones(32, dtype=dt))):
        record(monkeypatch, decode_mod, "_decode_split_kernel", jobs, name)
        decode_mod.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 150, 0.2, num_splits=2,
                                    rope=decode_mod.NewTokens(k, v, positions, cos, sin, torch.tensor([3, 17, -1]), w, w))
    # Llama-8B's shape (group of 4, head_dim 128) with 128-token tiles: K and V tiles both in flight
    record(monkeypatch, decode_mod, "_decode_split_kernel", jobs, "decode_attention+8b")
    k8, v8, bt8, _ = paged_cache([300], 16, 8, 128, dt)
    decode_mod.decode_attention(torch.randn(1, 32, 128, dtype=dt), k8, v8, bt8, torch.tensor([300], dtype=torch.int32),
                                4096, 0.1, launch_config=(128, 4, 2))
    record(monkeypatch, decode_mod, "_decode_split_kernel", jobs, "decode_attention+8b_rope")  # ... with the RoPE
    decode_mod.decode_attention(torch.randn(1, 32, 128, dtype=dt), k8, v8, bt8, torch.tensor([300], dtype=torch.int32),
                                4096, 0.1, launch_config=(128, 4, 2),
                                rope=decode_mod.NewTokens(torch.randn(1, 8, 128, dtype=dt), torch.randn(1, 8, 128, dtype=dt),
                                                          torch.tensor([299]), torch.randn(300, 64), torch.randn(300, 64),
                                                          torch.tensor([-1])))
    # ... and as a decode step runs it, prefetching o_proj's weight (on only where PDL is: forced here)
    record(monkeypatch, decode_mod, "_decode_split_kernel", jobs, "decode_attention+prefetch")
    decode_mod.decode_attention(torch.randn(1, 32, 128, dtype=dt), k8, v8, bt8, torch.tensor([300], dtype=torch.int32),
                                4096, 0.1, prefetch_weight=torch.randn(64, 256, dtype=dt))
    jobs[-1]["constants"]["PREFETCH"] = True
    record(monkeypatch, prefill_mod, "_prefill_kernel", jobs, "prefill_attention")
    query_start_loc = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    prefill_mod.prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, 1, 0.2)

    record(monkeypatch, sampling_mod, "_sample_kernel", jobs, "sampling")
    ones = torch.ones(2)
    sampling_mod.sample(torch.randn(2, 300, dtype=dt), ones, torch.full((2,), 5, dtype=torch.int32), ones * 0.9,
                        ones * 0.01, torch.zeros(2, dtype=torch.int64))

    for name, bias in (("gemv", None), ("gemv+bias", torch.randn(4096, dtype=dt))):  # Llama-8B's o_proj shape
        record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, name)
        gemv_mod.gemv(torch.randn(1, 64, dtype=dt), torch.randn(4096, 64, dtype=dt), bias)
    record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, "gemv+splitk")
    gemv_mod.gemv(torch.randn(1, 512, dtype=dt), torch.randn(64, 512, dtype=dt), None, (16, 256, 4, 4, 2))
    # a batch-64 decode step's tile, with the largest of the autotuned configs (64-wide, 4 stages)
    record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, "gemv+64rows")
    gemv_mod.gemv(torch.randn(64, 256, dtype=dt), torch.randn(128, 256, dtype=dt), None, (64, 128, 4, 4))

    # a decode step's gated MLP (gate_up + SiLU-and-mul, gated_config) at 64 rows: two weight tiles a stage
    for name, gdt in (("gemv+gated", dt), ("gemv+gated_fp32", torch.float32)):
        record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, name)
        gemv_mod.gated_gemv(torch.randn(64, 256, dtype=gdt), torch.randn(128, 256, dtype=gdt))

    # qkv with RoPE and the K/V write in the epilogue (qkv_rope_config) at 64 rows: Llama-8B TP=1's 2 x 32-column
    # pairs, a TP=2 rank's 2 x 16, float32's; head_dim 128 (4 q heads, 2 KV heads), 16-token blocks
    for name, n_heads, rdt in (("gemv+qkv_rope", 48, dt), ("gemv+qkv_rope_16", 24, dt), ("gemv+qkv_rope_fp32", 48,
                                                                                          torch.float32)):
        nh, nkv = n_heads * 2 // 3, n_heads // 6
        record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, name)
        cache = torch.zeros(8, 16, nkv, 128, dtype=rdt)
        rope_mod.qkv_rope_gemv(torch.randn(64, 256, dtype=rdt), torch.randn(n_heads * 128, 256, dtype=rdt), None,
                               torch.arange(64), torch.randn(128, 64), torch.randn(128, 64), cache, cache.clone(),
                               torch.arange(64), nh, nkv,
                               config=rope_mod.qkv_rope_config(64, n_heads * 128, 128, rdt, torch.device("cpu"))[0])

    # Run as one rank (the interpreter has no peer), built as rank 0 of 2 at Llama-8B's hidden size.
    buffer = torch.zeros(fused_mod.buffer_bytes(1 << 16, 1), dtype=torch.uint8)
    peers = fused_mod.PeerBuffers(torch.tensor([buffer.data_ptr()]), 0, 1, 1 << 16)
    lamport = peers._replace(lamport=True, bases=(buffer.data_ptr(),))
    # the row-parallel launches of a decode step (row_parallel_config), pushing into the peers' slot
    for name, rows, rdt in (("gemv+row_parallel", 4, dt), ("gemv+row_parallel_fp32", 4, torch.float32),
                            ("gemv+row_parallel_split", 2, dt)):
        fused_mod.init_lamport(buffer, 1 << 16, 1)
        record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, name)
        config, block_m = gemv_mod.row_parallel_config({"gemv+row_parallel_split": 20}.get(name, 64), rdt)
        gemv_mod.gemv(torch.randn(rows, 256, dtype=rdt), torch.randn(4096, 256, dtype=rdt), None, config,
                      push=(lamport, 0), block_m=block_m)
        jobs[-1]["constants"]["WORLD"] = 2
    # o_proj / down_proj reducing their own rows (reduce_gemv, reduce_config) at 64 rows: push, poll, add
    for name, rdt in (("gemv+reduce", dt), ("gemv+reduce_fp32", torch.float32)):
        fused_mod.init_lamport(buffer, 1 << 16, 1)
        record(monkeypatch, gemv_mod, "_gemv_kernel", jobs, name)
        gemv_mod.reduce_gemv(torch.randn(64, 256, dtype=rdt), torch.randn(64, 256, dtype=rdt), lamport, 0,
                             torch.randn(64, 64, dtype=rdt))
        jobs[-1]["constants"]["WORLD"] = 2
    for name, slot in (("all_reduce_rms_norm", None), ("all_reduce_rms_norm+slot", 0)):
        record(monkeypatch, fused_mod, "_all_reduce_add_rms_norm_kernel", jobs, name)
        fused_mod.all_reduce_add_rms_norm(torch.randn(2, 4096, dtype=dt), torch.randn(2, 4096, dtype=dt),
                                          torch.ones(4096, dtype=dt), 1e-6, peers, slot)
        jobs[-1]["constants"]["WORLD"] = 2
    record(monkeypatch, fused_mod, "_all_reduce_add_rms_norm_kernel", jobs, "all_reduce_rms_norm+prefetch")
    fused_mod.all_reduce_add_rms_norm(torch.randn(2, 4096, dtype=dt), torch.randn(2, 4096, dtype=dt),
                                      torch.ones(4096, dtype=dt), 1e-6, peers, 0, torch.randn(64, 256, dtype=dt))
    jobs[-1]["constants"].update(WORLD=2, PREFETCH=True)
    fused_mod.init_lamport(buffer, 1 << 16, 1)
    record(monkeypatch, fused_mod, "_lamport_kernel", jobs, "all_reduce_rms_norm+pushed")  # polls only
    fused_mod.all_reduce_add_rms_norm(torch.randn(2, 4096, dtype=dt), torch.randn(2, 4096, dtype=dt),
                                      torch.ones(4096, dtype=dt), 1e-6, lamport, 0, pushed=True)
    jobs[-1]["constants"].update(WORLD=2)
    for name, ldt in (("all_reduce_rms_norm+lamport", dt), ("all_reduce_rms_norm+lamport_fp32", torch.float32)):
        fused_mod.init_lamport(buffer, 1 << 16, 1)
        record(monkeypatch, fused_mod, "_lamport_kernel", jobs, name)
        fused_mod.all_reduce_add_rms_norm(torch.randn(2, 4096, dtype=ldt), torch.randn(2, 4096, dtype=ldt),
                                          torch.ones(4096, dtype=ldt), 1e-6, lamport, None, torch.randn(64, 256, dtype=ldt))
        jobs[-1]["constants"].update(WORLD=2, PREFETCH=True)
    # the embedding's lookup + all-reduce + norm, as a forward pass starts (one id past the table's slice)
    fused_mod.init_lamport(buffer, 1 << 16, 1)
    record(monkeypatch, fused_mod, "_lamport_kernel", jobs, "all_reduce_rms_norm+embedding")
    fused_mod.embedding_all_reduce_rms_norm(torch.tensor([3, 70_000]), torch.randn(128, 4096, dtype=dt), 0,
                                            torch.ones(4096, dtype=dt), 1e-6, lamport, torch.randn(64, 256, dtype=dt))
    jobs[-1]["constants"].update(WORLD=2, PREFETCH=True)

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs), capture_output=True, text=True,
                         env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(kernels.__file__)))
    assert run.returncode == 0, run.stderr[-4000:]
    results = {r["name"]: r for r in json.loads(run.stdout)}
    assert sorted(results) == sorted(NAMES), sorted(results)
    with_pdl = {name for name, r in results.items() if r["pdl"]}
    assert with_pdl == set(NAMES) - {"write_kv_cache", "prefill_attention", "sampling"}  # the decode path's
    for name in ("gemv", "gemv+bias", "gemv+splitk", "gemv+64rows", "gemv+row_parallel", "gemv+gated",
                 "gemv+qkv_rope", "decode_attention+prefetch"):
        assert "prefetch.global.L2" in results[name]["ptx_head"], name  # the weight prefetch before the wait
    for name in ("gemv+reduce", "gemv+reduce_fp32"):  # the peer's tile polled with volatile loads, then emptied
        assert "ld.volatile.global" in results[name]["ptx"], name
    # the fused all-reduce prefetches between its signal and its wait; without a weight, nothing does
    ptx = results["all_reduce_rms_norm+prefetch"]["ptx"]
    signal, wait = ptx.find("atom.global.sys.release.exch.b64"), ptx.find("ld.global.sys.acquire.b64")
    assert signal < ptx.find("prefetch.global.L2") < wait, "the prefetch is not between the signal and the wait"
    assert results["all_reduce_rms_norm+slot"]["prefetches"] == results["decode_attention+8b"]["prefetches"] == 0
    # the fused all-reduce: one thread of each program signals (an exchange, release) and polls (an
    # acquire load), at system scope; its rows move in 16-byte vectors, pushes to peers included
    for name, barriers in (("all_reduce_rms_norm", 2), ("all_reduce_rms_norm+slot", 1)):
        ptx = results[name]["ptx"]
        assert ptx.count("atom.global.sys.release.exch.b64") == barriers, name
        assert ptx.count("ld.global.sys.acquire.b64") == 2 * barriers, name  # the first poll, and the loop's
        assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx, "rows are not vectorized"
        assert ptx.count("ld.global.cg.v4.b32") >= 1 and ptx.count("st.global.v4.b32") >= 3, name
    # the flag-free protocol: no flags, no fences; it polls the rows themselves with volatile loads (never
    # hoisted out of the poll loop), 16 bytes at a time, and pushes and empties rows in 16-byte stores
    for name in ("all_reduce_rms_norm+lamport", "all_reduce_rms_norm+lamport_fp32", "all_reduce_rms_norm+embedding",
                 "all_reduce_rms_norm+pushed"):
        ptx = results[name]["ptx"]
        assert "atom." not in ptx and ".acquire" not in ptx and ".release" not in ptx and "membar" not in ptx, name
        assert ptx.count("ld.volatile.global.v4.b32") >= 2, name  # the first poll, and the loop's
        assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx, "rows are not vectorized"
        assert ptx.count("st.global.v4.b32") >= (3 if name.endswith("pushed") else 4), name  # (push,) empty, residual, out
    # pushed: the matmul stored the rows into the peers' slot, so the all-reduce stores 3 rows, not 4
    assert results["all_reduce_rms_norm+pushed"]["ptx"].count("st.global.v4.b32") < \
        results["all_reduce_rms_norm+lamport"]["ptx"].count("st.global.v4.b32")
    for name, r in results.items():  # what Hopper gives a block (the float32 row-parallel tile once asked 240 KiB)
        assert r["shared"] <= 232448, (name, r["shared"])
    for name, report in ((name, r["report"]) for name, r in results.items()):
        assert "Used" in report, (name, report)
        assert "spill" not in report.replace(" 0 bytes spill", ""), (name, report)
