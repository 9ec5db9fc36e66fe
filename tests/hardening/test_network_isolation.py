"""The generated nftables rules, applied in real network namespaces (client, gateway, engine,
outside and an internal resolver on one bridge), with real listeners: the gateway itself
(`enclave gateway`) and stand-ins for an engine, an outside service and the resolver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    copy_manifests,
    gateway_settings,
    new_key,
    settings_env,
    stop_process,
)

POLICY = REPO / "hardening" / "firewall" / "nft-policy.sh"
STANDIN = Path(__file__).with_name("standin.py")
NET = "10.77.0"
IP = {"client": f"{NET}.10", "gateway": f"{NET}.20", "engine": f"{NET}.30",
      "outside": f"{NET}.40", "resolver": f"{NET}.53"}
GATEWAY_PORT, ENGINE_PORT = 8000, 8101

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
except OSError as exc:
    sys.exit(f"{type(exc).__name__}")
"""
UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
s.sendto(b"q", (sys.argv[1], int(sys.argv[2])))
try:
    s.recvfrom(16)
except OSError as exc:
    sys.exit(f"{type(exc).__name__}")
"""
# An ICMP echo request from a raw socket (no ping binary needed); exit 0 on the echo reply.
PING = """
import os, socket, struct, sys, time
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
packet = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"enclave-ping"
packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(packet, (sys.argv[1], 0))
deadline = time.monotonic() + 1.5
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, (addr, _) = s.recvfrom(1024)
    except OSError:
        break
    kind, _, _, got = struct.unpack("!BBHH", data[20:26])
    if addr == sys.argv[1] and kind == 0 and got == ident:
        sys.exit(0)
sys.exit("no echo reply")
"""
HTTP = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[3].encode() or None,
                             headers={"Authorization": "Bearer " + sys.argv[2],
                                      "Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read().decode())
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


class Lab:
    """Namespaces on a bridge (in a namespace of its own: the host is never touched)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tag = f"{os.getpid() % 100000}"
        self.ns = {role: f"enc-{role[:3]}-{tag}" for role in [*IP, "switch"]}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tag = tag

    def up(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sw = self.ns["switch"]
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, (role, addr) in enumerate(IP.items()):
            host, peer = f"h{self.tag}{i}", f"p{self.tag}{i}"
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", host, "netns", self.ns[role])
            sh("ip", "link", "set", peer, "netns", sw)
            sh("ip", "-n", self.ns[role], "link", "set", host, "name", "eth0")
            sh("ip", "-n", self.ns[role], "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", self.ns[role], "link", "set", "eth0", "up")
            sh("ip", "-n", sw, "link", "set", peer, "master", "br0")
            sh("ip", "-n", sw, "link", "set", peer, "up")

    def down(self) -> None:
        for proc in self.procs:
            stop_process(proc, 10)
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)

    def spawn(self, role: str, *cmd: str, env: dict[str, str] | None = None,
              log: str = "") -> subprocess.Popen[bytes]:
        with (self.root / (log or f"{role}.log")).open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *cmd], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append(proc)
        return proc

    def run(self, role: str, *cmd: str, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns[role], *cmd], env=env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    def tcp(self, src: str, dst: str, port: int) -> bool:
        return self.run(src, sys.executable, "-c", CONNECT, IP[dst], str(port)).returncode == 0

    def udp(self, src: str, dst: str, port: int) -> bool:
        return self.run(src, sys.executable, "-c", UDP, IP[dst], str(port)).returncode == 0

    def ping(self, src: str, dst: str) -> bool:
        return self.run(src, sys.executable, "-c", PING, IP[dst]).returncode == 0

    def firewall(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ENCLAVE_FIREWALL_STATE_DIR": str(self.root / f"fw-{role}")}
        return self.run(role, "bash", str(POLICY), *args, env=env)

    def ruleset(self, role: str) -> str:
        return self.run(role, "nft", "list", "ruleset").stdout


def wait_until(what: str, check: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def config(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, str]]:
    assert os.geteuid() == 0, "network namespaces and nftables need root (CI runs as root)"
    root = tmp_path_factory.mktemp("netlab")
    lab = Lab(root)
    try:
        lab.up()
        lab.spawn("engine", sys.executable, str(STANDIN), "engine", "0.0.0.0", str(ENGINE_PORT))
        lab.spawn("outside", sys.executable, str(STANDIN), "tcp", "0.0.0.0", "443")
        lab.spawn("outside", sys.executable, str(STANDIN), "udp", "0.0.0.0", "53",
                  log="outside-udp.log")
        lab.spawn("resolver", sys.executable, str(STANDIN), "udp", "0.0.0.0", "53")
        lab.spawn("resolver", sys.executable, str(STANDIN), "tcp", "0.0.0.0", "53",
                  log="resolver-tcp.log")
        models = copy_manifests(root / "models", {"demo-chat": ENGINE_PORT})
        settings = gateway_settings(root / "gw", models, host=IP["gateway"], port=GATEWAY_PORT,
                                    engine_host=IP["engine"])
        key = new_key(settings, "lab")
        env = {**settings_env(settings), "ENCLAVE_HOST": IP["gateway"],
               "ENCLAVE_PORT": str(GATEWAY_PORT), "ENCLAVE_ENGINE_HOST": IP["engine"]}
        lab.spawn("gateway", sys.executable, "-m", "serving.cli.main", "gateway", env=env)
        wait_until("the gateway", lambda: lab.tcp("gateway", "gateway", GATEWAY_PORT))
        wait_until("the engine stand-in", lambda: lab.tcp("engine", "engine", ENGINE_PORT))
        yield lab, key
    finally:
        lab.down()


def chat_through_gateway(lab: Lab, key: str) -> subprocess.CompletedProcess[str]:
    body = '{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}'
    return lab.run("client", sys.executable, "-c", HTTP,
                   f"http://{IP['gateway']}:{GATEWAY_PORT}/v1/chat/completions", key, body)


def test_without_rules_everything_reaches_everything(lab: tuple[Lab, str]) -> None:
    """The baseline: what the rules must then forbid is reachable on this bridge."""
    net, _ = lab
    assert net.tcp("client", "engine", ENGINE_PORT)
    assert net.tcp("engine", "outside", 443)
    assert net.tcp("gateway", "outside", 443)


@pytest.fixture(scope="module")
def closed(lab: tuple[Lab, str]) -> tuple[Lab, str]:
    net, key = lab
    gw = config(net.root, "gateway.conf",
                f"role=gateway\nclient_cidrs={IP['client']}/32\nengine_addrs={IP['engine']}\n"
                f"engine_ports={ENGINE_PORT}\ngateway_port={GATEWAY_PORT}\n"
                f"dns={IP['resolver']}\nadmin_cidrs=none\n")
    engine = config(net.root, "engine.conf",
                    f"role=engine\ngateway_addrs={IP['gateway']}\nengine_ports={ENGINE_PORT}\n"
                    f"dns={IP['resolver']}\nmonitoring_cidrs={NET}.90/32\n"
                    "admin_cidrs=none\n")
    for role, path in (("gateway", gw), ("engine", engine)):
        applied = net.firewall(role, "apply", str(path))
        assert applied.returncode == 0, applied.stderr
        assert "policy drop" in net.ruleset(role)
    return net, key


def test_client_reaches_the_gateway_and_through_it_the_engine(closed: tuple[Lab, str]) -> None:
    net, key = closed
    assert net.tcp("client", "gateway", GATEWAY_PORT)
    answer = chat_through_gateway(net, key)
    assert answer.returncode == 0, answer.stderr
    assert "from the engine" in answer.stdout


def test_client_cannot_reach_the_engine(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    assert not net.tcp("client", "engine", ENGINE_PORT)


def test_gateway_reaches_the_engine_port_and_nothing_else_there(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    assert net.tcp("gateway", "engine", ENGINE_PORT)
    assert not net.tcp("gateway", "engine", 22)


def test_ping_is_answered_only_from_the_configured_networks(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    assert net.ping("client", "gateway")  # in the gateway's client_cidrs
    assert not net.ping("outside", "gateway")
    assert not net.ping("client", "engine")  # not among the engine host's networks
    assert not net.ping("outside", "engine")
    assert net.ping("client", "outside")  # hosts without the firewall answer: a real ping


def test_configs_that_would_open_the_firewall_are_refused(closed: tuple[Lab, str]) -> None:
    """Each refused with 65 before anything is generated; the rules in force stay as they are,
    and the outside still cannot reach the gateway or the engine."""
    net, _ = closed
    before = {role: net.ruleset(role) for role in ("gateway", "engine")}
    gateway_base = (f"role=gateway\nengine_addrs={IP['engine']}\nengine_ports={ENGINE_PORT}\n"
                    f"gateway_port={GATEWAY_PORT}\nadmin_cidrs=none\n")
    engine_base = f"role=engine\nengine_ports={ENGINE_PORT}\nadmin_cidrs=none\n"
    cases = [
        ("gateway", gateway_base + "client_cidrs=0.0.0.0/0\n", "is every address"),
        ("gateway", gateway_base + "client_cidrs=0.0.0.0/0\nallow_public_cidrs=yes\n",
         "is every address"),
        ("gateway", gateway_base + "client_cidrs=8.8.8.0/24\n", "not a private network"),
        ("engine", engine_base + "gateway_addrs=010.77.0.020\n", "leading zero"),
        ("engine", f"role=engine\ngateway_addrs={IP['gateway']}\nengine_ports=0443\n"
         "admin_cidrs=none\n", "leading zero"),
    ]
    for role, text, why in cases:
        refused = net.firewall(role, "apply", str(config(net.root, "open.conf", text)))
        assert refused.returncode == 65, refused.stderr
        assert why in refused.stderr
        assert net.ruleset(role) == before[role]
    assert not net.tcp("outside", "gateway", GATEWAY_PORT)
    assert not net.tcp("outside", "engine", ENGINE_PORT)
    assert not net.tcp("client", "engine", ENGINE_PORT)


def test_reapplying_the_ruleset_in_force_keeps_the_rollback_point(
        closed: tuple[Lab, str]) -> None:
    net, _ = closed
    state = net.root / "fw-engine"
    closed_conf = net.root / "engine.conf"
    in_force = net.ruleset("engine")
    wide = config(net.root, "wide2.conf", f"role=engine\ngateway_addrs={NET}.0/24\n"
                  f"engine_ports={ENGINE_PORT}\nadmin_cidrs=none\n")
    try:
        assert net.firewall("engine", "apply", str(wide)).returncode == 0  # a real change
        saved = (state / "previous.nft").read_text()
        again = net.firewall("engine", "apply", str(wide))  # the same ruleset again
        assert again.returncode == 0, again.stderr
        assert "already in force; nothing changed (previous.nft kept)" in again.stderr
        assert (state / "previous.nft").read_text() == saved
        assert net.tcp("client", "engine", ENGINE_PORT)
        assert net.firewall("engine", "rollback").returncode == 0  # to before the real change
        assert net.ruleset("engine") == in_force
        assert not net.tcp("client", "engine", ENGINE_PORT)
    finally:
        net.firewall("engine", "apply", str(closed_conf))
    assert net.ruleset("engine") == in_force


def test_engine_and_gateway_cannot_reach_outside(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    assert not net.tcp("engine", "outside", 443)
    assert not net.tcp("gateway", "outside", 443)
    assert not net.udp("engine", "outside", 53)  # a resolver that is not allowlisted


def test_engine_reaches_the_allowlisted_resolver(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    assert net.udp("engine", "resolver", 53)
    assert net.tcp("engine", "resolver", 53)


def test_an_invalid_config_is_refused_before_anything_changes(closed: tuple[Lab, str]) -> None:
    net, _ = closed
    before = net.ruleset("engine")
    for text, why in (("role=engine\ngateway_addrs=10.77.0.20\n", "needs engine_ports"),
                      ("role=router\n", "role must be"),
                      ("role=engine\ngateway_addrs=10.77.0.20\nengine_ports=99999\nadmin_cidrs=none\n",
                       "not a port"),
                      ("role=engine\ngateway_addrs=10.77.0.256\nengine_ports=8101\nadmin_cidrs=none\n",
                       "not an IPv4"),
                      ("role=engine\ngateway_addrs=10.77.0.20\nengine_ports=8101\nfoo=1\n",
                       "unknown key")):
        refused = net.firewall("engine", "apply", str(config(net.root, "bad.conf", text)))
        assert refused.returncode == 65, refused.stderr
        assert why in refused.stderr
        assert net.ruleset("engine") == before
    assert not net.tcp("client", "engine", ENGINE_PORT)


def test_a_failed_apply_keeps_the_previous_ruleset_and_rollback_restores(
        closed: tuple[Lab, str]) -> None:
    net, _ = closed
    before = net.ruleset("engine")
    # nft itself failing at commit (simulated: `nft -c` passes, `nft -f` fails)
    failing = config(net.root, "nft-fails", "#!/bin/sh\n"
                     'if [ "$1" = "-f" ]; then echo "commit failed" >&2; exit 1; fi\n'
                     'exec nft "$@"\n')
    failing.chmod(0o755)
    env = {**os.environ, "NFT": str(failing),
           "ENCLAVE_FIREWALL_STATE_DIR": str(net.root / "fw-engine")}
    wide = config(net.root, "wide.conf", f"role=engine\ngateway_addrs={NET}.0/24\n"
                  f"engine_ports={ENGINE_PORT}\nadmin_cidrs=none\n")
    failed = net.run("engine", "bash", str(POLICY), "apply", str(wide), env=env)
    assert failed.returncode != 0
    assert "previous ruleset is still in force" in failed.stderr
    assert net.ruleset("engine") == before
    # a real apply that opens the engine to the whole subnet, then a rollback
    assert net.firewall("engine", "apply", str(wide)).returncode == 0
    assert net.tcp("client", "engine", ENGINE_PORT)
    assert net.firewall("engine", "rollback").returncode == 0
    assert not net.tcp("client", "engine", ENGINE_PORT)
    assert net.ruleset("engine") == before
