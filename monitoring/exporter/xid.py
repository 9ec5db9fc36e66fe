"""XID events, from an NVML event set waited on in a background thread.

Each event increments a counter labelled by GPU and XID code (a counter, not DCGM's latched
last-XID gauge, so ``increase()`` sees every event, also two of the same code); the last code
per GPU is kept too for the DCGM-compatible ``DCGM_FI_DEV_XID_ERRORS``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from monitoring.exporter.devices import Gpu
from monitoring.exporter.nvml import NVML, Calls, GpuLost, text
from monitoring.exporter.worker import Worker

log = logging.getLogger("enclave.exporter")

# XIDs that mean the GPU or its memory needs attention (NVIDIA's XID catalogue): always
# exported, at 0 until seen, so that increase() counts the first one.
CRITICAL_XIDS = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120)
WAIT_MS = 500


class XidWatcher(Worker):
    name = "xid-events"
    join_timeout_s = 2 * WAIT_MS / 1000 + 1

    def __init__(self, nvml: NVML, calls: Calls, gpus: list[Gpu]) -> None:
        super().__init__()
        self.nvml = nvml
        self.calls = calls
        self.gpus = [g for g in gpus if g.handle is not None]
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._last: dict[str, int] = {}

    def counts(self) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
        with self._lock:
            return dict(self._counts), dict(self._last)

    def record(self, uuid: str, xid: int) -> None:
        with self._lock:
            self._counts[(uuid, xid)] += 1
            self._last[uuid] = xid
        log.warning("XID %d on GPU %s", xid, uuid)

    def _run(self) -> None:
        """Wait on an event set; when waiting fails (a registered GPU was lost, say), build a
        new set from the GPUs that still register, so the others keep reporting XIDs."""
        while not self._stop.is_set():
            event_set = self._register()
            if event_set is None:
                return
            try:
                while not self._stop.is_set() and self._wait_once(event_set):
                    pass
            finally:
                self.calls.read("eventset_free", "nvmlEventSetFree", event_set)
            self._stop.wait(1.0)

    def _register(self) -> object | None:
        event_set: object | None = self.calls.read("eventset", "nvmlEventSetCreate")
        if event_set is None:
            return None
        watching = 0
        for gpu in self.gpus:
            try:
                ok, _ = self.calls.call((gpu.index, "events"), "nvmlDeviceRegisterEvents",
                                        gpu.handle, self.nvml.nvmlEventTypeXidCriticalError,
                                        event_set)
            except GpuLost:
                continue
            watching += ok
        if not watching:
            log.info("no GPU reports XID events through NVML")
            self.calls.read("eventset_free", "nvmlEventSetFree", event_set)
            return None
        return event_set

    def _wait_once(self, event_set: object) -> bool:
        """One wait; False when the set must be rebuilt."""
        nvml = self.nvml
        try:
            data = nvml.nvmlEventSetWait_v2(event_set, WAIT_MS)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_TIMEOUT:
                return True
            self.calls.count("nvmlEventSetWait_v2", exc)
            return False
        if data.eventType & nvml.nvmlEventTypeXidCriticalError:
            try:
                uuid = text(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError as exc:
                self.calls.count("nvmlDeviceGetUUID", exc)
                return True
            self.record(uuid, int(data.eventData))
        return True
