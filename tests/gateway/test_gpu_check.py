"""tests/gpu/check.sh, the one-command check of the exporter on a real GPU, run here over the
exporter's FAKE NVML and a FAKE nvidia-smi describing the same GPUs (this machine has no GPU):
its plumbing works, it names a planted mismatch and exits 1, and says when there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

CHECK = REPO / "tests" / "gpu" / "check.sh"


def run_check(tmp_path: Path, *, fake_gpus: int | None = 2, smi: str | None = None,
              **env: str) -> subprocess.CompletedProcess[str]:
    if smi is None:
        smi = str(tmp_path / "nvidia-smi")
        fake = REPO / "tests" / "gpu" / "fake_nvidia_smi.py"
        Path(smi).write_text(f'#!/bin/sh\nexec {sys.executable} {fake} {fake_gpus} "$@"\n')
        Path(smi).chmod(0o755)
    full = {**os.environ, "PYTHON": sys.executable, "NVIDIA_SMI": smi, **env}
    if fake_gpus is not None:
        full["ENCLAVE_GPU_CHECK_FAKE"] = str(fake_gpus)
    return subprocess.run(["bash", str(CHECK)], env=full, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_the_check_compares_every_reading_and_passes_when_they_agree(tmp_path: Path) -> None:
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for what in ("enclave_gpu_up", "DCGM labels", "label pci_bus_id", "memory.total",
                 "memory.used", "temperature.gpu", "power.draw", "clocks.sm",
                 "utilization.gpu", "ecc.errors.corrected.volatile.total",
                 "retired_pages.double_bit.count", "remapped_rows.correctable",
                 "listed"):
        assert what in out, what
    assert "0 mismatched, 2 not supported here" in out  # the odd fake GPU has no page retirement
    assert "MISMATCH" not in out


def test_a_planted_mismatch_is_named_and_fails_the_check(tmp_path: Path) -> None:
    result = run_check(tmp_path, FAKE_SMI_SKEW="temperature.gpu:10")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "temperature.gpu" in line]
    assert len(lines) == 2 and all("MISMATCH (±3)" in line for line in lines), lines
    assert "2 mismatched" in result.stdout


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    result = run_check(tmp_path, fake_gpus=None, smi="/bin/false")
    assert result.returncode == 2
    assert "no NVIDIA GPU here" in result.stderr
