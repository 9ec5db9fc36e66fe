"""The processes a benchmark run measures: nginx with a canned answer, the bare proxy, the
gateway, and (end to end) a real vLLM engine under the supervisor."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

CANNED = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "demo-chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from nginx."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
}
NGINX_CONF = """
daemon off;
user {user};
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
        location = /health {{ return 200; }}
    }}
    server {{
        listen 127.0.0.1:{stream_port};
        # nginx serves files to GET only; the 405 a POST gets is redirected to the same
        # file as a GET.
        location = /v1/chat/completions {{
            root {root}/sse;
            default_type text/event-stream;
            error_page 405 =200 $uri;
        }}
        location = /health {{ return 200; }}
    }}
}}
"""
STREAM_TOKENS = 512


def canned_stream(tokens: int = STREAM_TOKENS) -> bytes:
    """What vLLM sends for a streamed chat completion of ``tokens`` tokens when the gateway
    asks for usage on every event: a role event, one event per token, a finish event and the
    usage-only event, then [DONE]."""
    def event(delta: dict[str, object], n: int, finish: str | None = None) -> bytes:
        return b"data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "demo-chat", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}],
            "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}},
            separators=(",", ":")).encode() + b"\n\n"
    words = ("the", "report", "says", "that", "our", "team", "will", "ship", "it", "soon")
    parts = [event({"role": "assistant", "content": ""}, 0)]
    parts += [event({"content": " " + words[i % len(words)]}, i + 1) for i in range(tokens)]
    parts.append(event({}, tokens, "length"))
    parts.append(b"data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
        "model": "demo-chat", "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": tokens,
                  "total_tokens": 9 + tokens}}, separators=(",", ":")).encode() + b"\n\n")
    return b"".join(parts) + b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Target:
    """A process under load: where to send requests, with which key, and its pid (for its
    CPU time)."""
    url: str
    key: str | None
    pid: int



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str]:
    with nginx_pair(root) as (url, _):
        yield url


@contextlib.contextmanager
def nginx_pair(root: Path) -> Iterator[tuple[str, str]]:
    """nginx answering a canned chat completion on one port and a canned stream of
    ``STREAM_TOKENS`` tokens on another (the same path: engines are chosen by port)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    port, stream_port = free_port(), free_port()
    (root / "body").mkdir(parents=True, exist_ok=True)
    (root / "sse" / "v1" / "chat").mkdir(parents=True, exist_ok=True)
    (root / "sse" / "v1" / "chat" / "completions").write_bytes(canned_stream())
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, stream_port=stream_port,
                                      user=getpass.getuser(),
                                      body=json.dumps(CANNED, separators=(",", ":"))))
    with process([binary, "-p", str(root), "-c", str(conf)], root / "nginx.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 10, proc)
        yield url, f"http://127.0.0.1:{stream_port}"


@contextlib.contextmanager
def bare_proxy(root: Path, upstream: str) -> Iterator[str]:
    with serve_bare(root, upstream) as target:
        yield target.url


@contextlib.contextmanager
def serve_bare(root: Path, upstream: str, stream_upstream: str | None = None) -> Iterator[Target]:
    """The bare proxy; requests for the model ``demo-stream`` go to ``stream_upstream``."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "serving.bench.bare_proxy:app", "--host",
            "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "BARE_UPSTREAM": upstream,
           "BARE_STREAM_UPSTREAM": stream_upstream or upstream}
    with process(args, root / "bare.log", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/docs", 20, proc)
        yield Target(url, None, proc.pid)


def bench_models(root: Path, ports: dict[str, int], models_dir: Path,
                 aliases: dict[str, tuple[str, int]] | None = None) -> Path:
    """Copies of the manifests with engines moved to the given ports (only those models);
    ``aliases``: more models, each a copy of an existing manifest under another name."""
    out = root / "models"
    out.mkdir(parents=True, exist_ok=True)
    wanted = {name: (name, port) for name, port in ports.items()} | (aliases or {})
    for name, (source, port) in wanted.items():
        data = yaml.safe_load((models_dir / f"{source}.yaml").read_text())
        data["name"] = name
        for version in data["versions"]:
            version["engine"]["port"] = port
        (out / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out


# Authentication and the model allowlist only: what any gateway does.
AUTH_ONLY_POLICIES = """
version: 1
policies:
  bench:
    models: [demo-chat, demo-stream]
    scopes: [chat, models]
"""
# Every guard on, with limits far above what a benchmark reaches: each request is checked
# against them, counted in Redis or memory, and reserved and settled in the ledger.
BENCH_POLICIES = AUTH_ONLY_POLICIES + """\
    caps: {max_tokens: 1024, n: 1, body_bytes: 65536, messages: 64}
    limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000, concurrent: 100000}
    budgets: {tokens_per_day: 1000000000000, tokens_per_month: 1000000000000}
"""
# The same, plus data protection: prompts and answers redacted, the audit record keeps the
# redacted text, injection and tool guards on.
PROTECTED_POLICIES = BENCH_POLICIES + """\
    pii: {input: redact, output: redact}
    audit: {content: redacted}
    guards:
      injection: {mode: flag}
      tools: {mode: block, allowed: {get_weather: {}}}
"""
# Every guard the gateway has, the audit keeping the full text encrypted (AES-256-GCM).
EVERY_GUARD_POLICIES = PROTECTED_POLICIES.replace("content: redacted", "content: encrypted")


@contextlib.contextmanager
def gateway(root: Path, models: Path, database_url: str | None = None,
            redis_url: str | None = None,
            policies: str = BENCH_POLICIES) -> Iterator[tuple[str, str]]:
    """The real gateway (auth, policy, rate limits, budget ledger, metrics, JSON access log
    to a file), and a key for it."""
    with serve_gateway(root, models, database_url, redis_url, policies) as target:
        yield target.url, target.key or ""


@contextlib.contextmanager
def serve_gateway(root: Path, models: Path, database_url: str | None = None,
                  redis_url: str | None = None, policies: str = BENCH_POLICIES,
                  workers: int = 1) -> Iterator[Target]:
    """The gateway as a ``Target`` (with an audit content key, for encrypted audit)."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "policies.yaml").write_text(policies)
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(root / "gateway-data"),
           "ENCLAVE_MODELS_DIR": str(models), "ENCLAVE_PEPPER": secrets.token_hex(32),
           "ENCLAVE_PORT": str(port), "ENCLAVE_POLICIES_FILE": str(root / "policies.yaml")}
    if database_url:
        env["ENCLAVE_DATABASE_URL"] = database_url
    if redis_url:
        env["ENCLAVE_REDIS_URL"] = redis_url
    enclave = [sys.executable, "-m", "serving.cli.main"]
    subprocess.run([*enclave, "clients", "create", "bench", "--policy", "bench"], env=env,
                   check=True, capture_output=True, text=True)
    key = subprocess.run([*enclave, "keys", "create", "--client", "bench"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([*enclave, "audit", "keygen"], env=env, check=True, capture_output=True)
    args = [*enclave, "gateway"] + (["--workers", str(workers)] if workers > 1 else [])
    with process(args, root / "gateway.log", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz", 30, proc)
        yield Target(url, key, proc.pid)


@contextlib.contextmanager
def engine(root: Path, models: Path, cache_dir: Path | None = None) -> Iterator[str]:
    """The demo chat model on a real vLLM engine, under the supervisor."""
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(root / "engine-data"),
           "ENCLAVE_MODELS_DIR": str(models), "ENCLAVE_PEPPER": secrets.token_hex(32)}
    if cache_dir is not None:
        env["ENCLAVE_CACHE_DIR"] = str(cache_dir)
    with process([sys.executable, "-m", "serving.cli.main", "engines", "run"],
                 root / "supervisor.log", env=env) as proc:
        state = root / "engine-data" / "run" / "engines.json"
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the engine supervisor exited; see " + str(root))
            with contextlib.suppress(OSError, ValueError):
                info = next(iter(json.loads(state.read_text()).values()))
                if info["state"] == "healthy":
                    yield str(info["url"])
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not become healthy")
            time.sleep(1)
