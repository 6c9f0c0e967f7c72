"""Kernel-level profile of a window of worker steps, on when $PAGEDSERVE_TORCH_PROFILER_DIR is set
(vLLM's VLLM_TORCH_PROFILER_DIR, in spirit): torch.profiler records steps [start, start + count) of
$PAGEDSERVE_TORCH_PROFILER_STEPS ("start,count", default "100,50"); at the window's end the device
time per kernel (and CPU time per op) is logged and written to <dir>/worker-<rank>-<pid>.txt, and the
timeline to <dir>/worker-<rank>-<pid>.trace.json.gz (chrome://tracing, Perfetto). It says
where a step's GPU time goes (GEMMs, attention, elementwise kernels, collectives) and, with the step
timer, whether the CPU keeps up."""

from __future__ import annotations

import logging
import os

import torch

from ipc import envs

logger = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, device: torch.device, rank: int, rows: int = 40) -> None:
        self.dir = envs.torch_profiler_dir()
        self.start, self.count = envs.torch_profiler_steps()
        self.device = device
        self.rank = rank
        self.rows = rows
        self.steps = 0
        self.profile: torch.profiler.profile | None = None

    def step(self) -> None:
        """Call once per step, before it is launched."""
        if self.dir is None:
            return
        if self.steps == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
        elif self.steps == self.start + self.count:
            self.stop()
        self.steps += 1

    def stop(self) -> None:
        """End the window now (also at shutdown, if it is still open) and report it."""
        if self.profile is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        profile, self.profile = self.profile, None
        profile.__exit__(None, None, None)
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=self.rows, max_name_column_width=80)
        steps = self.steps - self.start
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"worker-{self.rank}-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(f"{steps} steps from step {self.start}, rank {self.rank}, {self.device}\n{table}\n")
        profile.export_chrome_trace(path.removesuffix(".txt") + ".trace.json.gz")
        logger.warning("profile of %d steps from step %d (rank %d), also in %s:\n%s", steps, self.start,
                       self.rank, path, table)
