"""``enclave gateway --workers N``: several gateway processes serving one port.

The parent binds the listeners, starts N workers (fresh interpreters running ``enclave gateway``
with the listening sockets passed down; the kernel spreads connections between them), restarts
a worker that dies (at most ``_RESTARTS`` in ``_RESTART_WINDOW_S``, then it stops them all and
exits 1), and on SIGTERM or Ctrl-C stops them all gracefully. What must be exact across the
workers is shared: rate limits and concurrency caps in Redis (required), budgets in the ledger
(leases per worker), metrics in prometheus_client's multiprocess directory; each worker writes
its own audit chain (``<host>-<port>-w<N>``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

from serving import metrics, server
from serving.settings import Settings

log = logging.getLogger("enclave.workers")
FDS_ENV = "ENCLAVE_LISTEN_FDS"
PARENT_ENV = "ENCLAVE_WORKERS_PARENT"
_PR_SET_PDEATHSIG = 1
_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_STOP_TIMEOUT_S = 30.0


def supervise(settings: Settings, workers: int) -> int:
    sockets = server.listeners(settings)
    fds = [s.fileno() for s in sockets]
    shared = settings.run_dir / f"metrics-{settings.port}"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True, mode=0o700)
    # The workers read their settings from the environment: the address this command was
    # given (--host/--port) goes with them (it names their audit chains too).
    env = {**os.environ, FDS_ENV: ",".join(map(str, fds)), "PROMETHEUS_MULTIPROC_DIR": str(shared),
           PARENT_ENV: str(os.getpid()), "ENCLAVE_HOST": settings.host,
           "ENCLAVE_PORT": str(settings.port)}
    command = [sys.executable, "-m", "serving.cli.main", "gateway"]

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env={**env, "ENCLAVE_WORKER": str(index)},
                                pass_fds=fds)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = {i: start(i) for i in range(workers)}
    log.info("gateway workers started", extra={"workers": workers, "port": settings.port,
                                                "pids": [p.pid for p in procs.values()]})
    restarts: list[float] = []
    code = 0
    while not stopping:
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            if proc.poll() is None or stopping:
                continue
            metrics.process_exited(proc.pid, shared)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(restarts) > _RESTARTS:
                log.error("gateway workers keep exiting; stopping",
                          extra={"worker": index, "exit_code": proc.returncode})
                stopping, code = True, 1
                break
            log.warning("gateway worker exited; restarting it",
                        extra={"worker": index, "exit_code": proc.returncode})
            procs[index] = start(index)
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        metrics.process_exited(proc.pid, shared)
    for sock in sockets:
        sock.close()
    return code


def die_with_parent() -> None:
    """In a worker: SIGTERM when the parent dies (SIGKILL included), so no worker keeps
    serving, and holding the port, without its supervisor (Linux ``prctl``)."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent and os.getppid() != parent:  # it died before the line above
        raise SystemExit(1)
