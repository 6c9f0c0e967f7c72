"""EngineCoreClient: the caller's side of the engine. Starts the scheduler process (which starts
the workers), sends requests, and receives their deltas; any child's death raises EngineDeadError."""

from __future__ import annotations

import logging
import time

import zmq

from ipc.config import EngineConfig
from ipc.errors import EngineDeadError
from ipc.messages import (AbortRequests, AddRequest, EngineDead, EngineReady, RequestDelta,
                          RequestFailed, RequestOutputs, SchedulerStats, Shutdown, ToFrontend)
from ipc.process import spawn, stop
from ipc.sockets import IpcPaths, Receiver, Sender
from ipc.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_POLL_MS = 100


def start_scheduler(config: EngineConfig):
    """Start the scheduler process, which starts one worker process per rank."""
    return spawn("scheduler_proc", [config.encode().decode()], "ps-scheduler")


class EngineCoreClient:
    def __init__(self, config: EngineConfig, start_timeout: float = 1800.0) -> None:
        self.config = config
        paths = IpcPaths(config.ipc_root)
        self.ctx = zmq.Context()
        self.inbox = Receiver(self.ctx, paths.frontend, ToFrontend, bind=True)
        self.to_scheduler = Sender(self.ctx, paths.scheduler)
        self.proc = start_scheduler(config)
        self.dead: str | None = None
        self.stats = SchedulerStats()  # the latest the scheduler reported
        self.ready = self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> EngineReady:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._recv(_POLL_MS)
            if isinstance(msg, EngineReady):
                return msg
        self.shutdown()
        raise EngineDeadError(f"the engine did not start within {timeout:.0f} s")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._check_alive()
        self.to_scheduler.send(AddRequest(request_id, prompt_token_ids, params, time.time()))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead is None:
            self.to_scheduler.send(AbortRequests(request_ids))

    def get_outputs(self, timeout_ms: int = _POLL_MS) -> tuple[list[RequestDelta], list[RequestFailed]]:
        """Deltas and failures that arrived (waits up to timeout_ms for the first)."""
        deltas, failures = [], []
        msg = self._recv(timeout_ms)
        while msg is not None:
            if isinstance(msg, RequestOutputs):
                deltas.extend(msg.outputs)
                self.stats = msg.stats or self.stats
            elif isinstance(msg, RequestFailed):
                failures.append(msg)
            msg = self._recv(0)
        return deltas, failures

    def _recv(self, timeout_ms: int):
        msg = self.inbox.recv(timeout_ms)
        if isinstance(msg, EngineDead):
            self._die(f"engine failed: {msg.message}")
        if msg is None:
            self._check_alive()
        return msg

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.proc.poll() is not None:
            self._die(f"the scheduler process exited with code {self.proc.returncode}")

    def _die(self, message: str) -> None:
        self.dead = message
        self.shutdown()
        raise EngineDeadError(message)

    def shutdown(self) -> None:
        if self.ctx.closed:
            return
        if self.proc.poll() is None:
            try:
                self.to_scheduler.send(Shutdown())  # the scheduler stops its workers itself
            except zmq.ZMQError:
                pass
        stop([self.proc], timeout=10.0, grace=10.0)
        self.ctx.destroy(linger=0)
        IpcPaths(self.config.ipc_root).cleanup()
