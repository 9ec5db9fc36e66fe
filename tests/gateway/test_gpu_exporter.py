"""The GPU exporter against a FAKE NVML (this machine has no NVIDIA GPU), and without NVML."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from monitoring.exporter import fake_nvml
from monitoring.exporter.collector import GpuCollector
from monitoring.exporter.deployments import Deployments
from monitoring.exporter.exposition import Renderer
from monitoring.exporter.fake_nvml import MIB, FakeGpu, FakeNVML
from monitoring.exporter.families import Family
from monitoring.exporter.xid import CRITICAL_XIDS
from tests.support import REPO, free_port, stop_process

HOST = "gpu-host-1"


class Exporter:
    def __init__(self, nvml: FakeNVML | None, engines_file: Path | None = None,
                 background: bool = True, why: str = "") -> None:
        self.nvml = nvml
        self.collector = GpuCollector(nvml, hostname=HOST, deployments=Deployments(engines_file),
                                      unavailable=why, background=background)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)

    def gpu(self, name: str, index: int, **labels: str) -> float | None:
        g = self.nvml.devices[index] if self.nvml else None
        base = {"gpu": str(index), "UUID": g.uuid if g else "", "Hostname": HOST,
                "pci_bus_id": g.bus_id if g else "", "device": f"nvidia{index}",
                "modelName": g.name if g else ""}
        return self.registry.get_sample_value(name, {**base, **labels})

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def names(self) -> set[str]:
        return {s.name for m in self.registry.collect() for s in m.samples}


@pytest.fixture
def two() -> Iterator[Exporter]:
    devices = fake_nvml.gpus(2)
    devices[1] = FakeGpu(1, "GPU-second", name="NVIDIA A100-SXM4-80GB (fake)",
                         bus_id="00000000:87:00.0", util=91, temp=88, slowdown=90,
                         clock_events=0x40 | 0x4, remapped=(0, 2, True, True), nvlinks=3,
                         nvlink_errors={2: 5, 3: 1, 0: 7, 1: 0}, mem_temp=None)
    exporter = Exporter(FakeNVML(devices))
    yield exporter
    exporter.collector.close()


def test_every_family_has_each_gpus_values_and_dcgm_labels(two: Exporter) -> None:
    g0, g1 = two.nvml.devices  # type: ignore[union-attr]
    expected = {
        "DCGM_FI_DEV_GPU_UTIL": (g0.util, g1.util),
        "DCGM_FI_DEV_MEM_COPY_UTIL": (g0.mem_util, g1.mem_util),
        "DCGM_FI_DEV_ENC_UTIL": (0, 0), "DCGM_FI_DEV_DEC_UTIL": (0, 0),
        "DCGM_FI_DEV_FB_USED": (g0.used / MIB, g1.used / MIB),
        "DCGM_FI_DEV_FB_RESERVED": (g0.reserved / MIB, g1.reserved / MIB),
        "DCGM_FI_DEV_FB_FREE": ((g0.total - g0.used - g0.reserved) / MIB,
                                (g1.total - g1.used - g1.reserved) / MIB),
        "DCGM_FI_DEV_FB_TOTAL": (81559, 81559),
        "DCGM_FI_DEV_GPU_TEMP": (54, 88), "DCGM_FI_DEV_MEMORY_TEMP": (61, None),
        "DCGM_FI_DEV_SLOWDOWN_TEMP": (90, 90), "DCGM_FI_DEV_SHUTDOWN_TEMP": (95, 95),
        "DCGM_FI_DEV_POWER_USAGE": (312.5, 312.5), "DCGM_FI_DEV_POWER_MGMT_LIMIT": (700, 700),
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (g0.energy_mj, g1.energy_mj),
        "DCGM_FI_DEV_SM_CLOCK": (1980, 1980), "DCGM_FI_DEV_MEM_CLOCK": (2619, 2619),
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": (0x4, 0x44),
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": (3, 3),
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT": (1200, 1200),
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT": (3400, 3400),
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": (5, 5), "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": (17, 17),
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": (0, 0), "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": (1, 1),
        "DCGM_FI_DEV_RETIRED_SBE": (2, 2), "DCGM_FI_DEV_RETIRED_DBE": (1, 1),
        "DCGM_FI_DEV_RETIRED_PENDING": (0, 0),
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": (4, 0),
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": (0, 2),
        "DCGM_FI_DEV_ROW_REMAP_PENDING": (0, 1), "DCGM_FI_DEV_ROW_REMAP_FAILURE": (0, 1),
        # three links up on the second GPU, each reporting the same counts
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": (None, 15),
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": (None, 3),
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": (None, 21),
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": (None, 0),
        "DCGM_FI_DEV_XID_ERRORS": (0, 0),
        "enclave_gpu_up": (1, 1),
    }
    for name, values in expected.items():
        for index, want in enumerate(values):
            assert two.gpu(name, index) == want, (name, index)
    assert two.gpu("enclave_gpu_clock_event_active", 1, reason="hw_thermal_slowdown") == 1
    assert two.gpu("enclave_gpu_clock_event_active", 1, reason="sw_power_cap") == 1
    assert two.gpu("enclave_gpu_clock_event_active", 1, reason="hw_slowdown") == 0
    assert two.gpu("enclave_gpu_clock_event_active", 0, reason="hw_thermal_slowdown") == 0
    for xid in CRITICAL_XIDS:  # present at 0, so that increase() sees the first one
        assert two.gpu("enclave_gpu_xid_errors_total", 0, xid=str(xid)) == 0
    assert two.gpu("enclave_gpu_process_memory_bytes", 0, pid=str(os.getpid()),
                   deployment="unmanaged") == 1 << 30
    assert two.value("enclave_gpu_driver_info", driver_version="580.95.05",
                     cuda_version="13.0", Hostname=HOST) == 1
    assert two.value("enclave_gpu_devices", Hostname=HOST) == 2
    assert two.value("enclave_gpu_nvml_available", reason="") == 1
    assert two.value("enclave_gpu_exporter_scrape_duration_seconds") is not None


def test_an_xid_event_increments_the_counter_by_code(two: Exporter) -> None:
    nvml = two.nvml
    assert nvml is not None
    nvml.inject_xid(1, 79)
    nvml.inject_xid(1, 79)
    nvml.inject_xid(0, 13)  # not a critical code: its own series appears
    deadline = time.monotonic() + 5
    while two.gpu("enclave_gpu_xid_errors_total", 0, xid="13") != 1:
        assert time.monotonic() < deadline, "XID events not seen within 5 s"
        time.sleep(0.05)
    assert two.gpu("enclave_gpu_xid_errors_total", 1, xid="79") == 2
    assert two.gpu("enclave_gpu_xid_errors_total", 0, xid="79") == 0
    assert two.gpu("DCGM_FI_DEV_XID_ERRORS", 1) == 79
    assert two.gpu("DCGM_FI_DEV_XID_ERRORS", 0) == 13


def test_a_lost_gpu_is_reported_and_the_other_keeps_exporting(two: Exporter) -> None:
    assert two.gpu("DCGM_FI_DEV_GPU_TEMP", 1) == 88
    two.nvml.devices[1].lost = True  # type: ignore[union-attr]
    assert two.gpu("enclave_gpu_up", 1) == 0
    assert two.gpu("DCGM_FI_DEV_GPU_TEMP", 1) is None  # no half-read GPU
    assert two.gpu("DCGM_FI_DEV_FB_USED", 1) is None
    assert two.gpu("enclave_gpu_up", 0) == 1
    assert two.gpu("DCGM_FI_DEV_GPU_TEMP", 0) == 54
    assert two.value("enclave_gpu_nvml_errors_total", call="nvmlDeviceGetUtilizationRates",
                     error="gpu_is_lost") >= 1  # type: ignore[operator]


def test_a_gpu_lost_before_start_is_exported_as_down() -> None:
    devices = fake_nvml.gpus(2)
    devices[0].lost = True
    exporter = Exporter(FakeNVML(devices), background=False)
    assert exporter.value("enclave_gpu_up", gpu="0", UUID="", pci_bus_id="", device="",
                          modelName="", Hostname=HOST) == 0
    assert exporter.gpu("enclave_gpu_up", 1) == 1
    assert exporter.gpu("DCGM_FI_DEV_GPU_TEMP", 1) == 54


def test_an_unsupported_call_is_counted_once_and_not_fatal() -> None:
    devices = fake_nvml.gpus(2)
    devices[0].unsupported = {"nvmlDeviceGetPowerUsage", "nvmlDeviceGetRemappedRows"}
    nvml = FakeNVML(devices)
    exporter = Exporter(nvml, background=False)
    for _ in range(3):
        assert exporter.gpu("DCGM_FI_DEV_POWER_USAGE", 0) is None
        assert exporter.gpu("DCGM_FI_DEV_POWER_USAGE", 1) == 312.5
        assert exporter.gpu("DCGM_FI_DEV_GPU_TEMP", 0) == 54
        assert exporter.gpu("enclave_gpu_up", 0) == 1
    assert exporter.value("enclave_gpu_nvml_errors_total", call="nvmlDeviceGetPowerUsage",
                          error="not_supported") == 1
    assert exporter.value("enclave_gpu_nvml_errors_total", call="nvmlDeviceGetRemappedRows",
                          error="not_supported") == 1
    assert exporter.gpu("DCGM_FI_DEV_ROW_REMAP_FAILURE", 0) is None
    assert exporter.gpu("DCGM_FI_DEV_ROW_REMAP_FAILURE", 1) == 0


def test_calls_that_fail_otherwise_are_counted_and_not_fatal() -> None:
    """An older nvidia-ml-py (no such function), a driver older than the struct version asked
    for (pynvml's NVMLLibraryMismatchError), a driver before R535 (only the older name of the
    clock-events call)."""
    devices = fake_nvml.gpus(2)
    devices[0].processes.append((4242, 123))
    devices[0].clock_events = 0x40
    nvml = FakeNVML(devices)

    def mismatch(handle: object) -> None:
        raise pynvml.NVMLLibraryMismatchError("no nvmlDeviceGetComputeRunningProcesses_v3")

    def missing(handle: object) -> None:
        raise AttributeError("nvmlDeviceGetCurrentClocksEventReasons")

    nvml.nvmlDeviceGetComputeRunningProcesses = mismatch  # type: ignore[method-assign]
    nvml.nvmlDeviceGetCurrentClocksEventReasons = missing  # type: ignore[method-assign]
    exporter = Exporter(nvml, background=False)
    for _ in range(2):
        assert exporter.gpu("enclave_gpu_up", 0) == 1
        assert exporter.gpu("DCGM_FI_DEV_GPU_TEMP", 1) == 54
        assert exporter.gpu("enclave_gpu_clock_event_active", 0,
                            reason="hw_thermal_slowdown") == 1  # from the older call
        assert "enclave_gpu_process_memory_bytes" not in exporter.names()
    assert exporter.value("enclave_gpu_nvml_errors_total",
                          call="nvmlDeviceGetComputeRunningProcesses",
                          error="NVMLLibraryMismatchError") == 2  # once per GPU, then skipped
    assert exporter.value("enclave_gpu_nvml_errors_total",
                          call="nvmlDeviceGetCurrentClocksEventReasons",
                          error="function_not_found") == 2


def test_xids_keep_coming_from_the_other_gpus_after_one_is_lost(two: Exporter) -> None:
    nvml = two.nvml
    assert nvml is not None
    nvml.devices[1].lost = True  # the driver then fails waits on the event set
    time.sleep(0.2)
    nvml.inject_xid(0, 48)
    deadline = time.monotonic() + 10
    while two.gpu("enclave_gpu_xid_errors_total", 0, xid="48") != 1:
        assert time.monotonic() < deadline, "XID from the healthy GPU not seen"
        time.sleep(0.1)
    assert two.value("enclave_gpu_nvml_errors_total", call="nvmlEventSetWait_v2",
                     error="gpu_is_lost")


def test_without_nvml_zero_gpus_and_the_reason() -> None:
    exporter = Exporter(None, why="NVML is not available (library_not_found)")
    assert exporter.value("enclave_gpu_nvml_available",
                          reason="NVML is not available (library_not_found)") == 0
    assert exporter.value("enclave_gpu_devices", Hostname=HOST) == 0
    assert not any(n.startswith("DCGM_") for n in exporter.names())


@pytest.fixture
def engine_session(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A process started the way the supervisor starts an engine (its own session), with a
    child: (engines.json, engine pid, child pid)."""
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], start_new_session=True,
                              stdout=subprocess.PIPE)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    engines = tmp_path / "engines.json"
    engines.write_text(json.dumps({"demo-chat-v1": {"pid": leader.pid, "state": "healthy"},
                                   "minilm-embed-v1": {"pid": None, "state": "starting"}}))
    yield engines, leader.pid, child
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    leader.stdout.close()


def test_gpu_processes_are_labelled_with_the_deployment_that_owns_them(
        engine_session: tuple[Path, int, int]) -> None:
    engines, leader, child = engine_session
    devices = fake_nvml.gpus(1)
    devices[0].processes = [(child, 40 << 30), (leader, 300 * MIB), (1, 5 * MIB), (0, None)]
    exporter = Exporter(FakeNVML(devices), engines_file=engines, background=False)
    # vLLM's EngineCore (the engine's child) is the process holding the GPU memory
    assert exporter.gpu("enclave_gpu_process_memory_bytes", 0, pid=str(child),
                        deployment="demo-chat-v1") == 40 << 30
    assert exporter.gpu("enclave_gpu_process_memory_bytes", 0, pid=str(leader),
                        deployment="demo-chat-v1") == 300 * MIB
    assert exporter.gpu("enclave_gpu_process_memory_bytes", 0, pid="1",
                        deployment="unmanaged") == 5 * MIB
    # the supervisor restarted the engine under another deployment name: seen at next scrape
    engines.write_text(json.dumps({"demo-chat-v2": {"pid": leader}}))
    assert exporter.gpu("enclave_gpu_process_memory_bytes", 0, pid=str(child),
                        deployment="demo-chat-v2") == 40 << 30


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=5).text
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


NO_NVML = """
class NVMLError(Exception):
    def __init__(self, value):
        self.value = value
NVML_ERROR_LIBRARY_NOT_FOUND = 12
def nvmlInit():
    raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
"""


def _serve(log: Path, *args: str, no_nvml: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    if no_nvml:  # as on a host without the NVIDIA driver, also when the test host has one
        stub = log.parent / "no-nvml"
        stub.mkdir(exist_ok=True)
        (stub / "pynvml.py").write_text(NO_NVML)
        env["PYTHONPATH"] = f"{stub}{os.pathsep}{REPO}"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli.main", "exporter",
                                 "--port", str(port), *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=1)
            return proc, url
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_enclave_exporter_without_a_gpu_serves_zero_gpus_and_says_why(tmp_path: Path) -> None:
    log = tmp_path / "exporter.log"
    proc, url = _serve(log, no_nvml=True)
    try:
        text = httpx.get(url, timeout=5).text
        assert "DCGM_FI_DEV" not in text
        assert 'enclave_gpu_devices{Hostname=' in text
        assert ('enclave_gpu_nvml_available{reason="NVML is not available (library_not_found)'
                in text)
    finally:
        stop_process(proc, 5)
    assert proc.returncode == 0
    assert log.read_text().count("exporting zero GPUs") == 1


def test_enclave_exporter_with_fake_gpus_serves_them_over_http(tmp_path: Path) -> None:
    log = tmp_path / "exporter.log"
    proc, url = _serve(log, "--fake-gpus", "2", "--hostname", HOST)
    try:
        first = _scrape(url)
        assert sum(1 for k in first if k.startswith("enclave_gpu_up[")) == 2
        assert any(k.startswith("DCGM_FI_DEV_GPU_TEMP[") and "('gpu', '1')" in k for k in first)
        assert "process_resident_memory_bytes[]" in first
    finally:
        stop_process(proc, 5)
    assert proc.returncode == 0
    assert "FAKE NVML" in log.read_text()


def test_enclave_exporter_once_prints_one_scrape() -> None:
    out = subprocess.run([sys.executable, "-m", "serving.cli.main", "exporter", "--once",
                          "--fake-gpus", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    names = {f.name for f in text_string_to_metric_families(out)}
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "enclave_gpu_up"} <= names


def test_the_fast_text_exposition_says_what_prometheus_client_says() -> None:
    devices = fake_nvml.gpus(3)
    devices[2].name = 'Odd "name" \\ with\nnewline'
    devices[0].processes.append((4242, 123))
    collector = GpuCollector(FakeNVML(devices), hostname='host"1', background=False)
    snapshot = collector.snapshot()
    ours = text_string_to_metric_families(Renderer().render(snapshot))
    registry = CollectorRegistry()
    registry.register(collector)
    theirs = text_string_to_metric_families(generate_latest(registry).decode())

    def samples(families: Iterable[Metric]) -> set[tuple[str, tuple[tuple[str, str], ...],
                                                         float]]:
        return {(s.name, tuple(sorted(s.labels.items())), s.value) for f in families
                for s in f.samples if s.name != "enclave_gpu_exporter_scrape_duration_seconds"}

    ours, theirs = list(ours), list(theirs)
    mine, reference = samples(ours), samples(theirs)
    assert len(mine) > 150
    assert mine == reference
    assert {(f.name, f.documentation, f.type) for f in ours} == {
        (f.name, f.documentation, f.type) for f in theirs}
    assert any(dict(labels).get("modelName") == devices[2].name for _, labels, _ in mine)


def test_non_finite_values_are_written_as_prometheus_reads_them() -> None:
    family = Family("x", "a \\ \"quoted\" doc", "gauge", ("gpu",))
    for i, value in enumerate((float("nan"), float("inf"), float("-inf"), 2.5, 1e20)):
        family.add((str(i),), (), value)
    parsed = next(iter(text_string_to_metric_families(Renderer().render([family]))))
    values = [s.value for s in parsed.samples]
    assert values[0] != values[0]  # NaN
    assert values[1:] == [float("inf"), float("-inf"), 2.5, 1e20]
    assert parsed.documentation == 'a \\ "quoted" doc'


def test_the_http_endpoint_compresses_for_prometheus_and_answers_404_elsewhere(
        tmp_path: Path) -> None:
    proc, url = _serve(tmp_path / "exporter.log", "--fake-gpus", "1")
    try:
        zipped = httpx.get(url, headers={"Accept-Encoding": "gzip"}, timeout=5)
        assert zipped.headers["content-encoding"] == "gzip"
        assert "DCGM_FI_DEV_GPU_TEMP{" in zipped.text  # httpx decompresses
        assert zipped.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert httpx.get(url.replace("/metrics", "/nope"), timeout=5).status_code == 404
    finally:
        stop_process(proc, 5)
