"""The router against replicas that fail on purpose: proxies (``FaultyEngine``) in front of the
real demo-chat engines answer 500s, hang, drop connections or cut answers, and clients go away;
plus fallbacks, TLS to remote engines, tracing, and prefix affinity against the alternatives.

Each test's gateway declares its models with ``endpoints`` (engines it does not supervise)
pointing at the proxies."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving.domain.policy import PolicyError
from serving.storage.policies import parse_policies
from tests.support import (
    REPO,
    Engines,
    GatewayServer,
    assert_openai_error,
    bearer,
    gateway_settings,
    new_key,
    running_gateway,
    wait_until,
    write_policies,
)
from tests.support.faults import FaultyEngine, always, mixed

pytestmark = pytest.mark.engine
CHAT = {"model": "demo-chat", "max_tokens": 4, "ignore_eos": True,
        "messages": [{"role": "user", "content": "hello"}]}


def remote_manifests(root: Path, models: dict[str, list[str]], **routing: object) -> Path:
    """Manifests for ``models`` (name → endpoint urls), each a copy of demo-chat's with no
    local replica."""
    base = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    out = root / "models"
    out.mkdir(parents=True, exist_ok=True)
    for name, urls in models.items():
        data = {**base, "name": name, "routing": dict(routing)}
        version = dict(base["versions"][0])
        version["engine"] = {**version["engine"], "replicas": 0,
                             "endpoints": [{"url": u} for u in urls]}
        data["versions"] = [version]
        (out / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out


ANY_MODEL_POLICIES = """
version: 1
policies:
  default:
    models: ["*"]
    scopes: [chat, completions, models]
"""


def settings_for(root: Path, models: Path, **overrides: object) -> Any:
    return gateway_settings(root, models, **{
        "policies_file": write_policies(root / "p", ANY_MODEL_POLICIES), **overrides})


def engine_urls(engines: Engines) -> list[str]:
    return [engines.url(r) for r in engines.replicas("demo-chat-v1")]


@pytest.fixture
def proxies(engines: Engines) -> Iterator[list[FaultyEngine]]:
    urls = engine_urls(engines)
    started = [FaultyEngine(urls[i % len(urls)]).start() for i in range(3)]
    try:
        yield started
    finally:
        for proxy in started:
            proxy.stop()


def in_flight(gw: GatewayServer) -> dict[str, int]:
    return {r.name: r.in_flight for r in gw.app.state.services.pool.engines}


def test_every_in_flight_count_returns_to_zero_after_faults_and_disconnects(
        engines: Engines, proxies: list[FaultyEngine], tmp_path: Path) -> None:
    """1,000 requests against replicas that answer 500s, hang, drop and cut connections, from
    clients that go away: every replica's in-flight count is back at 0 (vLLM production-stack
    leaked these counters on error paths until its routing was wrong, #1001, #1072, #707)."""
    a, b = proxies[:2]
    a.plan = mixed({"pass": 0.6, "error": 0.12, "hang": 0.06, "close": 0.12, "cut": 0.1}, 1)
    b.plan = mixed({"pass": 0.6, "error": 0.12, "hang": 0.06, "close": 0.12, "cut": 0.1}, 2)
    settings = settings_for(tmp_path, remote_manifests(tmp_path, {"demo-chat": [a.url, b.url]}),
                            upstream_read_timeout_s=1.0, upstream_first_byte_timeout_s=1.0,
                            ejection_base_s=0.2, ejection_max_s=0.5)
    rng = random.Random(3)
    statuses: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, i: int, key: str) -> None:
        body = {**CHAT, "stream": i % 2 == 0}
        leave = rng.random() < 0.2
        try:
            async with asyncio.timeout(rng.uniform(0.01, 0.3) if leave else 30):
                async with client.stream("POST", "/v1/chat/completions", json=body,
                                         headers=bearer(key)) as resp:
                    async for _ in resp.aiter_bytes():
                        pass
                status = str(resp.status_code)
        except TimeoutError:
            status = "left"
        statuses[status] = statuses.get(status, 0) + 1

    async def load(url: str, key: str) -> None:
        sem = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def bounded(i: int) -> None:
                async with sem:
                    await one(client, i, key)
            await asyncio.gather(*(bounded(i) for i in range(1000)))

    with running_gateway(settings) as gw:
        key = new_key(settings, "faults", "default")
        asyncio.run(load(gw.url, key))
        assert sum(statuses.values()) == 1000
        assert set(statuses) <= {"200", "502", "503", "504", "left"}, statuses
        assert a.hits["error"] and a.hits["hang"] and a.hits["close"] and a.hits["cut"]
        wait_until(lambda: set(in_flight(gw).values()) == {0}, 10, 0.1,
                   what=f"in-flight counts back to 0: {in_flight(gw)}")
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'enclave_replica_in_flight{deployment="demo-chat-v1"' in metrics
        for line in metrics.splitlines():
            if line.startswith("enclave_replica_in_flight{"):
                assert line.endswith(" 0.0"), line
        assert "enclave_upstream_retries_total" in metrics


FALLBACK_POLICIES = """
version: 1
policies:
  with-backup:
    models: [demo-chat, demo-backup]
    scopes: [chat]
    fallbacks: {demo-chat: [demo-backup]}
  no-backup:
    models: [demo-chat]
    scopes: [chat]
"""


def test_failing_replicas_cost_at_most_a_fifth_more_attempts_and_fallbacks_answer(
        engines: Engines, proxies: list[FaultyEngine], tmp_path: Path) -> None:
    a, b, backup = proxies
    a.plan = b.plan = always("error")
    models = remote_manifests(tmp_path, {"demo-chat": [a.url, b.url],
                                         "demo-backup": [backup.url]})
    settings = gateway_settings(tmp_path, models, ejection_base_s=30, ejection_max_s=30,
                                policies_file=write_policies(tmp_path / "p", FALLBACK_POLICIES))
    with running_gateway(settings) as gw:
        plain = new_key(settings, "plain", "no-backup")
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            # Every replica failing (engine 500s): retries stay within the budget.
            sent = 0
            for _ in range(100):
                resp = client.post("/v1/chat/completions", json=CHAT, headers=bearer(plain))
                sent += 1
                assert resp.status_code in (502, 503), resp.text
                assert_openai_error(resp, resp.status_code)
            attempts = a.count() + b.count()
            assert 0 < attempts <= 1.2 * sent, (attempts, sent)
            # Both replicas ejected: the model is out. A client whose policy names a fallback
            # gets the fallback's answer, and the records say which model answered and why.
            backed = new_key(settings, "backed", "with-backup")
            resp = client.post("/v1/chat/completions", json=CHAT, headers=bearer(backed))
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-enclave-served-model"] == "demo-backup"
            assert backup.count() == 1
            # Without one in its policy, the model is simply unavailable.
            refused = client.post("/v1/chat/completions", json=CHAT, headers=bearer(plain))
            assert_openai_error(refused, 503)
            assert "x-enclave-served-model" not in refused.headers
    records = [line for path in sorted((tmp_path / "audit").rglob("segment-*.jsonl"))
               for line in path.read_text().splitlines()]
    fallback = [r for r in records if "served_model" in r and "demo-backup" in r]
    assert len(fallback) == 1 and "no replica of 'demo-chat' available" in fallback[0]
    # A fallback outside the client's allowlist is refused when the policy is loaded.
    with pytest.raises(PolicyError, match="not in this policy's models"):
        parse_policies(FALLBACK_POLICIES.replace("models: [demo-chat, demo-backup]",
                                                 "models: [demo-chat]"), "p.yaml",
                       {"demo-chat", "demo-backup"})


def _tls_files(root: Path) -> dict[str, Path]:
    """A private CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key: Any, issuer: Any, issuer_key: Any, ca: bool,
             san: list[x509.GeneralName] | None = None,
             usage: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, key: Any, certificate: x509.Certificate) -> None:
        (root / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (root / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave test CA")])
    ca = cert("enclave test CA", ca_key, ca_name, ca_key, True)
    write("ca", ca_key, ca)
    for name, san, usage in (
            ("server", [x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
             [ExtendedKeyUsageOID.SERVER_AUTH]),
            ("client", None, [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, cert(name, key, ca_name, ca_key, False, san, usage))
    other_key = ec.generate_private_key(ec.SECP256R1())
    write("other-ca", other_key, cert("other CA", other_key, x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "other CA")]), other_key, True))
    return {n: root / n for n in ("ca", "server", "client", "other-ca")}


class TlsTerminator:
    """TLS (client certificate required) on a port of its own, relaying to an engine."""

    def __init__(self, files: dict[str, Path], target_port: int) -> None:
        import threading

        from tests.support import free_port
        self.port = free_port()
        self.target = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(f"{files['server']}.pem", f"{files['server']}.key")
        self.context.load_verify_locations(f"{files['ca']}.pem")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.handshakes_refused = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(
            self._relay, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_remote_engines_are_reached_over_mutual_tls_with_the_private_ca(
        engines: Engines, tmp_path: Path) -> None:
    files = _tls_files(tmp_path / "tls")
    port = int(str(engines.state()["demo-chat-v1/r0"]["port"]))
    with TlsTerminator(files, port) as tls:
        models = remote_manifests(tmp_path, {"demo-chat": [f"https://localhost:{tls.port}"]})
        good = {"engine_ca_file": Path(f"{files['ca']}.pem"),
                "engine_cert_file": Path(f"{files['client']}.pem"),
                "engine_key_file": Path(f"{files['client']}.key")}
        cases = [("mutual TLS", good, 200),
                 ("no client certificate", {"engine_ca_file": good["engine_ca_file"]}, 503),
                 ("another CA", {**good, "engine_ca_file": Path(f"{files['other-ca']}.pem")},
                  503)]
        for what, tls_settings, expected in cases:
            root = tmp_path / what.replace(" ", "-")
            settings = settings_for(root, models, **tls_settings)
            with running_gateway(settings) as gw:
                key = new_key(settings, "tls", "default")
                resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                                  headers=bearer(key), timeout=30)
                assert resp.status_code == expected, (what, resp.text)
    # Plain HTTP to an engine off loopback is refused at start unless allowed.
    models = remote_manifests(tmp_path / "plain", {"demo-chat": ["http://10.11.12.13:8000"]})
    with pytest.raises(ValueError, match="plain HTTP"):
        GatewayServer(settings_for(tmp_path / "plain", models))


def test_traces_cover_the_request_admission_and_each_attempt_and_reach_the_engine(
        engines: Engines, proxies: list[FaultyEngine], tmp_path: Path) -> None:
    from tests.support.otlp import OtlpReceiver

    a, b = proxies[:2]
    a.plan = always("error")  # the first attempt fails wherever it lands; b answers
    b.plan = always("pass")
    with OtlpReceiver() as receiver:
        settings = settings_for(tmp_path, remote_manifests(tmp_path, {"demo-chat": [a.url, b.url]},
                                                           balance="round_robin"),
                                otlp_endpoint=receiver.endpoint)
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        with running_gateway(settings) as gw:
            key = new_key(settings, "traced", "default")
            for _ in range(4):  # enough that one lands on the failing replica first
                resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30,
                                  headers={**bearer(key),
                                           "traceparent": f"00-{trace_id}-{parent}-01"})
                assert resp.status_code == 200, resp.text
                if a.count():
                    break
        spans = [s for s in receiver.spans if s.trace_id == trace_id]
    requests = [s for s in spans if s.kind == "server"]
    assert requests and all(s.parent_span_id == parent for s in requests)
    ids = {s.span_id for s in requests}
    children = [s for s in spans if s.parent_span_id in ids]
    assert any(s.name == "admission" for s in children)
    attempts = [s for s in children if s.name == "upstream attempt"]
    outcomes = {(s.attributes["enclave.replica"], s.attributes["enclave.outcome"])
                for s in attempts}
    assert ("demo-chat-v1/" + a.url.removeprefix("http://"), "engine_5xx") in outcomes
    assert ("demo-chat-v1/" + b.url.removeprefix("http://"), "ok") in outcomes
    retried = [s for s in attempts if s.attributes.get("enclave.retry_reason")]
    assert retried and retried[0].attributes["enclave.retry_reason"] == "engine_5xx"
    # The engine got the attempt's traceparent: the same trace, the attempt as parent.
    sent = {t.split("-")[2] for t in b.traceparents if t and t.split("-")[1] == trace_id}
    assert sent & {s.span_id for s in attempts}
    # No text of the request in any span.
    assert not any("hello" in str(s.attributes) for s in spans)
