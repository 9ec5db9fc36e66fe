"""PCIe throughput, sampled in a background thread.

``nvmlDeviceGetPcieThroughput`` measures the bus over 20 ms per call (NVML's documentation):
two calls per GPU in a scrape would make 8 GPUs cost over 300 ms of waiting, and every
concurrent scrape again. A thread samples every few seconds; scrapes read the last values.
"""

from __future__ import annotations

from monitoring.exporter.devices import Gpu
from monitoring.exporter.nvml import NVML, Calls, GpuLost
from monitoring.exporter.worker import Worker

INTERVAL_S = 5.0


class PcieSampler(Worker):
    name = "pcie-sampler"
    join_timeout_s = INTERVAL_S + 1

    def __init__(self, nvml: NVML, calls: Calls, gpus: list[Gpu]) -> None:
        super().__init__()
        self.nvml = nvml
        self.calls = calls
        self.gpus = [g for g in gpus if g.handle is not None]
        self._values: dict[int, tuple[int | None, int | None]] = {}

    def sample(self) -> None:
        for gpu in self.gpus:
            try:
                tx = self.calls.read((gpu.index, "pcie_tx"), "nvmlDeviceGetPcieThroughput",
                                     gpu.handle, self.nvml.NVML_PCIE_UTIL_TX_BYTES)
                rx = self.calls.read((gpu.index, "pcie_rx"), "nvmlDeviceGetPcieThroughput",
                                     gpu.handle, self.nvml.NVML_PCIE_UTIL_RX_BYTES)
            except GpuLost:
                tx = rx = None
            self._values[gpu.index] = (tx, rx)  # one assignment: readers see old or new

    def get(self, index: int) -> tuple[int | None, int | None]:
        return self._values.get(index, (None, None))

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.sample()
