"""Starts the real server through scripts/launch.sh on a free port and watches its processes.

One shared server (with an API key) serves every non-destructive test module of the session;
tests that kill or stop a server start their own with `ServerProcess(...)`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch.sh"
API_KEY = "test-key"
MAX_MODEL_LEN = 1024
_START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`scripts/launch.sh --port <free> --max-model-len 1024 *flags`, ready once it printed its URL."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [str(LAUNCH), "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.output: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._ready.wait(_START_TIMEOUT_S) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.output))
        # every process of the engine, for orphan checks
        self.processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("pagedserve: serving "):
                assert re.search(rf"at http://127\.0\.0\.1:{self.port}\b", line), line
                self._ready.set()
        self._ready.set()  # exited

    def worker_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "gpu_workers" in " ".join(p.cmdline())]

    def alive_processes(self) -> list[psutil.Process]:
        alive = []
        for p in self.processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for p in getattr(self, "processes", [])[1:]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


_shared: ServerProcess | None = None


def shared_server(pytestconfig) -> ServerProcess:
    """The session's shared server (started on first use, stopped at the end of the session)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = ServerProcess("--api-key", API_KEY)
        pytestconfig.add_cleanup(_shared.stop)
    return _shared


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 120.0) -> tuple[int, dict | str]:
    """One request with urllib; returns (status, parsed JSON body or text)."""
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(text: str, name: str) -> float:
    """The value of the first sample of `name` (any labels) in Prometheus text."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for_idle(url: str, timeout: float = 10.0) -> str:
    """Poll /metrics until no request runs or waits and the KV cache is empty; returns the text."""
    deadline = time.monotonic() + timeout
    while True:
        _, text = http("GET", f"{url}/metrics")
        idle = (metric(text, "pagedserve:num_requests_running") == 0
                and metric(text, "pagedserve:num_requests_waiting") == 0
                and metric(text, "pagedserve:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.1)
