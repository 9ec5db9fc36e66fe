"""The exporter's HTTP endpoint: Prometheus text format, each GPU's labels escaped once.

prometheus-client's ``generate_latest`` validates and escapes every label of every sample; with
DCGM's six labels on ~55 series per GPU that was three quarters of a scrape's CPU (measured: 7
of 9.3 ms for 8 GPUs). ``render`` writes the same text format (0.0.4) from a snapshot, caching
the escaped label text per GPU; the process metrics still come from prometheus-client. A test
parses both presentations of one snapshot and compares them.
"""

from __future__ import annotations

import gzip
import math
import ssl
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest

from monitoring.exporter.collector import GpuCollector
from monitoring.exporter.families import Family, LabelValues

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(doc: str) -> str:  # HELP escapes backslash and newline only
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _value(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}"
    return repr(float(value))


class Renderer:
    def __init__(self) -> None:
        self._prefix: dict[tuple[tuple[str, ...], LabelValues], str] = {}

    def _labels(self, names: tuple[str, ...], values: LabelValues) -> str:
        key = (names, values)
        text = self._prefix.get(key)
        if text is None:  # once per GPU (and per family label layout): bounded
            text = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
            self._prefix[key] = text
        return text

    def render(self, families: Iterable[Family]) -> str:
        out: list[str] = []
        for f in families:
            name = f.sample_name
            out.append(f"# HELP {name} {_escape_help(f.doc)}\n# TYPE {name} {f.type}\n")
            for base, extra, value in f.samples:
                labels = self._labels(f.base, base) if base else ""
                if extra:
                    own = ",".join(f'{n}="{_escape(v)}"'
                                   for n, v in zip(f.extra, extra, strict=True))
                    labels = f"{labels},{own}" if labels else own
                out.append(f"{name}{{{labels}}} {_value(value)}\n" if labels
                           else f"{name} {_value(value)}\n")
        return "".join(out)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_app(collector: GpuCollector, registry: CollectorRegistry) -> Callable[..., Any]:
    renderer = Renderer()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        body = (renderer.render(collector.snapshot()).encode()
                + generate_latest(registry))
        headers = [("Content-Type", TEXT_FORMAT)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


def serve(collector: GpuCollector, registry: CollectorRegistry, host: str, port: int,
          certfile: str | None = None, keyfile: str | None = None) -> WSGIServer:
    """Listen and return the server; the caller runs ``serve_forever`` and ``shutdown``."""
    server = make_server(host, port, make_app(collector, registry), _Server, _QuietHandler)
    if certfile is not None and keyfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server
