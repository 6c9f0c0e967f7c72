"""The worker's step timer: off unless asked, counts Triton compilations without swallowing a hook
someone else installed."""

import pytest
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


def test_step_profiler_writes_the_op_table_of_its_window(tiny_checkpoints, monkeypatch, tmp_path):
    """PAGEDSERVE_TORCH_PROFILER_DIR through the real engine: the worker profiles steps 2-4 and
    writes a table of where their time went (the model's matmuls among the ops) and the timeline."""
    import gzip
    import json

    from frontend import LLM, SamplingParams

    monkeypatch.setenv("PAGEDSERVE_TORCH_PROFILER_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDSERVE_TORCH_PROFILER_STEPS", "2,3")
    with LLM(tiny_checkpoints["llama"], max_model_len=64) as llm:
        llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    (report,) = tmp_path.glob("worker-0-*.txt")
    text = report.read_text()
    assert text.startswith("3 steps from step 2, rank 0")
    assert "aten::mm" in text or "aten::addmm" in text or "aten::linear" in text
    (trace,) = tmp_path.glob("worker-0-*.trace.json.gz")
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert names & {"aten::mm", "aten::addmm", "aten::linear"}


def test_step_profiler_settings_are_checked(monkeypatch):
    from ipc import envs

    monkeypatch.setenv("PAGEDSERVE_TORCH_PROFILER_STEPS", "10")
    with pytest.raises(ValueError, match="START,COUNT"):
        envs.torch_profiler_steps()
    monkeypatch.setenv("PAGEDSERVE_TORCH_PROFILER_STEPS", "5,0")
    with pytest.raises(ValueError, match="COUNT >= 1"):
        envs.torch_profiler_steps()
