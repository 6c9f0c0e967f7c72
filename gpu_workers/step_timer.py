"""Per-step timing of a worker, on when $PAGEDSERVE_STEP_TIMING is set (for diagnosis: it records
events, but never synchronizes, so overlapped steps stay overlapped).

CPU phases, wall time on the worker's thread: `idle` (waiting for the next plan: scheduler + IPC),
`prepare` (state diff and input tensors), `launch` (forward and sampling enqueued: graph replay or
eager kernels), `wait` (blocked until the GPU has the step's tokens), `finish` (tokens appended, result
built). GPU, from CUDA events: `gpu_step` (first forward kernel to tokens ready) and `gpu_gap` (the GPU
with nothing queued between two steps: the time it waits on the CPU; near 0 when overlapped; gaps
over 50 ms are the engine idle between requests and are left out). Counters, on CUDA: Triton kernels
compiled after the first step (`n_triton_compiles`, each also logged: a compile inside a timed run
costs about a second), and the caching allocator's device mallocs / frees and alloc retries since the
first step (`n_cuda_malloc`, `n_cuda_free`, `n_alloc_retries`: a retry frees cached blocks, which
synchronizes the device and stalls the overlap).
The summary is logged every `every` steps and written to $PAGEDSERVE_STEP_TIMING (a path) at exit if
it names a file: by rank 0 to that path, by rank r > 0 to `<path>.rank<r>` (ranks exit together, and one
file per rank keeps their writes apart).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict, deque

import torch

logger = logging.getLogger(__name__)
_ENGINE_IDLE_S = 0.05


class StepTimer:
    def __init__(self, device: torch.device, rank: int = 0, every: int = 200) -> None:
        self.rank = rank
        self.enabled = bool(os.environ.get("PAGEDSERVE_STEP_TIMING"))
        self.cuda = device.type == "cuda"
        self.every = every
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.last = 0.0
        self.steps = 0
        self.events: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # (start, end) not yet read
        self.prev_end: torch.cuda.Event | None = None
        self.alloc_base: dict[str, int] | None = None  # allocator counters at the first step

    def _watch_compiles(self) -> None:
        """Count (and log) Triton compilations from now on, through triton's jit_cache_hook."""
        import triton.knobs

        previous = triton.knobs.runtime.jit_cache_hook

        def hook(*args, **kwargs):
            self.counts["triton_compiles"] += 1
            logger.warning("step timing: Triton compiles %s during step %d", kwargs.get("repr", "?"), self.steps)
            return previous(*args, **kwargs) if previous else None

        triton.knobs.runtime.jit_cache_hook = hook

    def _alloc_counters(self) -> dict[str, int]:
        stats = torch.cuda.memory_stats()
        return {"cuda_malloc": stats.get("num_device_alloc", 0), "cuda_free": stats.get("num_device_free", 0),
                "alloc_retries": stats.get("num_alloc_retries", 0)}

    def start_step(self) -> None:
        if self.enabled:
            if self.cuda and self.alloc_base is None:  # the first step: start-up work is done
                self.alloc_base = self._alloc_counters()
                self._watch_compiles()
            now = time.perf_counter()
            if self.last:
                self._add("idle", now - self.last)
            self.last = now

    def mark(self, phase: str) -> None:
        """Close the CPU phase that ends now."""
        if self.enabled:
            now = time.perf_counter()
            self._add(phase, now - self.last)
            self.last = now

    def count(self, name: str) -> None:
        """Count an event (reported as n_NAME): `overlapped`, steps launched behind a running one."""
        if self.enabled:
            self.counts[name] += 1

    def gpu_start(self) -> torch.cuda.Event | None:
        """Record where the step's GPU work starts (right after its inputs are enqueued)."""
        if not (self.enabled and self.cuda):
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def gpu_end(self, start: torch.cuda.Event | None) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))

    def end_step(self) -> None:
        """After a step's tokens reached the host: read the events that are done."""
        if not self.enabled:
            return
        while self.events and self.events[0][1].query():
            start, end = self.events.popleft()
            self._add("gpu_step", start.elapsed_time(end) / 1e3)
            gap = self.prev_end.elapsed_time(start) / 1e3 if self.prev_end is not None else None
            if gap is not None and gap < _ENGINE_IDLE_S:
                self._add("gpu_gap", max(gap, 0.0))
            self.prev_end = end
        self.last = time.perf_counter()
        self.steps += 1
        if self.steps % self.every == 0:
            logger.warning("step timing (ms/step): %s", self.summary())

    def _add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        self.counts[phase] += 1

    def summary(self) -> dict[str, float]:
        out = {k: round(v / max(self.counts[k], 1) * 1e3, 4) for k, v in self.totals.items()} | {
            f"n_{k}": n for k, n in self.counts.items()}
        if self.alloc_base is not None:
            out |= {f"n_{k}": v - self.alloc_base[k] for k, v in self._alloc_counters().items()}
        return out

    def dump(self) -> None:
        path = os.environ.get("PAGEDSERVE_STEP_TIMING", "")
        if self.enabled and path not in ("", "1"):
            with open(path if self.rank == 0 else f"{path}.rank{self.rank}", "w") as f:
                json.dump(self.summary(), f)
