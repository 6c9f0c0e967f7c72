"""Starting, watching and stopping the engine's child processes.

Children run `<package>/__main__.py` with `<config-json> ...` as arguments in a fresh interpreter
(subprocess, not multiprocessing), so the parent's __main__ is never re-imported and a user's script
needs no `if __name__ == "__main__"`. They import the parent's own tree: `python -m` would put the
working directory first on sys.path, where a folder named like one of our packages (a user's
`frontend/`, another checkout) would shadow ours in the children only.
Every child asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so no process outlives
the one that started it, even after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


# `python -m module` without the working directory ahead of PYTHONPATH (-c puts "" at sys.path[0]).
_RUN_MODULE = ("import runpy, sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
               "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def spawn(module: str, args: list[str], name: str) -> subprocess.Popen:
    """Start `module` as __main__ with `args` (sys.argv[1:]), our packages importable ahead of anything
    in the working directory, and our pid as its parent."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["PAGEDSERVE_PARENT_PID"] = str(os.getpid())
    env["PAGEDSERVE_PROCESS_NAME"] = name
    return subprocess.Popen([sys.executable, "-c", _RUN_MODULE, module, *args], env=env)


def init_child(name: str, die_with_parent: bool = True) -> None:
    """First thing in a child's entry: logging, process title, and die with the parent (not for a
    process a user starts, such as a node agent under nohup)."""
    logging.basicConfig(level=os.environ.get("PAGEDSERVE_LOG_LEVEL", "WARNING").upper(),
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        if die_with_parent:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = int(os.environ.get("PAGEDSERVE_PARENT_PID", "0"))
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def freeze_start_up_objects() -> None:
    """Once start-up is done: collect, then move every surviving object (modules, model, configs,
    tokenizer) out of the garbage collector's generations, so the collections that serving triggers
    scan only what serving allocates (a full one otherwise walks the whole model: a pause of
    milliseconds between steps)."""
    gc.collect()
    gc.freeze()


def run_profiled(name: str, fn) -> None:
    """Run fn(), under cProfile when $PAGEDSERVE_PROFILE_DIR is set (stats dumped to <dir>/<name>.prof
    when fn returns), so the cost of each process's loop can be read offline."""
    out = os.environ.get("PAGEDSERVE_PROFILE_DIR")
    if not out:
        fn()
        return
    import cProfile
    prof = cProfile.Profile()
    try:
        prof.runcall(fn)
    finally:
        prof.dump_stats(os.path.join(out, f"{name}.prof"))


def stop(procs: list[subprocess.Popen], timeout: float = 5.0, grace: float = 0.0) -> None:
    """Give the processes `grace` seconds to exit by themselves (they were told to), terminate them,
    then kill those still alive after `timeout` seconds, and reap all."""
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def first_dead(procs: list[subprocess.Popen]) -> subprocess.Popen | None:
    return next((p for p in procs if p.poll() is not None), None)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
