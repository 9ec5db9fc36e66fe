"""`enclave bench-exporter`: CPU per scrape and resident memory over many scrapes.

Two exporter processes run side by side over a FAKE NVML (no GPU needed): one describing N GPUs,
one describing none (the baseline: HTTP, exposition and the exporter's own health). Scrapes
alternate between them, so both see the same machine noise; CPU is read from /proc for each
process, so it counts only the exporter's own work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import click

from serving.bench.targets import free_port

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    gpus: int
    proc: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(cls, gpus: int) -> Target:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitoring.exporter", "--port", str(port),
             "--fake-gpus", str(gpus), "--engines-file", os.devnull],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = cls(gpus, proc, f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 30
        while True:
            try:
                target.scrape()
                return target
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise click.ClickException("the exporter did not start") from None
                time.sleep(0.1)

    def scrape(self) -> int:
        # as Prometheus asks: compressed
        request = urllib.request.Request(  # noqa: S310 (http on loopback)
            self.url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (loopback)
            return len(resp.read())

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@click.command("bench-exporter")
@click.option("--gpus", default=8, show_default=True, help="Fake GPUs in the measured exporter.")
@click.option("--scrapes", default=10_000, show_default=True, help="Scrapes of each exporter.")
def bench_exporter(gpus: int, scrapes: int) -> None:
    """Measure the GPU exporter: CPU per scrape and memory over SCRAPES scrapes (fake NVML)."""
    measured, baseline = Target.start(gpus), Target.start(0)
    try:
        size = measured.scrape()
        warm = min(500, scrapes // 10)
        for _ in range(warm):
            measured.scrape()
            baseline.scrape()
        rss_start = measured.rss_mib()
        cpu0 = (measured.cpu_s(), baseline.cpu_s())
        rss_points = []
        wall = time.perf_counter()
        for i in range(1, scrapes + 1):
            measured.scrape()
            baseline.scrape()
            if i % (scrapes // 10 or 1) == 0:
                rss_points.append(measured.rss_mib())
        wall = time.perf_counter() - wall
        cpu_ms = (measured.cpu_s() - cpu0[0]) / scrapes * 1000
        base_ms = (baseline.cpu_s() - cpu0[1]) / scrapes * 1000
    finally:
        measured.stop()
        baseline.stop()
    click.echo(f"{gpus} fake GPUs, {size:,} bytes per scrape (gzip), {scrapes:,} scrapes of each "
               f"exporter in {wall:.0f} s")
    click.echo(f"CPU per scrape: {cpu_ms:.2f} ms with {gpus} GPUs, {base_ms:.2f} ms with none "
               f"(baseline): {cpu_ms / base_ms:.2f}x the baseline, "
               f"{(cpu_ms - base_ms) / max(gpus, 1):.2f} ms per GPU (target: <= 20 ms)")
    click.echo(f"RSS: {rss_start:.1f} MiB after warm-up; every {scrapes // 10:,} scrapes: "
               + ", ".join(f"{r:.1f}" for r in rss_points)
               + f" MiB; growth {rss_points[-1] - rss_start:+.1f} MiB")
