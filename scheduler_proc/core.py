"""The scheduler process: owns the request queues, the Scheduler and BlockManager, and the workers.

    frontend ──AddRequest/Abort──▶ ┌────────────── inbox (PULL) ──────────────┐ ◀──StepResult── rank 0
                                   │ SchedulerProc.run: drain, schedule, send │ ◀──WorkerReady── ranks
    frontend ◀──RequestOutputs──── └──────────── ExecuteStep to every rank ──┘ ──▶ ranks 0..N-1

Tensor parallelism over several hosts: ranks 0..k-1 are this node's children (ipc://); each other
node runs an agent (gpu_workers/node.py) that connects to master_addr:master_port+1 (tcp://), says
NodeHello, gets StartNode(config), starts its k ranks and relays their messages both ways. The
scheduler treats an agent as one more receiver of the plans; a lost agent kills the engine.

Overlap: up to MAX_STEPS_IN_FLIGHT plans are outstanding. While the workers run step n, the scheduler
plans step n+1 and sends it, so the worker starts it the moment step n is done instead of idling
through a round trip (result -> scheduler -> plan). Decode inputs need no round trip: each worker
appends the tokens it samples to its own copy of the request (see Scheduler on pending samples).
The outputs a step result produces are routed at once but sent after the next plan: the workers
wait for the plan, the frontend does not.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
import sys
import time

import zmq

from ipc.config import EngineConfig
from ipc import envs
from ipc.messages import (AbortRequests, AddRequest, ClientBye, ClientHello, EngineDead, EngineReady,
                          HealthCheck, HealthStatus, InitKVCache, NodeHello, RequestDelta, RequestFailed,
                          RequestOutputs, Shutdown, StartNode, StepResult, ToScheduler, WorkerFailed,
                          WorkerReady)
from ipc.process import first_dead, freeze_start_up_objects, init_child, run_profiled, spawn, stop
from ipc.sockets import Broadcaster, IpcPaths, PeerWatch, Receiver, Sender, tcp_address
from scheduler_proc.scheduler import Scheduler

logger = logging.getLogger(__name__)

_POLL_MS = 100
MAX_STEPS_IN_FLIGHT = 2
_WORKER_START_TIMEOUT_S = 1800.0


class EngineDeadError(RuntimeError):
    pass


class SchedulerProc:
    def __init__(self, config: EngineConfig, config_json: str) -> None:
        self.config = config
        paths = IpcPaths(config.ipc_root)
        self.ctx = zmq.Context()
        self.inbox = Receiver(self.ctx, paths.scheduler, ToScheduler, bind=True)
        self.to_frontend = Sender(self.ctx, paths.frontend)
        self.clients: dict[int, Sender] = {0: self.to_frontend}  # client_index -> its inbox
        self.owner: dict[str, int] = {}  # request id -> client_index
        self.outbox: list[tuple[int, RequestOutputs]] = []  # (client_index, outputs) to send after the plan
        pc = config.parallel
        local_ranks = pc.tensor_parallel_size // pc.nnodes  # ranks 0..local_ranks-1 run here
        self.workers = [spawn("gpu_workers", [config_json, str(rank)], f"ps-worker-{rank}")
                        for rank in range(local_ranks)]
        self.to_workers = Broadcaster(self.ctx, [paths.worker(rank) for rank in range(local_ranks)])
        self.nodes: dict[int, PeerWatch] = {}  # node_rank -> its agent's connection
        if pc.nnodes > 1:
            self.inbox.also_bind(tcp_address(pc.master_addr, pc.scheduler_port))
        self.steps_in_flight: deque[tuple[int, float]] = deque()  # (step id, time sent)
        self.nothing_to_plan = False  # the last schedule() found nothing: wait for a message
        self.running = True
        self.handlers = {
            AddRequest: self._on_add_request,
            AbortRequests: self._on_abort_requests,
            ClientHello: self._on_client_hello,
            ClientBye: self._on_client_bye,
            HealthCheck: self._on_health_check,
            StepResult: self._on_step_result,
            WorkerFailed: self._on_worker_failed,
            Shutdown: self._on_shutdown,
            NodeHello: self._on_node_hello,
        }

    def start(self) -> None:
        """Wait for every rank's KV capacity, build the scheduler, size the caches, tell the frontend."""
        num_blocks = self._wait_for_workers()
        config = self.config
        mc, cc, sc = config.model, config.cache, config.scheduler
        self.scheduler = Scheduler(num_blocks, cc.block_size, sc.max_num_seqs, sc.max_num_batched_tokens,
                                   mc.max_model_len, mc.eos_token_ids, cc.enable_prefix_caching)
        self.to_workers.send(InitKVCache(num_blocks))
        self.ready = EngineReady(num_blocks, cc.block_size, mc.max_model_len, mc.model)
        self.to_frontend.send(self.ready)
        freeze_start_up_objects()

    def _wait_for_workers(self) -> int:
        """Every rank reports how many KV blocks fit; all use the smallest count (or the override)."""
        reported: dict[int, int] = {}
        deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        while len(reported) < self.config.parallel.tensor_parallel_size:
            self._check_workers()
            if time.monotonic() > deadline:
                raise EngineDeadError("workers did not start in time")
            msg = self.inbox.recv(_POLL_MS)
            if isinstance(msg, WorkerReady):
                reported[msg.rank] = msg.num_blocks
            elif isinstance(msg, (WorkerFailed, NodeHello)):
                self._dispatch(msg)
        override = self.config.cache.num_gpu_blocks_override
        return override if override is not None else min(reported.values())

    def run(self) -> None:
        """1. wait for messages (briefly if idle) and handle them all; 2. check the workers are
        alive; 3. with a free slot in flight, plan the next step and send it to every rank;
        4. send the outputs the messages produced."""
        while self.running:
            msg = self.inbox.recv(_POLL_MS if self._should_wait() else 0)
            while msg is not None:
                self._dispatch(msg)
                msg = self.inbox.recv_nowait()
            self._check_workers()
            if len(self.steps_in_flight) < MAX_STEPS_IN_FLIGHT and self.scheduler.has_work():
                out = self.scheduler.schedule()
                self.nothing_to_plan = out.step is None
                if out.step is not None:
                    self.to_workers.send(out.step)
                    self.steps_in_flight.append((out.step.step_id, time.monotonic()))
            self._flush_outputs()

    def _should_wait(self) -> bool:
        """Block on the inbox unless there is a step to plan right now."""
        return (len(self.steps_in_flight) >= MAX_STEPS_IN_FLIGHT or not self.scheduler.has_work()
                or self.nothing_to_plan)

    def _dispatch(self, msg) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            logger.error("unexpected message %s", type(msg).__name__)
            return
        handler(msg)

    def _on_add_request(self, msg: AddRequest) -> None:
        client = self.clients.get(msg.client_index)
        if client is None:
            logger.error("request %s from unknown client %d", msg.request_id, msg.client_index)
            return
        try:
            self.scheduler.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling_params,
                                       msg.arrival_time)
        except ValueError as e:
            client.send(RequestFailed(msg.request_id, str(e)))
            return
        self.owner[msg.request_id] = msg.client_index
        self.nothing_to_plan = False

    def _on_abort_requests(self, msg: AbortRequests) -> None:
        self.nothing_to_plan = False  # freed blocks may admit a waiting request
        self._send_outputs(self.scheduler.abort(msg.request_ids), always=True)

    def _on_client_hello(self, msg: ClientHello) -> None:
        self.clients[msg.client_index] = Sender(self.ctx, msg.address)
        self.clients[msg.client_index].send(self.ready)

    def _on_client_bye(self, msg: ClientBye) -> None:
        sender = self.clients.pop(msg.client_index, None)
        if sender is not None and msg.client_index != 0:
            mine = [rid for rid, owner in self.owner.items() if owner == msg.client_index]
            self._send_outputs(self.scheduler.abort(mine))
            sender.close()

    def _on_health_check(self, msg: HealthCheck) -> None:
        """Healthy: this loop answers, every worker process lives, and the oldest step in flight has
        not waited longer than $PAGEDSERVE_STEP_STUCK_S (a hung worker never returns its result)."""
        client = self.clients.get(msg.client_index)
        if client is None:
            return
        dead = first_dead(self.workers)
        waited = time.monotonic() - self.steps_in_flight[0][1] if self.steps_in_flight else 0.0
        if dead is not None:
            client.send(HealthStatus(msg.check_id, False, f"worker rank {self.workers.index(dead)} exited"))
        elif waited > envs.step_stuck_seconds():
            client.send(HealthStatus(msg.check_id, False, f"no step result for {waited:.0f} s"))
        else:
            client.send(HealthStatus(msg.check_id, True))

    def _on_step_result(self, msg: StepResult) -> None:
        expected, _ = self.steps_in_flight.popleft()
        assert msg.step_id == expected, f"result of step {msg.step_id}, expected {expected}"
        self.nothing_to_plan = False
        self._send_outputs(self.scheduler.update(msg), always=True)

    def _send_outputs(self, deltas: list[RequestDelta], always: bool = False) -> None:
        """Route deltas to the clients that own the requests; client 0 also gets the stats. They
        leave with the loop's next `_flush_outputs`, in order."""
        by_client: dict[int, list[RequestDelta]] = {0: []} if always else {}
        for delta in deltas:
            by_client.setdefault(self.owner.get(delta.request_id, 0), []).append(delta)
        stats = self.scheduler.stats()
        for index, group in by_client.items():
            self.outbox.append((index, RequestOutputs(group, stats if index == 0 else None)))
        for delta in deltas:
            if delta.finish_reason is not None and delta.request_id not in self.scheduler.groups:
                self.owner.pop(delta.request_id, None)

    def _flush_outputs(self) -> None:
        """Send the routed outputs; those of a client that has left meanwhile are dropped."""
        for index, outputs in self.outbox:
            client = self.clients.get(index)
            if client is not None:
                client.send(outputs)
        self.outbox.clear()

    def _on_worker_failed(self, msg: WorkerFailed) -> None:
        raise EngineDeadError(f"worker rank {msg.rank} failed: {msg.message}")

    def _on_shutdown(self, msg: Shutdown) -> None:
        self.running = False

    def _on_node_hello(self, msg: NodeHello) -> None:
        if msg.node_rank in self.nodes or not 0 < msg.node_rank < self.config.parallel.nnodes:
            logger.error("ignoring node agent %d at %s (nnodes %d, joined: %s)", msg.node_rank, msg.address,
                         self.config.parallel.nnodes, sorted(self.nodes))
            return
        sock = self.to_workers.add(msg.address)
        self.nodes[msg.node_rank] = PeerWatch(sock)
        self.to_workers.send_to(sock, StartNode(self.config))
        logger.info("node %d joined from %s", msg.node_rank, msg.address)

    def _check_workers(self) -> None:
        dead = first_dead(self.workers)
        if dead is not None:
            rank = self.workers.index(dead)
            raise EngineDeadError(f"worker rank {rank} exited unexpectedly with code {dead.returncode}")
        for node_rank, watch in self.nodes.items():
            if watch.peer_lost():
                raise EngineDeadError(f"worker node {node_rank} (its agent) disconnected")

    def close(self, grace: float = 5.0) -> None:
        """Tell every rank to stop and reap ours (after a failure, grace 0: ranks blocked in a
        collective with a dead peer cannot act on a message)."""
        if self.ctx.closed:
            return
        if self.workers:
            try:
                self.to_workers.send(Shutdown())
            except zmq.ZMQError:
                pass
            stop(self.workers, timeout=5.0 if grace else 1.0, grace=grace)
        for watch in self.nodes.values():
            watch.close()
        for client in self.clients.values():
            client.sock.close(linger=1000)  # let a last EngineDead reach the clients
        self.ctx.destroy(linger=0)


def run_scheduler(config_json: str) -> None:
    """Entry of the scheduler process (python -m scheduler_proc CONFIG_JSON)."""
    init_child("ps-scheduler")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = EngineConfig.decode(config_json.encode())
    proc = SchedulerProc(config, config_json)
    try:
        proc.start()
        run_profiled("scheduler", proc.run)
    except Exception as e:
        logger.exception("scheduler failed")
        for client in proc.clients.values():
            client.send(EngineDead(f"{type(e).__name__}: {e}"))
        proc.close(grace=0.0)
        sys.exit(1)
    finally:
        proc.close()

