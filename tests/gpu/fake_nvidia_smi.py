"""A FAKE nvidia-smi, for the tests of tests/gpu/check.sh only: it answers the queries the check
makes from the same FAKE GPUs the exporter's ``--fake-gpus N`` describes
(monitoring/exporter/fake_nvml.py), so that the check's plumbing (start, scrape, compare, table,
exit status) runs where there is no GPU. ``FAKE_SMI_SKEW=field:delta`` plants a mismatch.

    python fake_nvidia_smi.py N ARGS...   (check.sh calls it through a small wrapper)
"""

from __future__ import annotations

import os
import sys

from monitoring.exporter import fake_nvml

MIB = 1 << 20


def field(gpu: fake_nvml.FakeGpu, name: str) -> str:
    retired = "nvmlDeviceGetRetiredPages" not in gpu.unsupported
    values: dict[str, object] = {
        "index": gpu.index, "uuid": gpu.uuid, "pci.bus_id": gpu.bus_id,
        "name": gpu.name.replace(",", " "), "driver_version": "580.95.05",
        "memory.total": gpu.total // MIB, "memory.used": gpu.used // MIB,
        "temperature.gpu": gpu.temp, "power.draw": f"{gpu.power_mw / 1000:.2f}",
        "clocks.sm": gpu.sm_clock, "clocks.mem": gpu.mem_clock, "utilization.gpu": gpu.util,
        "ecc.errors.corrected.volatile.total": gpu.ecc[(0, 0)],
        "ecc.errors.corrected.aggregate.total": gpu.ecc[(0, 1)],
        "ecc.errors.uncorrected.volatile.total": gpu.ecc[(1, 0)],
        "ecc.errors.uncorrected.aggregate.total": gpu.ecc[(1, 1)],
        "retired_pages.single_bit_ecc.count": gpu.retired_sbe if retired else "[N/A]",
        "retired_pages.double_bit.count": gpu.retired_dbe if retired else "[N/A]",
        "gpu_uuid": gpu.uuid,
        "remapped_rows.correctable": gpu.remapped[0],
        "remapped_rows.uncorrectable": gpu.remapped[1],
    }
    value = values[name]
    skew = os.environ.get("FAKE_SMI_SKEW", "")
    if skew.startswith(name + ":"):
        value = float(str(value)) + float(skew.split(":", 1)[1])
    return str(value)


def main(argv: list[str]) -> int:
    gpus = fake_nvml.gpus(int(argv[0]))
    args = argv[1:]
    if args == ["-L"]:
        for g in gpus:
            print(f"GPU {g.index}: {g.name} (UUID: {g.uuid})")
        return 0
    query = next((a for a in args if a.startswith("--query-")), "")
    kind, _, names = query.partition("=")
    if kind == "--query-gpu" or kind == "--query-remapped-rows":
        rows = [[field(g, n) for n in names.split(",")] for g in gpus]
    elif kind == "--query-compute-apps":
        holder = os.environ["ENCLAVE_GPU_CHECK_HOLDER_PID"]
        rows = [[gpus[0].uuid, holder, "1024"]]
    else:
        print(f"fake nvidia-smi: unsupported arguments {args}", file=sys.stderr)
        return 2
    for row in rows:
        print(", ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
