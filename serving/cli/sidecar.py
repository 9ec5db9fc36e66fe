"""The GPU exporter as a child process of `enclave up`: started first, stopped last.

A separate process, not a thread of the gateway: NVML calls block, and a wedged driver must not
stall the gateway's event loop. If it cannot start (port taken by a DCGM exporter, say), the
platform runs on without it and says so.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from serving.cli.common import console
from serving.engines.supervisor import state_file
from serving.settings import Settings

START_TIMEOUT_S = 20.0  # NVML's initialisation can take seconds without persistence mode


class ExporterProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = settings.run_dir / "logs" / "exporter.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.exporter_port}/metrics"

    def start(self) -> bool:
        if self.settings.exporter_port == 0:
            return False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "monitoring.exporter", "--host", "127.0.0.1",
                 "--port", str(self.settings.exporter_port),
                 "--engines-file", str(state_file(self.settings.run_dir))],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Wait until it answers as itself: a port held by another exporter (DCGM's uses 9400
        # too) answers, but without our metrics; ours exits then.
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if b"enclave_gpu_devices" in httpx.get(self.url, timeout=2).content:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if self.proc.poll() is None:
            console.print(f"[yellow]GPU exporter slow to start[/] (see {self.log_path})")
            return True
        console.print(f"[yellow]GPU exporter not started[/] (see {self.log_path}); "
                      "the platform runs without it")
        self.proc = None
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
