"""`enclave exporter`: the GPU exporter's command (also ``python -m monitoring.exporter``).

Depends on click, prometheus-client and nvidia-ml-py only, so it runs on a GPU host without
the gateway's environment.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import click
from prometheus_client import CollectorRegistry, ProcessCollector

from monitoring.exporter import fake_nvml, nvml
from monitoring.exporter.collector import GpuCollector
from monitoring.exporter.deployments import Deployments
from monitoring.exporter.exposition import Renderer, serve

log = logging.getLogger("enclave.exporter")


def default_engines_file() -> Path:
    data = os.environ.get("ENCLAVE_DATA_DIR")
    root = Path(data) if data else Path.home() / ".local" / "share" / "enclave"
    return root / "run" / "engines.json"


def build(fake_gpus: int | None, hostname: str, engines_file: Path | None,
          background: bool) -> tuple[GpuCollector, CollectorRegistry]:
    """The collector, and a registry with the exporter's own process metrics."""
    module: nvml.NVML | None
    why: str | None
    if fake_gpus is not None:
        module, why = fake_nvml.FakeNVML(fake_nvml.gpus(fake_gpus)), None
        log.warning("using a FAKE NVML describing %d GPUs: for tests only", fake_gpus)
    else:
        module, why = nvml.load()
    if module is None:
        log.warning("exporting zero GPUs: %s", why)
    collector = GpuCollector(module, hostname=hostname, deployments=Deployments(engines_file),
                             unavailable=why or "", background=background)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return collector, registry


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="ENCLAVE_EXPORTER_HOST",
              help="Address to listen on; the private address Prometheus scrapes in production.")
@click.option("--port", default=9400, show_default=True, envvar="ENCLAVE_EXPORTER_PORT",
              help="Port (DCGM exporter's).")
@click.option("--once", is_flag=True, help="Print one scrape to stdout and exit.")
@click.option("--engines-file", type=click.Path(path_type=Path), default=None,
              envvar="ENCLAVE_EXPORTER_ENGINES_FILE",
              help="The supervisor's engines.json, to name the deployment of each GPU process "
                   "[default: $ENCLAVE_DATA_DIR/run/engines.json].")
@click.option("--hostname", default=None, envvar="NODE_NAME",
              help="The Hostname label [default: this host's name].")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--fake-gpus", type=click.IntRange(0, 64), default=None,
              help="Use a FAKE NVML describing N GPUs (tests and demos only).")
def exporter(host: str, port: int, once: bool, engines_file: Path | None,
             hostname: str | None, tls_cert: str | None, tls_key: str | None,
             fake_gpus: int | None) -> None:
    """Export GPU telemetry (NVML) to Prometheus under DCGM's metric names."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    collector, registry = build(fake_gpus, hostname or socket.gethostname(),
                                engines_file or default_engines_file(), background=not once)
    if once:
        sys.stdout.write(Renderer().render(collector.snapshot()))
        collector.close()
        return
    try:
        server = serve(collector, registry, host, port, tls_cert, tls_key)
    except OSError as exc:
        collector.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("GPU exporter on %s://%s:%d/metrics, %d GPUs", "https" if tls_cert else "http",
             host, port, len(collector.gpus))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    collector.close()
