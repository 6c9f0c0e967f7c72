"""AsyncLLM: the engine inside an asyncio program (the HTTP server). It starts the scheduler process
(which starts the workers) and talks to it through an EngineClient with client_index 0; a watchdog
task turns the death of any child into EngineDeadError on every open stream."""

from __future__ import annotations

import asyncio
import logging

from frontend.engine_args import EngineArgs, load_tokenizer
from frontend.engine_client import start_scheduler
from ipc.client import EngineClient
from ipc.errors import EngineDeadError
from ipc.messages import Shutdown
from ipc.sockets import IpcPaths
from ipc.process import stop

logger = logging.getLogger(__name__)

_WATCH_S = 0.2


class AsyncLLM:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_path = args.resolve_model_path()
        self.tokenizer = load_tokenizer(args.tokenizer or self.model_path)
        self.config = args.create_engine_config(self.model_path, self.tokenizer)
        self.client = EngineClient(self.config.ipc_root, 0, self.tokenizer)
        self.proc = start_scheduler(self.config)
        self._watchdog: asyncio.Task | None = None

    async def start(self, timeout: float = 1800.0) -> None:
        start = asyncio.ensure_future(self.client.start(timeout))
        while not start.done():  # fail fast if the scheduler dies while starting
            await asyncio.wait([start], timeout=_WATCH_S)
            if not start.done() and self.proc.poll() is not None:
                start.cancel()
                raise EngineDeadError(f"the engine exited with code {self.proc.returncode} while starting")
        start.result()
        self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while self.proc.poll() is None and self.client.dead is None:
            await asyncio.sleep(_WATCH_S)
        self.client.fail_all(self.client.dead or f"the scheduler process exited with code {self.proc.returncode}")

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def is_healthy(self) -> bool:
        return self.client.dead is None and self.proc.poll() is None

    async def check_health(self) -> bool:
        """The scheduler answers and reports every worker alive and making progress."""
        return self.is_healthy and (await self.client.check_health()).ok

    def generate(self, *args, **kwargs):
        return self.client.generate(*args, **kwargs)

    def abort(self, request_id: str) -> None:
        self.client.abort(request_id)

    async def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.proc.poll() is None:
            try:
                self.client.to_scheduler.send(Shutdown())
            except Exception:  # the socket may already be gone
                pass
        await asyncio.to_thread(stop, [self.proc], 10.0, 10.0)
        await self.client.close()
        IpcPaths(self.config.ipc_root).cleanup()
