"""The agent of a worker-only node in multi-node tensor parallelism.

    node 0 (frontend, scheduler, ranks 0..k-1)              node i (this agent, ranks i*k..(i+1)*k-1)
    ┌──────────────────────────────┐  NodeHello, WorkerReady, ┌──────────────────────────────────┐
    │ scheduler inbox              │ ◀── WorkerFailed ─────── │ NodeAgent ◀── ipc:// ── its ranks │
    │  tcp://master_addr:port+1    │                          │   relays both ways               │
    │ Broadcaster ─ StartNode, ────┼────────────────────────▶ │   tcp:// inbox ── ipc:// ──▶ ranks│
    │   plans, Shutdown            │                          └──────────────────────────────────┘
    └──────────────────────────────┘            ranks of all nodes: torch.distributed at master_addr:master_port

Usage, on every node but 0 (node 0 runs the frontend with the same four flags and node rank 0):

    python -m gpu_workers.node --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500

The agent waits for the scheduler, receives the engine config (StartNode), starts its ranks as
`python -m gpu_workers` children inside its own private ipc:// directory (to them the agent is the
scheduler), and exits when the engine shuts down, when one of its ranks dies (after telling the
scheduler), or when the scheduler disappears. One agent serves one engine run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import signal
import sys

import zmq

from ipc.messages import (ExecuteStep, InitKVCache, NodeHello, Shutdown, StartNode, ToNode, ToScheduler,
                          WorkerFailed)
from ipc.process import first_dead, init_child, spawn, stop
from ipc.sockets import Broadcaster, IpcPaths, PeerWatch, Receiver, Sender, routable_ip, tcp_address

logger = logging.getLogger(__name__)

_POLL_MS = 100


class NodeAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths = IpcPaths.create()
        self.ctx = zmq.Context()
        host = args.host or routable_ip(args.master_addr)
        self.from_scheduler = Receiver(self.ctx, tcp_address(host, "*"), ToNode, bind=True)
        address = self.from_scheduler.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.to_scheduler = Sender(self.ctx, tcp_address(args.master_addr, args.master_port + 1))
        self.scheduler_watch = PeerWatch(self.to_scheduler.sock)
        self.from_ranks = Receiver(self.ctx, self.paths.scheduler, ToScheduler, bind=True)
        self.to_ranks: Broadcaster | None = None
        self.ranks: list[int] = []
        self.workers = []
        self.running = True
        self.handlers = {StartNode: self._on_start_node, InitKVCache: self._relay, ExecuteStep: self._relay,
                         Shutdown: self._on_shutdown}
        self.to_scheduler.send(NodeHello(args.node_rank, address))  # queued until the scheduler listens
        logger.info("node %d waiting for the scheduler at %s:%d", args.node_rank, args.master_addr,
                    args.master_port + 1)

    def run(self) -> None:
        """1. relay the scheduler's messages to the ranks; 2. relay the ranks' messages to the
        scheduler; 3. check the ranks and the scheduler are alive."""
        poller = zmq.Poller()
        poller.register(self.from_scheduler.sock, zmq.POLLIN)
        poller.register(self.from_ranks.sock, zmq.POLLIN)
        while self.running:
            ready = dict(poller.poll(_POLL_MS))
            if self.from_scheduler.sock in ready:
                msg = self.from_scheduler.recv_nowait()
                if msg is not None:
                    self.handlers[type(msg)](msg)
            if self.from_ranks.sock in ready:
                msg = self.from_ranks.recv_nowait()
                if msg is not None:
                    self.to_scheduler.send(msg)
            self._check_alive()

    def _on_start_node(self, msg: StartNode) -> None:
        config = msg.config
        pc = config.parallel
        if pc.nnodes != self.args.nnodes:
            raise ValueError(f"--nnodes {self.args.nnodes} differs from the engine's nnodes {pc.nnodes}")
        # The ranks see this agent as their scheduler: same messages, this node's private directory.
        local = dataclasses.replace(config, ipc_root=self.paths.root,
                                    parallel=dataclasses.replace(pc, node_rank=self.args.node_rank))
        per_node = pc.tensor_parallel_size // pc.nnodes
        self.ranks = list(range(self.args.node_rank * per_node, (self.args.node_rank + 1) * per_node))
        config_json = local.encode().decode()
        self.workers = [spawn("gpu_workers", [config_json, str(r)], f"ps-worker-{r}") for r in self.ranks]
        self.to_ranks = Broadcaster(self.ctx, [self.paths.worker(r) for r in self.ranks])
        logger.info("node %d started ranks %s of %s", self.args.node_rank, self.ranks, config.model.model)

    def _relay(self, msg) -> None:
        self.to_ranks.send(msg)

    def _on_shutdown(self, msg: Shutdown) -> None:
        if self.to_ranks is not None:
            self.to_ranks.send(msg)
        self.running = False

    def _check_alive(self) -> None:
        dead = first_dead(self.workers)
        if dead is not None:
            rank = self.ranks[self.workers.index(dead)]
            self.to_scheduler.send(WorkerFailed(rank, f"exited unexpectedly with code {dead.returncode} "
                                                      f"on node {self.args.node_rank}"))
            raise RuntimeError(f"rank {rank} exited with code {dead.returncode}")
        if self.scheduler_watch.peer_lost():
            raise RuntimeError("lost the connection to the scheduler")

    def close(self, grace: float) -> None:
        stop(self.workers, timeout=5.0 if grace else 1.0, grace=grace)
        self.scheduler_watch.close()
        self.to_scheduler.sock.close(linger=1000)  # let a last WorkerFailed out
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.paths.root, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_workers.node",
                                description="Run this host's tensor-parallel ranks of an engine started on node 0.")
    p.add_argument("--nnodes", type=int, required=True, help="Number of hosts, node 0 included.")
    p.add_argument("--node-rank", type=int, required=True, help="This host's index, 1..nnodes-1.")
    p.add_argument("--master-addr", required=True, help="Address of node 0 (as given to its frontend).")
    p.add_argument("--master-port", type=int, required=True,
                   help="torch.distributed port on node 0; the scheduler listens on master-port + 1.")
    p.add_argument("--host", default=None,
                   help="Address node 0 reaches this host at (default: this host's address on the "
                        "interface that routes to --master-addr).")
    args = p.parse_args(argv)
    if not 0 < args.node_rank < args.nnodes:
        p.error(f"--node-rank must be in [1, {args.nnodes}) (node 0 runs the frontend), got {args.node_rank}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_child(f"ps-node-{args.node_rank}", die_with_parent=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    agent = NodeAgent(args)
    grace = 0.0
    try:
        agent.run()
        grace = 5.0
    except Exception:
        logger.exception("node %d failed", args.node_rank)
        sys.exit(1)
    finally:
        agent.close(grace)


if __name__ == "__main__":
    main()
