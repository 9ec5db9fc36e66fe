"""A FAKE NVML, for tests and the benchmark only: this machine class has no NVIDIA GPU.

It has the surface of ``pynvml`` that the exporter calls, with pynvml's own constants and
exception classes (``NVMLError(code)`` builds the same subclasses), over GPUs described in
plain dataclasses. A test can mark a call unsupported on one GPU, lose a GPU, or inject an XID
event. Nothing in the exporter uses it unless a caller passes it explicitly
(``enclave exporter --fake-gpus N``, named as a fake in its help and in its output).
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1 << 20


@dataclass
class FakeGpu:
    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3 (fake)"
    bus_id: str = ""
    util: int = 37
    mem_util: int = 12
    enc_util: int = 0
    dec_util: int = 0
    total: int = 81559 * MIB
    used: int = 20480 * MIB
    reserved: int = 512 * MIB
    temp: int = 54
    mem_temp: int | None = 61
    slowdown: int = 90
    shutdown: int = 95
    power_mw: int = 312_500
    limit_mw: int = 700_000
    energy_mj: int = 9_876_543_210
    sm_clock: int = 1980
    mem_clock: int = 2619
    clock_events: int = 0x4  # sw_power_cap
    pcie_replays: int = 3
    pcie_tx_kb: int = 1200
    pcie_rx_kb: int = 3400
    ecc: dict[tuple[int, int], int] = field(default_factory=lambda: {
        (0, 0): 5, (0, 1): 17, (1, 0): 0, (1, 1): 1})  # (error type, counter) -> count
    retired_sbe: int = 2
    retired_dbe: int = 1
    retired_pending: bool = False
    remapped: tuple[int, int, bool, bool] = (4, 0, False, False)
    nvlinks: int = 0
    nvlink_errors: dict[int, int] = field(default_factory=dict)  # error type -> count per link
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)
    unsupported: set[str] = field(default_factory=set)  # NVML calls answering NOT_SUPPORTED
    lost: bool = False


def gpus(n: int) -> list[FakeGpu]:
    """``n`` healthy fake GPUs. The first one "runs" the calling process (1 GiB). Odd ones have
    two NVLinks (one CRC flit error each) and, like an H100 (row remapping instead), do not
    support page retirement."""
    return [FakeGpu(i, f"GPU-fake{i:04d}-0000-4000-8000-{i:012d}",
                    bus_id=f"00000000:{0x18 + i:02X}:00.0",
                    processes=[(os.getpid(), 1 << 30)] if i == 0 else [],
                    nvlinks=2 if i % 2 else 0,
                    nvlink_errors={pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: 1} if i % 2 else {},
                    unsupported={"nvmlDeviceGetRetiredPages",
                                 "nvmlDeviceGetRetiredPagesPendingStatus"} if i % 2 else set())
            for i in range(n)]


class FakeNVML:
    """Pass an instance where the exporter takes the NVML module."""

    def __init__(self, devices: list[FakeGpu], driver: str = "580.95.05",
                 cuda: int = 13000) -> None:
        self.devices = devices
        self.driver = driver
        self.cuda = cuda
        self.calls = 0
        self._events: queue.Queue[tuple[FakeGpu, int]] = queue.Queue()
        self._registered: dict[int, set[int]] = {}  # event set -> GPU indexes

    # Constants and exception classes are pynvml's own; functions never come from there.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "nvmlEventType", "nvmlMemory_v")) or name in (
                "NVMLError", "NVMLLibraryMismatchError"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def inject_xid(self, index: int, xid: int) -> None:
        self._events.put((self.devices[index], xid))

    def _check(self, gpu: FakeGpu, call: str) -> FakeGpu:
        self.calls += 1
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    # system
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._check(self.devices[index], "nvmlDeviceGetHandleByIndex")

    # identity
    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return self._check(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return self._check(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> Any:
        info = pynvml.nvmlPciInfo_t()  # the real structure: busId reads back as bytes
        info.busId = self._check(h, "nvmlDeviceGetPciInfo").bus_id.encode()
        return info

    def nvmlDeviceGetMinorNumber(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetMinorNumber").index

    def nvmlDeviceGetNvLinkState(self, h: FakeGpu, link: int) -> int:
        g = self._check(h, "nvmlDeviceGetNvLinkState")
        if g.nvlinks == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= g.nvlinks:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(pynvml.NVML_FEATURE_ENABLED)

    # readings
    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        g = self._check(h, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=g.util, memory=g.mem_util)

    def nvmlDeviceGetEncoderUtilization(self, h: FakeGpu) -> list[int]:
        return [self._check(h, "nvmlDeviceGetEncoderUtilization").enc_util, 167000]

    def nvmlDeviceGetDecoderUtilization(self, h: FakeGpu) -> list[int]:
        return [self._check(h, "nvmlDeviceGetDecoderUtilization").dec_util, 167000]

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu, version: int | None = None) -> SimpleNamespace:
        g = self._check(h, "nvmlDeviceGetMemoryInfo")
        free = g.total - g.used - g.reserved
        if version is None:
            return SimpleNamespace(total=g.total, used=g.used + g.reserved, free=free)
        return SimpleNamespace(total=g.total, used=g.used, free=free, reserved=g.reserved)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        return self._check(h, "nvmlDeviceGetTemperature").temp

    def nvmlDeviceGetTemperatureThreshold(self, h: FakeGpu, which: int) -> int:
        g = self._check(h, "nvmlDeviceGetTemperatureThreshold")
        return g.slowdown if which == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN else g.shutdown

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, ids: list[int]) -> Any:
        g = self._check(h, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(ids))()  # the real ctypes structures
        for value, fid in zip(values, ids, strict=True):
            value.fieldId = fid
            if fid == pynvml.NVML_FI_DEV_MEMORY_TEMP and g.mem_temp is not None:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = g.mem_temp
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetEnforcedPowerLimit").limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, clock: int) -> int:
        g = self._check(h, "nvmlDeviceGetClockInfo")
        return g.sm_clock if clock == pynvml.NVML_CLOCK_SM else g.mem_clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetCurrentClocksEventReasons").clock_events

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_events

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeGpu) -> int:
        return self._check(h, "nvmlDeviceGetPcieReplayCounter").pcie_replays

    def nvmlDeviceGetPcieThroughput(self, h: FakeGpu, counter: int) -> int:
        g = self._check(h, "nvmlDeviceGetPcieThroughput")
        return g.pcie_tx_kb if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else g.pcie_rx_kb

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, error_type: int, counter: int) -> int:
        return self._check(h, "nvmlDeviceGetTotalEccErrors").ecc[(error_type, counter)]

    def nvmlDeviceGetRetiredPages(self, h: FakeGpu, cause: int) -> list[int]:
        g = self._check(h, "nvmlDeviceGetRetiredPages")
        n = g.retired_sbe if cause == 0 else g.retired_dbe
        return [0x1000 * (k + 1) for k in range(n)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeGpu) -> int:
        return int(self._check(h, "nvmlDeviceGetRetiredPagesPendingStatus").retired_pending)

    def nvmlDeviceGetRemappedRows(self, h: FakeGpu) -> tuple[int, int, int, int]:
        c, u, pending, failure = self._check(h, "nvmlDeviceGetRemappedRows").remapped
        return c, u, int(pending), int(failure)

    def nvmlDeviceGetNvLinkErrorCounter(self, h: FakeGpu, link: int, counter: int) -> int:
        return self._check(h, "nvmlDeviceGetNvLinkErrorCounter").nvlink_errors.get(counter, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[SimpleNamespace]:
        g = self._check(h, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in g.processes]

    # events
    def nvmlEventSetCreate(self) -> object:
        event_set = object()
        self._registered[id(event_set)] = set()
        return event_set

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._registered.pop(id(event_set), None)

    def nvmlDeviceRegisterEvents(self, h: FakeGpu, types: int, event_set: object) -> None:
        self._registered[id(event_set)].add(self._check(h, "nvmlDeviceRegisterEvents").index)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        # as the driver does: a lost GPU in the set fails the wait
        if any(self.devices[i].lost for i in self._registered[id(event_set)]):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        try:
            gpu, xid = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        if gpu.index not in self._registered[id(event_set)]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return SimpleNamespace(device=gpu, eventType=pynvml.nvmlEventTypeXidCriticalError,
                               eventData=xid)
