"""The gateway's HTTP server: uvicorn with receive deadlines, on one or two listeners.

uvicorn closes an idle keep-alive connection, but a connection that trickles its headers or its
body one byte at a time holds its socket (and, once the headers are in, a task) for as long as
the client likes. ``DeadlineProtocol`` gives every request ``header_timeout_s`` from its first
byte (or from the connection's opening) to finish its headers, and ``body_timeout_s`` from there
to finish its body; past either, the connection is answered 408 (when nothing was sent yet) and
closed.

With ``ENCLAVE_OPS_PORT`` set, the server also listens on ``ops_host:ops_port``, where
``/metrics`` and the detail of ``/readyz`` are served; the API port then answers ``/metrics``
with 404 and ``/readyz`` with its status only (``ops.py``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import error_bytes
from serving.settings import Settings

_TIMEOUT_BODY = error_bytes("The request was not received in time.", "invalid_request_error",
                            code="request_timeout")
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode()
                     + b"\r\n\r\n" + _TIMEOUT_BODY)


class DeadlineProtocol(HttpToolsProtocol):
    """httptools' protocol with a deadline on receiving each request's headers, then body."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)  # a connection that never sends a request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def protocol(settings: Settings) -> type[DeadlineProtocol]:
    return type("GatewayProtocol", (DeadlineProtocol,), {
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s})


def listeners(settings: Settings) -> list[socket.socket]:
    """The API socket, and the operations socket when one is configured (bound here, so the
    server can serve both)."""
    out = [_bind(settings.host, settings.port)]
    if settings.ops_port is not None:
        out.append(_bind(settings.ops_host, settings.ops_port))
    return out


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def config(app: Any, settings: Settings, loop: str = "none") -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, loop=loop, http=protocol(settings),
        log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
        server_header=False, date_header=False, proxy_headers=False,
        timeout_keep_alive=settings.keep_alive_s)
