"""EngineClient: an asyncio client of a running pagedserve engine over ZeroMQ, without HTTP.

Another Python service on the same machine (and user) can embed it:

    client = EngineClient(ipc_dir)          # the directory `scripts/launch.sh --ipc-dir` names
    await client.start()
    async for out in client.generate("Hello, my name is", SamplingParams(max_tokens=32)):
        print(out.new_text[0], end="", flush=True)
    await client.close()

Each client binds its own inbox in the engine's private directory and introduces itself with
ClientHello; the scheduler routes every request's outputs to the client that sent it. Tokenization
and incremental detokenization happen here, with the engine's own tokenizer. Cancelling the
consumer of generate() (or leaving the loop early) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from typing import AsyncIterator

import zmq
import zmq.asyncio

from frontend.output_processor import OutputProcessor, OutputUpdate
from ipc.errors import EngineDeadError
from ipc.messages import (AbortRequests, AddRequest, ClientBye, ClientHello, EngineDead, EngineReady,
                          HealthCheck, HealthStatus, RequestFailed, RequestOutputs, SchedulerStats, ToFrontend)
from ipc.sampling_params import SamplingParams
from ipc.sockets import AsyncReceiver, IpcPaths, Sender

logger = logging.getLogger(__name__)


class EngineClient:
    def __init__(self, ipc_dir: str, client_index: int | None = None, tokenizer=None) -> None:
        self.paths = IpcPaths(ipc_dir)
        self.client_index = secrets.randbits(62) + 1 if client_index is None else client_index
        self.address = (self.paths.frontend if self.client_index == 0
                        else f"ipc://{ipc_dir}/client-{self.client_index}.sock")
        self.actx = zmq.asyncio.Context()
        self.ctx = zmq.Context()
        self.inbox = AsyncReceiver(self.actx, self.address, ToFrontend, bind=True)
        self.to_scheduler = Sender(self.ctx, self.paths.scheduler)
        self.tokenizer = tokenizer
        self.ready: EngineReady | None = None
        self.processor: OutputProcessor | None = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.stats = SchedulerStats()
        self.dead: str | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._health_checks: dict[int, asyncio.Future] = {}

    async def start(self, timeout: float | None = 60.0) -> EngineReady:
        """Wait for the engine's EngineReady (introducing ourselves unless we started it), load the
        tokenizer, and start routing outputs."""
        if self.client_index != 0:
            self.to_scheduler.send(ClientHello(self.client_index, self.address))
        msg = await asyncio.wait_for(self._wait_ready(), timeout)
        if self.tokenizer is None:
            from frontend.engine_args import load_tokenizer
            self.tokenizer = await asyncio.to_thread(load_tokenizer, msg.model)
        self.ready = msg
        self.processor = OutputProcessor(self.tokenizer)
        self._loop_task = asyncio.create_task(self._output_loop())
        return msg

    async def _wait_ready(self) -> EngineReady:
        while True:
            msg = await self.inbox.recv()
            if isinstance(msg, EngineReady):
                return msg
            if isinstance(msg, EngineDead):
                self.dead = msg.message
                raise EngineDeadError(msg.message)

    @property
    def max_model_len(self) -> int:
        return self.ready.max_model_len if self.ready else 0

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the model's maximum context length "
                             f"is {self.max_model_len}")
        return ids

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_text: str | None = None
                       ) -> AsyncIterator[OutputUpdate]:
        """Yield an OutputUpdate each step the request gains tokens, until it finishes. `prompt` is a
        string or token ids. Raises ValueError if the engine rejects the request and EngineDeadError if
        the engine dies."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        request_id = request_id or f"{uuid.uuid4().hex}-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else prompt_text
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        self.processor.add_request(request_id, text, ids, params)
        self.to_scheduler.send(AddRequest(request_id, ids, params, time.time(), self.client_index))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.output.finished
                yield item
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def check_health(self, timeout: float = 5.0) -> HealthStatus:
        """Ask the scheduler whether it and every worker are serving; unhealthy if it does not answer
        within `timeout` seconds."""
        if self.dead is not None:
            return HealthStatus(-1, False, self.dead)
        check_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._health_checks[check_id] = future
        self.to_scheduler.send(HealthCheck(self.client_index, check_id))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return HealthStatus(check_id, False, f"the scheduler did not answer within {timeout:.0f} s")
        finally:
            self._health_checks.pop(check_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed at once."""
        if self.processor is not None:
            self.processor.abort(request_id)
        if self.dead is None and not self.ctx.closed:
            self.to_scheduler.send(AbortRequests([request_id]))

    async def _output_loop(self) -> None:
        """1. receive the next message; 2. detokenize / apply stop strings; 3. wake the streams."""
        while True:
            msg = await self.inbox.recv()
            if isinstance(msg, RequestOutputs):
                self.stats = msg.stats or self.stats
                updates, to_abort = self.processor.process(msg.outputs)
                if to_abort:
                    self.to_scheduler.send(AbortRequests(to_abort))
                for update in updates:
                    queue = self.streams.get(update.output.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
            elif isinstance(msg, RequestFailed):
                self.processor.abort(msg.request_id)
                queue = self.streams.get(msg.request_id)
                if queue is not None:
                    queue.put_nowait(ValueError(msg.message))
            elif isinstance(msg, HealthStatus):
                future = self._health_checks.get(msg.check_id)
                if future is not None and not future.done():
                    future.set_result(msg)
            elif isinstance(msg, EngineDead):
                self.fail_all(msg.message)
            else:
                logger.error("unexpected message %s", type(msg).__name__)

    def fail_all(self, message: str) -> None:
        """The engine is gone: every stream ends with EngineDeadError."""
        if self.dead is None:
            self.dead = message
        for queue in self.streams.values():
            queue.put_nowait(EngineDeadError(self.dead))

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self.client_index != 0 and self.dead is None and not self.ctx.closed:
            self.to_scheduler.send(ClientBye(self.client_index))
        self.to_scheduler.sock.close(linger=500)
        self.inbox.close()
        self.ctx.term()
        self.actx.term()
