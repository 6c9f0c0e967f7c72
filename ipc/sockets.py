"""Typed ZeroMQ sockets. Each wrapper owns one encoder or one Union decoder, built once.

Addresses are ipc:// paths inside the engine's private 0700 directory (see IpcPaths). The one
exception is multi-node tensor parallelism, where the scheduler and the other nodes' agents
(gpu_workers/node.py) talk over tcp:// on the address the user gave as master_addr.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio


@dataclass(frozen=True)
class IpcPaths:
    """Socket addresses of one engine, all inside one private directory."""

    root: str

    @classmethod
    def create(cls, root: str | None = None) -> "IpcPaths":
        """A new private directory (or `root`, created 0700 if missing: an embedded EngineClient of
        the same user connects through it)."""
        if root is None:
            root = tempfile.mkdtemp(prefix="pagedserve-")  # mkdtemp makes it 0700
        else:
            os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        return cls(os.path.abspath(root))

    def cleanup(self) -> None:
        """Remove the socket files, then the directory if nothing else is in it."""
        for name in os.listdir(self.root) if os.path.isdir(self.root) else ():
            if name.endswith(".sock"):
                os.unlink(os.path.join(self.root, name))
        try:
            os.rmdir(self.root)
        except OSError:
            pass

    @property
    def scheduler(self) -> str:
        """The scheduler's inbox: the frontend and every worker push into it."""
        return f"ipc://{self.root}/scheduler.sock"

    @property
    def frontend(self) -> str:
        """The frontend's inbox: request outputs and engine events."""
        return f"ipc://{self.root}/frontend.sock"

    def worker(self, rank: int) -> str:
        """A worker rank's inbox: step plans."""
        return f"ipc://{self.root}/worker-{rank}.sock"


def tcp_address(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def routable_ip(peer: str) -> str:
    """This host's address on the interface that reaches `peer` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def _socket(ctx: zmq.Context, kind: int, address: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if address.startswith("tcp://"):
        # Another host: ZMTP heartbeats turn a silent peer (host down, cable out) into a disconnect.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        sock.setsockopt(zmq.IPV6, "[" in address)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


class Sender:
    """PUSH side of a channel: encodes any message of the receiver's Union."""

    def __init__(self, ctx: zmq.Context, address: str, bind: bool = False) -> None:
        self.sock = _socket(ctx, zmq.PUSH, address, bind)
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, msg: Any) -> None:
        self.sock.send(self.encoder.encode(msg), copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class Broadcaster:
    """Sends one message to several receivers (the step plan to every worker rank), encoding once."""

    def __init__(self, ctx: zmq.Context, addresses: list[str]) -> None:
        self.ctx = ctx
        self.socks = [_socket(ctx, zmq.PUSH, a, bind=False) for a in addresses]
        self.encoder = msgspec.msgpack.Encoder()

    def add(self, address: str) -> zmq.Socket:
        """Another receiver (a node agent that joined); returns its socket, for `send_to`."""
        sock = _socket(self.ctx, zmq.PUSH, address, bind=False)
        self.socks.append(sock)
        return sock

    def send(self, msg: Any) -> None:
        data = self.encoder.encode(msg)
        for sock in self.socks:
            sock.send(data, copy=False)

    def send_to(self, sock: zmq.Socket, msg: Any) -> None:
        """One receiver only (a node's start-up message, on the socket its plans will use)."""
        sock.send(self.encoder.encode(msg), copy=False)

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)


class Receiver:
    """PULL side of a channel, decoding the receiving process's Union."""

    def __init__(self, ctx: zmq.Context, address: str, union: Any, bind: bool = True) -> None:
        self.sock = _socket(ctx, zmq.PULL, address, bind)
        self.decoder = msgspec.msgpack.Decoder(union)

    def recv(self, timeout_ms: int | None = None) -> Any | None:
        """The next message, or None if none arrives within timeout_ms (None waits forever)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return self.decoder.decode(self.sock.recv(copy=False).buffer)

    def also_bind(self, address: str) -> None:
        """Listen on a second endpoint too (the scheduler's tcp:// port for other nodes)."""
        self.sock.bind(address)

    def recv_nowait(self) -> Any | None:
        try:
            return self.decoder.decode(self.sock.recv(zmq.NOBLOCK, copy=False).buffer)
        except zmq.Again:
            return None

    def close(self) -> None:
        self.sock.close(linger=0)


class PeerWatch:
    """Notices when the peer of a connected tcp:// socket goes away (process exit or heartbeat
    timeout), through ZeroMQ's socket monitor."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.lost = False

    def peer_lost(self) -> bool:
        while not self.lost and self.monitor.poll(0):
            self.monitor.recv_multipart()  # only EVENT_DISCONNECTED is subscribed
            self.lost = True
        return self.lost

    def close(self) -> None:
        self.monitor.close(linger=0)


class AsyncReceiver:
    """asyncio PULL side, for the HTTP frontend and the embeddable client."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, union: Any, bind: bool = True) -> None:
        self.sock = _socket(ctx, zmq.PULL, address, bind)
        self.decoder = msgspec.msgpack.Decoder(union)

    async def recv(self) -> Any:
        frame = await self.sock.recv(copy=False)
        return self.decoder.decode(frame.buffer)

    def close(self) -> None:
        self.sock.close(linger=0)
