"""What is read from one GPU at each scrape, under DCGM's field names and units.

Cumulative DCGM fields (ECC counts, energy, PCIe replays, NVLink errors) keep DCGM's exact
names, without ``_total``: prometheus-client's text format can name a counter only with
``_total``, so they are typed gauge; ``rate()`` and ``increase()`` work on them all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitoring.exporter.devices import Gpu
from monitoring.exporter.nvml import NVML, Calls

MIB = 1 << 20
Emit = Callable[[str, tuple[str, ...], float], None]  # (metric, extra label values, value)

# name: (help, extra label names). Every series also has devices.BASE_LABELS.
GPU_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilisation (%).", ()),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("Memory (copy engine) utilisation (%).", ()),
    "DCGM_FI_DEV_ENC_UTIL": ("Encoder utilisation (%).", ()),
    "DCGM_FI_DEV_DEC_UTIL": ("Decoder utilisation (%).", ()),
    "DCGM_FI_DEV_FB_TOTAL": ("Framebuffer memory total (MiB).", ()),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (MiB).", ()),
    "DCGM_FI_DEV_FB_FREE": ("Framebuffer memory free (MiB).", ()),
    "DCGM_FI_DEV_FB_RESERVED": ("Framebuffer memory reserved by the driver (MiB).", ()),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (C).", ()),
    "DCGM_FI_DEV_MEMORY_TEMP": ("Memory temperature (C).", ()),
    "DCGM_FI_DEV_SLOWDOWN_TEMP": ("Temperature at which the GPU slows down (C).", ()),
    "DCGM_FI_DEV_SHUTDOWN_TEMP": ("Temperature at which the GPU shuts down (C).", ()),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (W).", ()),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": ("Enforced power limit (W).", ()),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (
        "Energy consumed since the driver loaded (mJ); cumulative.", ()),
    "DCGM_FI_DEV_SM_CLOCK": ("SM clock (MHz).", ()),
    "DCGM_FI_DEV_MEM_CLOCK": ("Memory clock (MHz).", ()),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": ("Clock event (throttle) reasons, NVML bitmask.", ()),
    "enclave_gpu_clock_event_active": (
        "1 while this clock event (throttle) reason holds the clocks down.", ("reason",)),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("PCIe replays; cumulative.", ()),
    "DCGM_FI_DEV_PCIE_TX_THROUGHPUT": (
        "PCIe transmit throughput (KB/s), sampled every few seconds.", ()),
    "DCGM_FI_DEV_PCIE_RX_THROUGHPUT": (
        "PCIe receive throughput (KB/s), sampled every few seconds.", ()),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("Single-bit ECC errors since the driver loaded.", ()),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("Double-bit ECC errors since the driver loaded.", ()),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("Single-bit ECC errors over the GPU's life.", ()),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("Double-bit ECC errors over the GPU's life.", ()),
    "DCGM_FI_DEV_RETIRED_SBE": ("Pages retired for multiple single-bit errors.", ()),
    "DCGM_FI_DEV_RETIRED_DBE": ("Pages retired for double-bit errors.", ()),
    "DCGM_FI_DEV_RETIRED_PENDING": ("1 if a page retirement waits for a reset.", ()),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("Rows remapped for correctable errors.", ()),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("Rows remapped for uncorrectable errors.", ()),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": ("1 if a row remap waits for a reset.", ()),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("1 if a row remap failed (the GPU needs service).", ()),
    "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": ("NVLink flit CRC errors, all links.", ()),
    "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": ("NVLink data CRC errors, all links.", ()),
    "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": ("NVLink replay errors, all links.", ()),
    "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": ("NVLink recovery errors, all links.", ()),
    "enclave_gpu_process_memory_bytes": (
        "GPU memory used by a process, with the model deployment that owns it "
        "(\"unmanaged\" if none).", ("pid", "deployment")),
}

# NVML's clock event reason bits (stable ABI; pynvml's nvmlClocksEventReason* constants).
CLOCK_EVENT_REASONS = (
    ("gpu_idle", 0x1), ("applications_clocks_setting", 0x2), ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8), ("sync_boost", 0x10), ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40), ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)
NVLINK_ERRORS = (
    ("NVML_NVLINK_ERROR_DL_CRC_FLIT", "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"),
    ("NVML_NVLINK_ERROR_DL_CRC_DATA", "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"),
    ("NVML_NVLINK_ERROR_DL_REPLAY", "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"),
    ("NVML_NVLINK_ERROR_DL_RECOVERY", "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL"),
)


def read_gpu(nvml: NVML, calls: Calls, gpu: Gpu, owner: Callable[[int], str],
             emit: Emit) -> None:
    """Every reading of one GPU. Raises ``GpuLost`` (the caller drops this GPU's samples)."""
    h, i = gpu.handle, gpu.index

    def read(what: str, call: str, *args: Any) -> Any:
        return calls.read((i, what), call, h, *args)

    util = read("util", "nvmlDeviceGetUtilizationRates")
    if util is not None:
        emit("DCGM_FI_DEV_GPU_UTIL", (), util.gpu)
        emit("DCGM_FI_DEV_MEM_COPY_UTIL", (), util.memory)
    for what, call, name in (("enc", "nvmlDeviceGetEncoderUtilization", "DCGM_FI_DEV_ENC_UTIL"),
                             ("dec", "nvmlDeviceGetDecoderUtilization", "DCGM_FI_DEV_DEC_UTIL")):
        value = read(what, call)
        if value is not None:
            emit(name, (), value[0])  # [utilisation, sampling period µs]

    v2 = getattr(nvml, "nvmlMemory_v2", None)
    mem = read("mem2", "nvmlDeviceGetMemoryInfo", v2) if v2 is not None else None
    if mem is None:  # drivers before the v2 struct
        mem = read("mem1", "nvmlDeviceGetMemoryInfo")
    if mem is not None:
        emit("DCGM_FI_DEV_FB_TOTAL", (), mem.total / MIB)
        emit("DCGM_FI_DEV_FB_USED", (), mem.used / MIB)
        emit("DCGM_FI_DEV_FB_FREE", (), mem.free / MIB)
        reserved = getattr(mem, "reserved", None)
        if reserved is not None:
            emit("DCGM_FI_DEV_FB_RESERVED", (), reserved / MIB)

    _scalar(read, emit, "temp", "nvmlDeviceGetTemperature", "DCGM_FI_DEV_GPU_TEMP",
            nvml.NVML_TEMPERATURE_GPU)
    _memory_temperature(nvml, read, emit)
    _scalar(read, emit, "slowdown", "nvmlDeviceGetTemperatureThreshold",
            "DCGM_FI_DEV_SLOWDOWN_TEMP", nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
    _scalar(read, emit, "shutdown", "nvmlDeviceGetTemperatureThreshold",
            "DCGM_FI_DEV_SHUTDOWN_TEMP", nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)

    _scalar(read, emit, "power", "nvmlDeviceGetPowerUsage", "DCGM_FI_DEV_POWER_USAGE",
            scale=1e-3)
    _scalar(read, emit, "limit", "nvmlDeviceGetEnforcedPowerLimit",
            "DCGM_FI_DEV_POWER_MGMT_LIMIT", scale=1e-3)
    _scalar(read, emit, "energy", "nvmlDeviceGetTotalEnergyConsumption",
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
    _scalar(read, emit, "sm_clock", "nvmlDeviceGetClockInfo", "DCGM_FI_DEV_SM_CLOCK",
            nvml.NVML_CLOCK_SM)
    _scalar(read, emit, "mem_clock", "nvmlDeviceGetClockInfo", "DCGM_FI_DEV_MEM_CLOCK",
            nvml.NVML_CLOCK_MEM)

    reasons = read("clock_events", "nvmlDeviceGetCurrentClocksEventReasons")
    if reasons is None:  # the older name (drivers before R535), same bits
        reasons = read("throttle", "nvmlDeviceGetCurrentClocksThrottleReasons")
    if reasons is not None:
        emit("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", (), reasons)
        for reason, bit in CLOCK_EVENT_REASONS:
            emit("enclave_gpu_clock_event_active", (reason,), 1 if reasons & bit else 0)

    _scalar(read, emit, "replay", "nvmlDeviceGetPcieReplayCounter",
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER")
    # PCIe throughput: sampled in the background (pcie.py), never during a scrape

    _ecc(nvml, read, emit)
    _retired_pages(nvml, read, emit)
    rows = read("remap", "nvmlDeviceGetRemappedRows")
    if rows is not None:
        correctable, uncorrectable, pending, failure = rows
        emit("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", (), correctable)
        emit("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", (), uncorrectable)
        emit("DCGM_FI_DEV_ROW_REMAP_PENDING", (), 1 if pending else 0)
        emit("DCGM_FI_DEV_ROW_REMAP_FAILURE", (), 1 if failure else 0)
    if gpu.nvlinks:
        _nvlink(nvml, gpu, read, emit)

    procs = read("procs", "nvmlDeviceGetComputeRunningProcesses")
    for proc in procs or ():
        used = proc.usedGpuMemory
        if used is not None:  # None: NVML may not report it (MIG, no permission)
            emit("enclave_gpu_process_memory_bytes", (str(proc.pid), owner(proc.pid)), used)


def _scalar(read: Callable[..., Any], emit: Emit, what: str, call: str, name: str,
            *args: Any, scale: float = 1.0) -> None:
    value = read(what, call, *args)
    if value is not None:
        emit(name, (), value * scale)


def _memory_temperature(nvml: NVML, read: Callable[..., Any], emit: Emit) -> None:
    field_id = getattr(nvml, "NVML_FI_DEV_MEMORY_TEMP", None)
    if field_id is None:
        return
    values = read("mem_temp", "nvmlDeviceGetFieldValues", [field_id])
    if not values or values[0].nvmlReturn != nvml.NVML_SUCCESS:
        return  # HBM temperature is not reported by every board
    field = values[0]
    member = {nvml.NVML_VALUE_TYPE_DOUBLE: "dVal", nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
              nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
              nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
              nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
              nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal"}.get(field.valueType, "uiVal")
    emit("DCGM_FI_DEV_MEMORY_TEMP", (), getattr(field.value, member))


def _ecc(nvml: NVML, read: Callable[..., Any], emit: Emit) -> None:
    for kind, error_type in (("SBE", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                             ("DBE", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
        for scope, counter in (("VOL", nvml.NVML_VOLATILE_ECC), ("AGG", nvml.NVML_AGGREGATE_ECC)):
            _scalar(read, emit, f"ecc_{kind}_{scope}", "nvmlDeviceGetTotalEccErrors",
                    f"DCGM_FI_DEV_ECC_{kind}_{scope}_TOTAL", error_type, counter)


def _retired_pages(nvml: NVML, read: Callable[..., Any], emit: Emit) -> None:
    for kind, cause in (("SBE", nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
                        ("DBE", nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)):
        pages = read(f"retired_{kind}", "nvmlDeviceGetRetiredPages", cause)
        if pages is not None:
            emit(f"DCGM_FI_DEV_RETIRED_{kind}", (), len(pages))
    pending = read("retired_pending", "nvmlDeviceGetRetiredPagesPendingStatus")
    if pending is not None:
        emit("DCGM_FI_DEV_RETIRED_PENDING", (), 1 if pending else 0)


def _nvlink(nvml: NVML, gpu: Gpu, read: Callable[..., Any], emit: Emit) -> None:
    for constant, name in NVLINK_ERRORS:
        total, seen = 0, False
        for link in gpu.nvlinks:
            value = read(f"nvlink_{constant}_{link}", "nvmlDeviceGetNvLinkErrorCounter", link,
                         getattr(nvml, constant))
            if value is not None:
                total, seen = total + value, True
        if seen:
            emit(name, (), total)
