"""A GPU's identity, read once at start: the labels DCGM's exporter puts on every series.

``gpu`` (index), ``UUID``, ``pci_bus_id``, ``device`` (``nvidia<minor>``), ``modelName``,
``Hostname``: the names Grafana dashboard 12239 and existing rules select on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monitoring.exporter.nvml import NVML, Calls, GpuLost, text

BASE_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")


@dataclass(frozen=True)
class Gpu:
    index: int
    handle: Any  # None when the GPU was already lost at start
    uuid: str
    labels: tuple[str, ...]  # values, in BASE_LABELS order
    nvlinks: tuple[int, ...]  # NVLink links that are up


def discover(nvml: NVML, calls: Calls, hostname: str) -> list[Gpu]:
    count = calls.read("count", "nvmlDeviceGetCount") or 0
    return [_identify(nvml, calls, i, hostname) for i in range(count)]


def _identify(nvml: NVML, calls: Calls, index: int, hostname: str) -> Gpu:
    try:
        handle = calls.read(("handle", index), "nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            raise GpuLost("nvmlDeviceGetHandleByIndex")
        uuid = text(calls.read((index, "uuid"), "nvmlDeviceGetUUID", handle) or "")
        name = text(calls.read((index, "name"), "nvmlDeviceGetName", handle) or "")
        pci = calls.read((index, "pci"), "nvmlDeviceGetPciInfo", handle)
        bus_id = text(pci.busId) if pci is not None else ""
        minor = calls.read((index, "minor"), "nvmlDeviceGetMinorNumber", handle)
        links = _nvlinks(nvml, handle)
    except GpuLost:
        return Gpu(index, None, "", (str(index), "", "", "", "", hostname), ())
    device = f"nvidia{minor}" if minor is not None else ""
    return Gpu(index, handle, uuid, (str(index), uuid, bus_id, device, name, hostname), links)


def _nvlinks(nvml: NVML, handle: Any) -> tuple[int, ...]:
    """The links that are up. Not an error when there are none: most PCIe cards have none, and
    NVML answers "not supported" or "invalid argument" past the last link."""
    links = []
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            state = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                raise GpuLost("nvmlDeviceGetNvLinkState") from None
            break
        if state == nvml.NVML_FEATURE_ENABLED:
            links.append(link)
    return tuple(links)
