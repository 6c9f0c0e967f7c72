"""Per-step timing of a worker, on when $PAGEDSERVE_STEP_TIMING is set (it synchronizes the device at
each phase boundary, so it is for diagnosis, not production).

Phases: `idle` (from sending a step's result to receiving the next plan: scheduler + IPC time, when
the GPU has nothing to do), `prepare` (state diff and input tensors), `forward` (split into graph
replays and eager runs), `sample` (logits, sampler, copy of tokens to the host). The summary is
logged every `every` steps and written to $PAGEDSERVE_STEP_TIMING (a path) at exit if it names a file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

logger = logging.getLogger(__name__)


class StepTimer:
    def __init__(self, device_sync, every: int = 200) -> None:
        self.enabled = bool(os.environ.get("PAGEDSERVE_STEP_TIMING"))
        self.sync = device_sync
        self.every = every
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.last = 0.0
        self.steps = 0

    def start_step(self) -> None:
        if self.enabled:
            now = time.perf_counter()
            if self.last:
                self._add("idle", now - self.last)
            self.last = now

    def mark(self, phase: str) -> None:
        """Close the phase that ends now (device work included)."""
        if self.enabled:
            self.sync()
            now = time.perf_counter()
            self._add(phase, now - self.last)
            self.last = now

    def end_step(self) -> None:
        if self.enabled:
            self.last = time.perf_counter()
            self.steps += 1
            if self.steps % self.every == 0:
                logger.warning("step timing (ms/step): %s", self.summary())

    def _add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        self.counts[phase] += 1

    def summary(self) -> dict[str, float]:
        return {k: round(v / max(self.counts[k], 1) * 1e3, 4) for k, v in self.totals.items()} | {
            f"n_{k}": self.counts[k] for k in self.totals}

    def dump(self) -> None:
        path = os.environ.get("PAGEDSERVE_STEP_TIMING", "")
        if self.enabled and path not in ("", "1"):
            with open(path, "w") as f:
                json.dump(self.summary(), f)
