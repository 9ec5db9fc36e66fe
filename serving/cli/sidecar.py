"""The GPU exporter as a child process of `enclave up`: started first, stopped last.

A separate process, not a thread of the gateway: NVML calls block, and a wedged driver must not
stall the gateway's event loop. If it cannot start (port taken by a DCGM exporter, say), the
platform runs on without it and says so.
"""

from __future__ import annotations

import subprocess
import sys
import time

from serving.cli.common import console
from serving.settings import Settings


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
                 "--engines-file", str(self.settings.run_dir / "engines.json")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(0.5)  # a taken port fails at once
        if self.proc.poll() is not None:
            console.print(f"[yellow]GPU exporter not started[/] (see {self.log_path}); "
                          "the platform runs without it")
            self.proc = None
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
