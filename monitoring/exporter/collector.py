"""The collector: reads NVML at scrape time, one GPU's failure isolated.

Health of the exporter itself: ``enclave_gpu_up`` per GPU (0 for a lost GPU, whose readings are
dropped for that scrape while the other GPUs export), ``enclave_gpu_nvml_errors_total`` by call
and error, ``enclave_gpu_exporter_scrape_duration_seconds``, ``enclave_gpu_nvml_available`` (0
with the reason when there is no NVML: then zero GPUs are exported and nothing else fails).

``snapshot()`` reads; ``collect()`` (prometheus-client's interface, for registries and tests)
and ``exposition.render`` (the HTTP server's fast path) both present one snapshot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.exporter.deployments import Deployments
from monitoring.exporter.devices import BASE_LABELS, Gpu, discover
from monitoring.exporter.families import Family
from monitoring.exporter.nvml import NVML, Calls, GpuLost, text
from monitoring.exporter.pcie import PcieSampler
from monitoring.exporter.readings import GPU_METRICS, read_gpu
from monitoring.exporter.xid import CRITICAL_XIDS, XidWatcher

Sample = tuple[str, tuple[str, ...], float]

# name: (help, type, base label names, extra label names), besides readings.GPU_METRICS
OWN_METRICS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "enclave_gpu_up": ("1 if the GPU answered NVML at this scrape; 0 if it is lost.", "gauge",
                       BASE_LABELS, ()),
    "DCGM_FI_DEV_XID_ERRORS": ("The last XID error code seen (0: none), as DCGM.", "gauge",
                               BASE_LABELS, ()),
    "enclave_gpu_xid_errors": ("XID errors by code (critical codes always present).", "counter",
                               BASE_LABELS, ("xid",)),
    "enclave_gpu_nvml_errors": (
        "NVML calls that failed, by call and error (a call a GPU does not support is counted "
        "once, then no longer made).", "counter", (), ("call", "error")),
    "enclave_gpu_nvml_available": ("1 if NVML loaded; 0 with the reason.", "gauge", (),
                                   ("reason",)),
    "enclave_gpu_devices": ("GPUs NVML reported when the exporter started.", "gauge", (),
                            ("Hostname",)),
    "enclave_gpu_driver_info": ("The NVIDIA driver and the CUDA version it supports.", "gauge",
                                (), ("driver_version", "cuda_version", "Hostname")),
    "enclave_gpu_exporter_scrape_duration_seconds": (
        "Wall time the previous scrape took to read NVML and build the metrics.", "gauge", (),
        ()),
}


class GpuCollector(Collector):
    def __init__(self, nvml: NVML | None, *, hostname: str,
                 deployments: Deployments | None = None, unavailable: str = "",
                 background: bool = True) -> None:
        """``background``: run the XID and PCIe threads (off for one-shot reads and tests)."""
        self.nvml = nvml
        self.hostname = hostname
        self.unavailable = unavailable if nvml is None else ""
        self.deployments = deployments or Deployments(None)
        self.calls = Calls(nvml) if nvml is not None else None
        self.gpus: list[Gpu] = []
        self.driver: tuple[str, str] = ("", "")
        self.xids: XidWatcher | None = None
        self.pcie: PcieSampler | None = None
        self._last_duration = 0.0
        self._lock = threading.Lock()  # concurrent scrapes each read; the duration is shared
        if nvml is not None and self.calls is not None:
            self.gpus = discover(nvml, self.calls, hostname)
            self.driver = _driver(self.calls)
            self.pcie = PcieSampler(nvml, self.calls, self.gpus)
            self.pcie.sample()
            if background:
                self.pcie.start()
                self.xids = XidWatcher(nvml, self.calls, self.gpus)
                self.xids.start()

    def close(self) -> None:
        if self.xids is not None:
            self.xids.stop()
        if self.pcie is not None:
            self.pcie.stop()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only; registering must not touch NVML

    def collect(self) -> Iterator[Metric]:
        for family in self.snapshot():
            cls = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            metric = cls(family.name, family.doc, labels=[*family.base, *family.extra])
            for base, extra, value in family.samples:
                metric.add_metric([*base, *extra], value)
            yield metric

    def snapshot(self) -> list[Family]:
        start = time.perf_counter()
        families = {name: Family(name, doc, "gauge", BASE_LABELS, extra)
                    for name, (doc, extra) in GPU_METRICS.items()}
        families.update({name: Family(name, doc, typ, base, extra)
                         for name, (doc, typ, base, extra) in OWN_METRICS.items()})
        up = families["enclave_gpu_up"]
        self.deployments.refresh()
        owner: Callable[[int], str] = self.deployments.owner
        for gpu in self.gpus:
            samples = self._read(gpu, owner)
            up.add(gpu.labels, (), 0 if samples is None else 1)
            for name, extra, value in samples or ():
                families[name].add(gpu.labels, extra, value)
        self._add_xids(families)
        self._add_health(families)
        with self._lock:
            duration = self._last_duration
            self._last_duration = time.perf_counter() - start
        families["enclave_gpu_exporter_scrape_duration_seconds"].add((), (), duration)
        return [f for f in families.values() if f.samples]

    def _read(self, gpu: Gpu, owner: Callable[[int], str]) -> list[Sample] | None:
        if gpu.handle is None or self.nvml is None or self.calls is None:
            return None
        samples: list[Sample] = []

        def emit(name: str, extra: tuple[str, ...], value: float) -> None:
            samples.append((name, extra, value))

        try:
            read_gpu(self.nvml, self.calls, gpu, owner, emit)
        except GpuLost:
            return None
        if self.pcie is not None:
            tx, rx = self.pcie.get(gpu.index)
            if tx is not None:
                emit("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", (), tx)
            if rx is not None:
                emit("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", (), rx)
        return samples

    def _add_xids(self, families: dict[str, Family]) -> None:
        if self.xids is None:
            counts: dict[tuple[str, int], int] = {}
            last: dict[str, int] = {}
        else:
            counts, last = self.xids.counts()
        for gpu in self.gpus:
            if not gpu.uuid:
                continue
            families["DCGM_FI_DEV_XID_ERRORS"].add(gpu.labels, (), last.get(gpu.uuid, 0))
            codes = set(CRITICAL_XIDS) | {x for (u, x) in counts if u == gpu.uuid}
            for xid in sorted(codes):
                families["enclave_gpu_xid_errors"].add(gpu.labels, (str(xid),),
                                                       counts.get((gpu.uuid, xid), 0))

    def _add_health(self, families: dict[str, Family]) -> None:
        families["enclave_gpu_nvml_available"].add((), (self.unavailable,),
                                                   0 if self.nvml is None else 1)
        families["enclave_gpu_devices"].add((), (self.hostname,), len(self.gpus))
        if self.nvml is not None:
            families["enclave_gpu_driver_info"].add((), (*self.driver, self.hostname), 1)
        if self.calls is not None:
            for (call, error), n in self.calls.error_counts():
                families["enclave_gpu_nvml_errors"].add((), (call, error), n)


def _driver(calls: Calls) -> tuple[str, str]:
    driver = calls.read("driver", "nvmlSystemGetDriverVersion")
    cuda = calls.read("cuda", "nvmlSystemGetCudaDriverVersion_v2")
    cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else ""
    return text(driver or ""), cuda_text
