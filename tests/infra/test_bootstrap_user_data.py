"""The hosts' user data, rendered by real Terraform from the bootstrap module (it needs no
provider), then run in dry-run mode under a temporary root: what it writes, in what order it
acts, and that the host firewall accepts the config it is given."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.infra.hcl import ROOT, TERRAFORM
from tests.infra.tools import tool

SHA = "ab" * 32
SECRET_ARN = "arn:aws:secretsmanager:eu-west-3:123456789012:secret:prod/gateway/pepper-AbCdEf"
FIREWALL = {
    "gateway": {"client_cidrs": "10.10.0.0/16 10.40.0.0/20", "engine_addrs": "10.40.0.0/20",
                "engine_ports": "8101 8102", "admin_cidrs": "none", "dns": "10.40.0.2",
                "ntp": "169.254.169.123", "mirrors": "10.20.8.0/24",
                "services": "10.40.0.0/16:443 169.254.169.254:80 10.40.200.10:5432"},
    "engine": {"gateway_addrs": "10.40.0.0/20 10.40.16.0/20", "engine_ports": "8101 8102",
               "monitoring_cidrs": "10.20.5.0/24", "admin_cidrs": "none", "dns": "10.40.0.2",
               "ntp": "169.254.169.123", "mirrors": "10.20.8.0/24",
               "services": "10.40.0.0/16:443 169.254.169.254:80"},
}


def render(tmp_path: Path, **inputs: object) -> subprocess.CompletedProcess[str]:
    """terraform apply of a root module that calls the bootstrap module with these inputs."""
    module = {"source": str(TERRAFORM / "modules" / "bootstrap"), **inputs}
    (tmp_path / "main.tf.json").write_text(json.dumps({
        "module": {"b": module},
        "output": {"user_data": {"value": "${module.b.user_data}"}},
    }))
    terraform = tool("terraform")
    init = subprocess.run([terraform, "init", "-backend=false", "-input=false", "-no-color"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stdout + init.stderr
    return subprocess.run([terraform, "apply", "-auto-approve", "-input=false", "-no-color"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def user_data(tmp_path: Path, role: str) -> str:
    inputs: dict[str, object] = {
        "role": role, "mirror_url": "https://mirror.internal.example",
        "enclave_version": "0.1.0", "release_sha256": SHA, "firewall": FIREWALL[role],
        "secret_fetch_command": "aws --region eu-west-3 secretsmanager get-secret-value "
                                "--query SecretString --output text --secret-id",
    }
    if role == "gateway":
        inputs["environment"] = {"ENCLAVE_ENGINE_HOST": "engines.internal.example",
                                 "ENCLAVE_PORT": "8000"}
        inputs["secret_env"] = {"ENCLAVE_PEPPER": SECRET_ARN}
    else:
        inputs["weights_sync_command"] = "aws s3 sync s3://acme-weights/enclave/prod/"
    applied = render(tmp_path, **inputs)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    out = subprocess.run([tool("terraform"), "output", "-raw", "user_data"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    return out.stdout


def dry_run(tmp_path: Path, script: str) -> tuple[Path, list[str]]:
    (tmp_path / "user-data.sh").write_text(script)
    root = tmp_path / "host"
    root.mkdir()
    result = subprocess.run(
        ["bash", str(tmp_path / "user-data.sh")], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ENCLAVE_BOOTSTRAP_ROOT": str(root),
             "ENCLAVE_BOOTSTRAP_DRY_RUN": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "etc" / "enclave", [line for line in result.stdout.splitlines()
                                      if line.startswith("run: ")]


def first(steps: list[str], needle: str) -> int:
    return next(i for i, step in enumerate(steps) if needle in step)


@pytest.mark.parametrize("role", ["gateway", "engine"])
def test_the_user_data_installs_from_the_mirror_only_in_a_safe_order(
        tmp_path: Path, role: str) -> None:
    script = user_data(tmp_path, role)
    conf, steps = dry_run(tmp_path, script)
    fetches = [s for s in steps if s.startswith("run: curl")]
    assert fetches and all("--proto =https" in s and "https://mirror.internal.example/" in s
                           for s in fetches)
    # the mirror's apt sources before any package; the checksum before the tarball is opened;
    # the firewall after the last download and before the services start
    assert first(steps, "enclave.sources") < first(steps, "apt-get update")
    assert first(steps, f"sha256sum --check ({SHA})") < first(steps, "tar -xzf")
    firewall = first(steps, "nft-policy.sh apply")
    assert firewall < first(steps, "systemctl enable")
    assert firewall > max(i for i, s in enumerate(steps) if "curl" in s or "s3 sync" in s)
    # the firewall config is one the real policy script accepts, for this role
    printed = subprocess.run(
        ["bash", str(ROOT / "hardening" / "firewall" / "nft-policy.sh"), "print",
         str(conf / "firewall.conf")], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    assert "policy drop" in printed.stdout
    assert (conf / "firewall.conf").read_text().count(f"role={role}") == 1
    if role == "gateway":
        env = (conf / "gateway.env").read_text()
        assert "ENCLAVE_ENGINE_HOST=engines.internal.example" in env
        assert "ENCLAVE_PEPPER" not in env  # fetched at boot into a file of its own
        assert any("secretsmanager get-secret-value" in s for s in steps)
        assert "systemctl enable --now enclave-firewall.service enclave-gateway.service" in \
            steps[-1]
    else:
        assert "enclave-engines.service" in steps[-1] and "enclave-exporter" in steps[-1]
        assert any("engines setup" in s for s in steps)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mirror_url", "http://mirror.internal.example", "https://"),
    ("release_sha256", "deadbeef", "SHA-256"),
    ("environment", {"ENCLAVE_PEPPER": "$(curl evil)"}, "quotes"),
])
def test_bad_inputs_are_refused_before_anything_is_rendered(
        tmp_path: Path, field: str, value: object, message: str) -> None:
    inputs: dict[str, object] = {
        "role": "gateway", "mirror_url": "https://mirror.internal.example",
        "enclave_version": "0.1.0", "release_sha256": SHA, "firewall": FIREWALL["gateway"],
        field: value}
    result = render(tmp_path, **inputs)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
