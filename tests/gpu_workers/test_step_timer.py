"""The worker's step timer: off unless asked, counts Triton compilations without swallowing a hook
someone else installed."""

import torch

from gpu_workers.step_timer import StepTimer


def test_off_by_default_records_nothing(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_STEP_TIMING", raising=False)
    timer = StepTimer(torch.device("cpu"))
    timer.start_step()
    timer.mark("prepare")
    timer.end_step()
    assert timer.summary() == {}


def test_counts_triton_compiles_and_keeps_the_previous_hook(monkeypatch):
    import triton.knobs

    monkeypatch.setenv("PAGEDSERVE_STEP_TIMING", "1")
    seen = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(kw["repr"]))
    timer = StepTimer(torch.device("cpu"))
    timer._watch_compiles()
    hook = triton.knobs.runtime.jit_cache_hook
    hook(repr="_prefill_kernel[num_warps=4]", key=None)
    hook(repr="_rms_norm_kernel[num_warps=4]", key=None)
    assert timer.summary()["n_triton_compiles"] == 2
    assert seen == ["_prefill_kernel[num_warps=4]", "_rms_norm_kernel[num_warps=4]"]
