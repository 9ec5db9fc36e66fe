"""`enclave up`, `enclave gateway`, `enclave engines ...`: bring the platform up."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
from pathlib import Path

import click
import uvloop

from serving import logs
from serving.auth.keys import IssuedKey
from serving.cli import serve
from serving.cli.common import Store, console, fail, load_settings, stdout, with_store
from serving.cli.models import build_demo_model, ensure_engine_env
from serving.cli.sidecar import ExporterProcess
from serving.cli.workers import FDS_ENV, die_with_parent, supervise
from serving.contract.completeness import gaps
from serving.domain.manifest import ManifestError
from serving.engines.control import request as control_request
from serving.engines.control import socket_path
from serving.engines.sources import resolve_model_dir, vllm_fields
from serving.engines.supervisor import Supervisor, WeightsError, state_file
from serving.metrics import share_between_processes
from serving.settings import Settings
from serving.storage.manifests import load_manifests

DEMO_CLIENT = "demo"
DEMO_POLICY = "default"


def _supervisor(settings: Settings) -> Supervisor:
    try:
        manifests = load_manifests(settings.models_dir)
    except ManifestError as exc:
        fail(str(exc))
    env = ensure_engine_env(settings)
    if any(v.source.kind == "built" for m in manifests for v in m.versions):
        build_demo_model(settings)
    deployments = [d for m in manifests for d in m.deployments()]
    sup = Supervisor(deployments, env,
                     lambda d: resolve_model_dir(d, settings.cache_dir, env), settings.run_dir,
                     host=settings.engine_host)
    try:
        sup.verify()
    except WeightsError as exc:
        fail(f"weights check failed: {exc}")
    return sup


def _gateway(settings: Settings):  # type: ignore[no-untyped-def]
    from serving.app import create_app  # the CLI is the app factory's only importer

    try:
        return create_app(settings)
    except ValueError as exc:
        fail(str(exc))


def _demo_key(settings: Settings) -> str:
    """A fresh key for the "demo" client (created on first run with the default policy)."""

    async def rotate(store: Store) -> IssuedKey:
        client = await store.clients.get(DEMO_CLIENT)
        if client is None:
            try:
                client = await store.clients.create(DEMO_CLIENT, DEMO_POLICY,
                                                    "made by `enclave up`")
            except ValueError as exc:
                fail(f"cannot create the demo client: {exc}")
        policy = store.policies.get(client.policy)
        if policy is None:
            fail(f"the demo client's policy {client.policy!r} is not in {store.policies.path}")
        await store.keys.revoke(DEMO_CLIENT)
        return await store.keys.issue(client.id, policy.scopes, name=DEMO_CLIENT)

    return with_store(settings, rotate).key


def print_snippet(settings: Settings, key: str, exporter: ExporterProcess | None = None) -> None:
    base = f"http://{settings.host}:{settings.port}/v1"
    gpu = f"   GPU metrics: {exporter.url}" if exporter is not None and exporter.proc else ""
    body = '{"model": "demo-chat", "messages": [{"role": "user", "content": "Hello"}], ' \
           '"max_tokens": 32}'
    stdout.print(f"""
[bold green]Enclave is up.[/]
  endpoint  {base}
  models    demo-chat (chat, completions), minilm-embed (embeddings)
  api key   {key}
            (client "demo", policy "default": shown once, replaced at the next
             `enclave up`; your own: `enclave clients create NAME --policy default`,
             then `enclave keys create --client NAME --expires 90d`)

[bold]curl[/]
  curl {base}/chat/completions -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" -d {shlex.quote(body)}

[bold]openai SDK[/]
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  chat = client.chat.completions.create(
      model="demo-chat", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=32)
  print(chat.choices[0].message.content)
  emb = client.embeddings.create(model="minilm-embed", input="The cat sits on the mat.")
  print(len(emb.data[0].embedding))

Health: {base[:-3]}/readyz   Metrics: {base[:-3]}/metrics{gpu}   Stop: Ctrl-C
""", soft_wrap=True)


@click.command()
@click.option("--host", default=None, help="Gateway address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Gateway port (default 8000).")
def up(host: str | None, port: int | None) -> None:
    """Set up and run everything: engine environment, demo model, engines, gateway, a demo key."""
    settings = load_settings(host=host, port=port)
    logs.configure(settings.log_level)
    if settings.ensure_pepper_file():
        console.print(f"created a random pepper in {settings.default_pepper_file}")
    supervisor = _supervisor(settings)
    app = _gateway(settings)
    key = _demo_key(settings)
    console.print(f"starting {len(supervisor.engines)} engines (about a minute on a CPU); "
                  f"engine logs in {settings.run_dir / 'logs'}")
    exporter = ExporterProcess(settings)
    exporter.start()
    try:
        code = uvloop.run(serve.run(settings, app, supervisor,
                                    on_ready=lambda: print_snippet(settings, key, exporter)))
    finally:
        exporter.stop()
    raise SystemExit(code)


@click.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Gateway processes on the one port (needs ENCLAVE_REDIS_URL above 1, so "
              "that rate limits and concurrency caps stay exact).")
def gateway(host: str | None, port: int | None, workers: int) -> None:
    """Run the gateway only (engines are supervised elsewhere)."""
    settings = load_settings(host=host, port=port)
    logs.configure(settings.log_level)
    if workers > 1:
        if not settings.redis_url:
            fail("--workers above 1 needs ENCLAVE_REDIS_URL: each worker would otherwise count "
                 "rate limits and concurrency caps on its own, letting a client through N "
                 "times its limit")
        raise SystemExit(supervise(settings, workers))
    inherited = os.environ.get(FDS_ENV)
    sockets = None
    if inherited:  # a worker of `enclave gateway --workers N`
        die_with_parent()
        sockets = [socket.socket(fileno=int(fd)) for fd in inherited.split(",")]
        share_between_processes(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    app = _gateway(settings)
    raise SystemExit(uvloop.run(serve.run(settings, app, None, sockets=sockets)))


@click.group()
def engines() -> None:
    """The engine environment and the engine supervisor."""


@engines.command("setup")
def engines_setup() -> None:
    """Create the engine environment (vLLM in its own virtualenv)."""
    env = ensure_engine_env(load_settings())
    console.print(f"engine environment ready: {env.root}")


@engines.command("contract")
def engines_contract() -> None:
    """Check that the gateway's request contract covers every field the engine environment's
    vLLM accepts (run it after upgrading vLLM); exit 1 and name each gap otherwise."""
    env = ensure_engine_env(load_settings())
    try:
        found = gaps(vllm_fields(env))
    except RuntimeError as exc:
        fail(str(exc))
    if found:
        stdout.print("fields vLLM accepts that the request contract neither declares nor "
                     "refuses:", markup=False)
        for gap in found:
            stdout.print(f"  {gap}", markup=False)
        raise SystemExit(1)
    stdout.print("the request contract covers every field vLLM accepts", markup=False)


@engines.command("health")
def engines_health() -> None:
    """Exit 0 when every engine the supervisor runs is healthy (a container's health check)."""
    settings = load_settings()
    path = state_file(settings.run_dir)
    try:
        states = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"no engine state in {path} ({exc}); is `enclave engines run` running?")
    unhealthy = []
    for name, engine in sorted(states.items()):
        stdout.print(f"{name} {engine.get('state')} {engine.get('url')}", markup=False)
        if engine.get("state") != "healthy":
            unhealthy.append(name)
    if unhealthy or not states:
        raise SystemExit(1)


def _control(settings: Settings, message: dict[str, object]) -> dict[str, object]:
    path = socket_path(settings.run_dir)
    try:
        answer = asyncio.run(control_request(path, message))
    except OSError as exc:
        fail(f"cannot reach the engine supervisor at {path} ({exc.strerror or exc}); is "
             "`enclave engines run` (or `enclave up`) running with this data directory?")
    if "error" in answer:
        fail(str(answer["error"]))
    return answer


@engines.command("drain")
@click.argument("replica")
@click.option("--deadline", type=click.FloatRange(0, 3600), default=300, show_default=True,
              help="Seconds to wait for the engine to finish its requests before stopping it "
              "anyway (its --shutdown-timeout still applies).")
def engines_drain(replica: str, deadline: float) -> None:
    """Stop a replica without failing a request: gateways send it nothing new, and it stops
    once the engine has finished what it has. It stays stopped until `enclave engines start`."""
    answer = _control(load_settings(), {"op": "drain", "replica": replica,
                                        "deadline_s": deadline})
    idle = "idle" if answer.get("idle_at_stop") else "deadline passed, stopped anyway"
    stdout.print(f"{replica} drained and stopped after {answer.get('waited_s')} s ({idle})",
                 markup=False)


@engines.command("start")
@click.argument("replica")
def engines_start(replica: str) -> None:
    """Run a drained replica again."""
    answer = _control(load_settings(), {"op": "start", "replica": replica})
    stdout.print(f"{replica} {answer.get('state')}", markup=False)


@engines.command("run")
def engines_run() -> None:
    """Run the engine supervisor only (no gateway)."""
    settings = load_settings()
    logs.configure(settings.log_level)
    supervisor = _supervisor(settings)

    def ready() -> None:
        console.print("engines healthy: "
                      + ", ".join(f"{e.name} {e.url}" for e in supervisor.engines))

    raise SystemExit(uvloop.run(serve.run(settings, None, supervisor, on_ready=ready)))
