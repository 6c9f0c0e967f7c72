"""The worker process of one rank: receives every step plan, runs it, and (rank 0) returns the result.

Loop: 1. receive the next message (the scheduler drives); 2. dispatch it; 3. rank 0 sends each step's
sampled tokens back. Every rank runs the same plan so tensor-parallel ranks stay in step.

Overlap (CUDA): a step is launched without waiting for its tokens. While it runs, the worker polls for
the next plan: if it comes first, it is launched behind the running step (its decode inputs read the
running step's tokens on the device), and only then is the older step's result sent; if the running
step finishes first, its result is sent at once. The GPU so never waits for the CPU between steps
while the scheduler keeps a plan ahead.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback

import zmq

from ipc.config import EngineConfig
from ipc.messages import ExecuteStep, InitKVCache, Shutdown, ToWorker, WorkerFailed, WorkerReady
from ipc.process import freeze_start_up_objects, init_child, run_profiled
from ipc.sockets import IpcPaths, Receiver, Sender

logger = logging.getLogger(__name__)


class WorkerProc:
    def __init__(self, config: EngineConfig, rank: int) -> None:
        # torch imports after logging is set up
        from gpu_workers.distributed import destroy_distributed, init_distributed
        from gpu_workers.model_runner import ModelRunner

        paths = IpcPaths(config.ipc_root)
        self.rank = rank
        self.ctx = zmq.Context()
        self.inbox = Receiver(self.ctx, paths.worker(rank), ToWorker, bind=True)
        self.to_scheduler = Sender(self.ctx, paths.scheduler)
        init_distributed(config.parallel, rank, config.worker.device, config.ipc_root)  # tensor parallel
        self.leave_group = destroy_distributed
        self.runner = ModelRunner(config, rank)
        self.running = True
        self.handlers = {
            InitKVCache: self._on_init_kv_cache,
            ExecuteStep: self._on_execute_step,
            Shutdown: self._on_shutdown,
        }

    def run(self) -> None:
        self.to_scheduler.send(WorkerReady(self.rank, self.runner.profile_num_blocks()))
        while self.running:
            msg = self._next_message()
            handler = self.handlers.get(type(msg))
            if handler is None:
                logger.error("unexpected message %s", type(msg).__name__)
                continue
            handler(msg)

    def _next_message(self) -> ToWorker:
        """Block for the next message; while a launched step runs, poll instead and send its result
        as soon as its tokens are on the host."""
        while self.runner.in_flight is not None:
            msg = self.inbox.recv_nowait()
            if msg is not None:
                return msg
            if self.runner.in_flight_done():
                self._send(self.runner.finish_in_flight())
        return self.inbox.recv()

    def _send(self, results) -> None:
        if self.rank == 0:
            for result in results:
                self.to_scheduler.send(result)

    def _on_init_kv_cache(self, msg: InitKVCache) -> None:
        self.runner.init_kv_cache(msg.num_blocks)
        self.runner.warm_up_kernels()
        self.runner.capture_cuda_graphs()
        freeze_start_up_objects()

    def _on_execute_step(self, msg: ExecuteStep) -> None:
        self._send(self.runner.launch(msg))

    def _on_shutdown(self, msg: Shutdown) -> None:
        self.runner.finish_in_flight()
        self.running = False
        self.runner.timer.dump()
        self.runner.profiler.stop()
        self.leave_group()


def run_worker(config_json: str, rank: int) -> None:
    """Entry of a worker process (python -m gpu_workers CONFIG_JSON RANK)."""
    init_child(f"ps-worker-{rank}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = EngineConfig.decode(config_json.encode())
    proc = None
    try:
        proc = WorkerProc(config, rank)
        run_profiled(f"worker-{rank}", proc.run)
    except Exception as e:
        logger.exception("worker rank %d failed", rank)
        _report_failure(config, rank, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        sys.exit(1)


def _report_failure(config: EngineConfig, rank: int, message: str) -> None:
    ctx = zmq.Context()
    sender = Sender(ctx, IpcPaths(config.ipc_root).scheduler)
    sender.send(WorkerFailed(rank, message))
    sender.sock.close(linger=1000)
    ctx.term()
