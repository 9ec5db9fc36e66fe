"""Stand-in listeners for the network-isolation tests, run inside a namespace.

    python standin.py engine ADDR PORT   an engine stand-in: /health, /v1/models, chat
    python standin.py tcp ADDR PORT      accepts connections (an "outside" service)
    python standin.py udp ADDR PORT      echoes datagrams (an internal resolver)
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Engine(BaseHTTPRequestHandler):
    def _send(self, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "demo-chat", "object": "model"}]}
                   if self.path.startswith("/v1/models") else {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send({"id": "standin", "object": "chat.completion", "created": 0,
                    "model": "demo-chat",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "from the engine"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})

    def log_message(self, format: str, *args: object) -> None:
        pass


class Accept(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"hello\n")


def main() -> None:
    mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "engine":
        ThreadingHTTPServer((addr, port), Engine).serve_forever()
    elif mode == "tcp":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer((addr, port), Accept).serve_forever()
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        while True:
            data, peer = sock.recvfrom(512)
            sock.sendto(data, peer)


if __name__ == "__main__":
    main()
