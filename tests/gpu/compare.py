"""Compare the GPU exporter's readings with nvidia-smi's, GPU by GPU; print a table; exit 1 on a
mismatch. Run by ``tests/gpu/check.sh`` (which starts the exporter), with only the exporter's
own dependencies (prometheus-client) importable: no vLLM, no torch.

    python compare.py EXPORTER_URL [--nvidia-smi PATH] [--holder-pid PID] [--expect-gpus N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

MIB = 1 << 20
BASE_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"}
# nvidia-smi field -> (exporter series, scale to nvidia-smi's unit, tolerance: absolute, relative)
FIELDS: dict[str, tuple[str, float, float, float]] = {
    "memory.total": ("DCGM_FI_DEV_FB_TOTAL", 1.0, 1.0, 0.0),
    "memory.used": ("DCGM_FI_DEV_FB_USED", 1.0, 256.0, 0.05),  # moves between the two reads
    "temperature.gpu": ("DCGM_FI_DEV_GPU_TEMP", 1.0, 3.0, 0.0),
    "power.draw": ("DCGM_FI_DEV_POWER_USAGE", 1.0, 30.0, 0.15),
    "clocks.sm": ("DCGM_FI_DEV_SM_CLOCK", 1.0, 150.0, 0.15),
    "clocks.mem": ("DCGM_FI_DEV_MEM_CLOCK", 1.0, 150.0, 0.15),
    "utilization.gpu": ("DCGM_FI_DEV_GPU_UTIL", 1.0, 25.0, 0.0),  # a sampled percentage
    "ecc.errors.corrected.volatile.total": ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 1.0, 0.0, 0.0),
    "ecc.errors.uncorrected.volatile.total": ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 1.0, 0.0, 0.0),
    "ecc.errors.corrected.aggregate.total": ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 1.0, 0.0, 0.0),
    "ecc.errors.uncorrected.aggregate.total": ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 1.0, 0.0, 0.0),
    "retired_pages.single_bit_ecc.count": ("DCGM_FI_DEV_RETIRED_SBE", 1.0, 0.0, 0.0),
    "retired_pages.double_bit.count": ("DCGM_FI_DEV_RETIRED_DBE", 1.0, 0.0, 0.0),
}
REMAPPED: dict[str, str] = {
    "remapped_rows.correctable": "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "remapped_rows.uncorrectable": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
}
UNSUPPORTED = ("[N/A]", "[Not Supported]", "N/A", "Not Supported", "[Unknown Error]")


@dataclass
class Row:
    gpu: str
    check: str
    exporter: str
    smi: str
    tolerance: str
    ok: bool | None  # None: not supported on this GPU, said so, not a failure


def smi(path: str, *args: str) -> list[list[str]]:
    out = subprocess.run([path, *args, "--format=csv,noheader,nounits"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return series


def number(cell: str) -> float | None:
    """A reading, or None for what nvidia-smi could not give: "[N/A]", "[Not Supported]",
    "[Insufficient Permissions]", "[GPU is lost]"..."""
    if not cell or cell in UNSUPPORTED or cell.startswith("["):
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def compare(url: str, nvidia_smi: str, holder_pid: int | None, expect: int | None) -> list[Row]:
    fields = list(FIELDS)
    query = "--query-gpu=index,uuid,pci.bus_id,name," + ",".join(fields)
    # Read before and after the scrape: a reading that moves (clocks, power, utilisation)
    # is compared with the range nvidia-smi saw around it.
    gpus = smi(nvidia_smi, query)
    series = scrape(url)
    after = {row[1]: row[4:] for row in smi(nvidia_smi, query)}
    rows: list[Row] = []
    if expect is not None:
        rows.append(Row("-", "GPUs", str(len(series.get("enclave_gpu_up", []))), str(len(gpus)),
                        f"= {expect}", len(gpus) == expect
                        and len(series.get("enclave_gpu_up", [])) == expect))

    def reading(name: str, uuid: str) -> float | None:
        for labels, value in series.get(name, []):
            if labels.get("UUID") == uuid:
                return value
        return None

    for index, uuid, bus_id, name, *values in gpus:
        up = reading("enclave_gpu_up", uuid)
        rows.append(Row(index, "enclave_gpu_up", str(up), "-", "= 1", up == 1.0))
        labels = next((lb for lb, _ in series.get("DCGM_FI_DEV_GPU_TEMP", [])
                       if lb.get("UUID") == uuid), None)
        rows.append(Row(index, "DCGM labels", ",".join(sorted(labels or {})), "-",
                        "gpu UUID pci_bus_id device modelName Hostname",
                        labels is not None and set(labels) >= BASE_LABELS))
        if labels is not None:
            for label, want in (("gpu", index), ("modelName", name), ("pci_bus_id", bus_id)):
                rows.append(Row(index, f"label {label}", labels.get(label, "?"), want, "equal",
                                labels.get(label, "").lower() == want.lower()))
        later = after.get(uuid, values)
        for field, cell, cell_after in zip(fields, values, later, strict=True):
            metric, scale, absolute, relative = FIELDS[field]
            want = number(cell)
            got = reading(metric, uuid)
            if want is None:
                rows.append(Row(index, field, _fmt(got), cell, "not supported", None))
                continue
            if got is None:
                rows.append(Row(index, field, "missing", cell, metric, False))
                continue
            got *= scale
            second = number(cell_after)
            low, high = (want, want) if second is None else (min(want, second),
                                                             max(want, second))
            allowed = max(absolute, relative * abs(high))
            seen = _fmt(low) if low == high else f"{_fmt(low)}..{_fmt(high)}"
            rows.append(Row(index, field, _fmt(got), seen, f"±{_fmt(allowed)}",
                            low - allowed <= got <= high + allowed))
    rows += _remapped(nvidia_smi, series)
    rows += _processes(nvidia_smi, series, holder_pid)
    return rows


def _remapped(nvidia_smi: str, series: dict[str, list[tuple[dict[str, str], float]]],
              ) -> list[Row]:
    try:
        table = smi(nvidia_smi, "--query-remapped-rows=gpu_uuid," + ",".join(REMAPPED))
    except subprocess.CalledProcessError:
        return [Row("-", "remapped rows", "-", "query not supported", "-", None)]
    rows = []
    for uuid, *cells in table:
        for (field, metric), cell in zip(REMAPPED.items(), cells, strict=True):
            want = number(cell)
            got = next((v for lb, v in series.get(metric, []) if lb.get("UUID") == uuid), None)
            if want is None:
                rows.append(Row(uuid[:12], field, _fmt(got), cell, "not supported", None))
            else:
                rows.append(Row(uuid[:12], field, _fmt(got), _fmt(want), "equal", got == want))
    return rows


def _processes(nvidia_smi: str, series: dict[str, list[tuple[dict[str, str], float]]],
               holder_pid: int | None) -> list[Row]:
    apps = smi(nvidia_smi, "--query-compute-apps=gpu_uuid,pid,used_memory")
    exported = {(labels.get("UUID", ""), labels["pid"]): value for labels, value in
                series.get("enclave_gpu_process_memory_bytes", [])}
    rows = []
    if holder_pid is None and not apps:
        rows.append(Row("-", "process memory", "-", "no process holds GPU memory", "-", None))
    for uuid, pid, used in apps:
        want = number(used)
        got = exported.get((uuid, pid))
        if want is None:
            rows.append(Row(uuid[:12], f"process {pid} memory", _fmt(got), used,
                            "not reported", None))
            continue
        rows.append(Row(uuid[:12], f"process {pid} memory (MiB)",
                        _fmt(got / MIB) if got is not None else "missing", _fmt(want), "±2",
                        got is not None and abs(got / MIB - want) <= 2))
    if holder_pid is not None:
        # Both read NVML, so both list the holder or neither does (a container's own PID
        # namespace: NVML reports host PIDs; then the rows above still compare every process).
        in_exporter = any(pid == str(holder_pid) for _, pid in exported)
        in_smi = any(pid == str(holder_pid) for _, pid, _ in apps)
        rows.append(Row("-", f"holder {holder_pid} listed", str(in_exporter), str(in_smi),
                        "the same", None if not in_exporter and not in_smi
                        else in_exporter == in_smi))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--nvidia-smi", default="nvidia-smi")
    parser.add_argument("--holder-pid", type=int, default=None)
    parser.add_argument("--expect-gpus", type=int, default=None)
    args = parser.parse_args()
    rows = compare(args.url, args.nvidia_smi, args.holder_pid, args.expect_gpus)
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("gpu", "check", "exporter", "smi")]
    print(f"{'gpu':{widths[0]}}  {'check':{widths[1]}}  {'exporter':{widths[2]}}  "
          f"{'nvidia-smi':{widths[3]}}  result")
    for r in rows:
        verdict = "n/a (" + r.tolerance + ")" if r.ok is None else (
            "ok" if r.ok else "MISMATCH") + f" ({r.tolerance})"
        print(f"{r.gpu:{widths[0]}}  {r.check:{widths[1]}}  {r.exporter:{widths[2]}}  "
              f"{r.smi:{widths[3]}}  {verdict}")
    failed = [r for r in rows if r.ok is False]
    print(f"{len(rows)} checks: {len(failed)} mismatched, "
          f"{sum(r.ok is None for r in rows)} not supported here")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
